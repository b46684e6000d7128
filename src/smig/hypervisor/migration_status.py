"""QEMU's migration reports turned into SMIG's terms: progress snapshots and typed failures.

Pure functions over QMP replies, so they are tested without a QEMU.
"""

from __future__ import annotations

import re
from typing import Any

from smig.errors import DestinationUnreachable, MigrationError, TLSError
from smig.model import IncomingVM, MigrationParams, MigrationProgress, MigrationStats, MigrationStatus

_KNOWN = {s.value: s for s in MigrationStatus}
_UNREACHABLE = (
    "connection refused",
    "no such file or directory",
    "no route to host",
    "network is unreachable",
    "failed to connect",
    "connection reset",
    "broken pipe",
    # QEMU 7.2 writing to a migration socket whose connect failed (a destination gone as the
    # source connected): the channel was never there.
    "unable to write to socket: bad file descriptor",
)
_TLS = ("tls", "certificate", "handshake", "x509", "gnutls")
# QEMU quotes the paths and addresses it names; a word inside one (a directory called
# ".../smig-tlsq1w2/...") says nothing about why the migration failed.
_QUOTED = re.compile(r"'[^']*'")


def progress_from_query(reply: dict[str, Any]) -> MigrationProgress:
    """A :class:`MigrationProgress` from a ``query-migrate`` reply."""
    raw = str(reply.get("status", "none"))
    status = _KNOWN.get(raw, MigrationStatus.ACTIVE)
    ram = reply.get("ram", {}) or {}
    expected = reply.get("expected-downtime")
    return MigrationProgress(
        status=status,
        elapsed_ms=int(reply.get("total-time", 0)),
        transferred_bytes=int(ram.get("transferred", 0)),
        remaining_bytes=int(ram.get("remaining", 0)),
        total_bytes=int(ram.get("total", 0)),
        dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
        page_size=int(ram.get("page-size", 4096)),
        expected_downtime_ms=int(expected) if expected is not None else None,
        iterations=int(ram.get("dirty-sync-count", 0)),
        throughput_mbps=float(ram.get("mbps", 0.0)),
        error=reply.get("error-desc"),
    )


def stats_from_query(
    reply: dict[str, Any], vm: str, source_pid: int, incoming: IncomingVM, params: MigrationParams
) -> MigrationStats:
    """The :class:`MigrationStats` of a completed migration from the source's ``query-migrate``."""
    ram = reply.get("ram", {}) or {}
    return MigrationStats(
        vm=vm,
        total_ms=int(reply.get("total-time", 0)),
        downtime_ms=int(reply.get("downtime", 0)),
        setup_ms=int(reply.get("setup-time", 0)),
        transferred_bytes=int(ram.get("transferred", 0)),
        iterations=int(ram.get("dirty-sync-count", 0)),
        throughput_mbps=float(ram.get("mbps", 0.0)),
        source_pid=source_pid,
        target_pid=incoming.pid,
        transport=params.transport,
        tls=params.tls,
        uri=incoming.uri,
    )


def classify_failure(desc: str | None, *, vm: str | None = None) -> MigrationError:
    """The typed error for QEMU's account of why a migration failed."""
    text = (desc or "no reason given").strip()
    low = _QUOTED.sub("''", text.lower())
    if any(word in low for word in _TLS):
        return TLSError(f"migration of {vm} refused over TLS: {text}", vm=vm)
    if any(word in low for word in _UNREACHABLE):
        return DestinationUnreachable(f"migration of {vm} cannot reach its destination: {text}", vm=vm)
    return MigrationError(f"migration of {vm} failed: {text}", vm=vm)

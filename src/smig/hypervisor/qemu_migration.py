"""How a QEMU process is set up for one side of a live migration.

Capabilities, parameters and the TLS credentials object, applied over QMP to the source and
to the destination alike, and the bandwidth SMIG asks for when the caller names none.
"""

from __future__ import annotations

import errno
import socket
from contextlib import suppress
from typing import Any

from smig.errors import ConfigError, TLSError
from smig.hypervisor.qmp import QMPCommandError, Session
from smig.model import Accel, MigrationParams, TLSConfig

_UNLIMITED_BANDWIDTH = 100 << 30  # bytes/s; QEMU 7.2 has no "no cap" value
#: The cap under TCG when the caller sets none: the fastest setting seen to keep a guest that
#: writes 50 MiB/s intact over plain migrations (0 of 40 crashed; 512 MiB/s and up corrupted
#: it). It does not protect TLS migrations as well; see docs/BENCHMARKS.md.
TCG_DEFAULT_BANDWIDTH_MIBPS = 128.0
#: QOM ids of the TLS credentials objects: one for receiving, one for sending.
TLS_IN = "smig-tls-in"
TLS_OUT = "smig-tls-out"


async def set_migration_options(
    qmp: Session, params: MigrationParams, tls: TLSConfig | None, *, tls_id: str, endpoint: str, accel: Accel | None
) -> None:
    """Apply capabilities and parameters, including the TLS credentials object, to one side.

    Both sides open the return path: the destination then tells the source when it has loaded
    the VM (or failed to), and only then does the source call the migration completed. Without
    it, "completed" means only "all sent": a source stopped at once could reset the connection
    while the destination still read the last of it, and the VM was lost on the way (a cold
    restart from disk), or a destination that failed to load was found only after the source had
    gone. With it, such a failure is the source's, which keeps running the VM."""
    await qmp.execute(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "events", "state": True},
            {"capability": "auto-converge", "state": params.auto_converge},
            {"capability": "return-path", "state": True},
        ],
    )
    options: dict[str, Any] = {
        "max-bandwidth": bandwidth_bytes(params.bandwidth_mibps, accel),
        "downtime-limit": params.downtime_limit_ms,
    }
    if tls is not None:
        with suppress(QMPCommandError):  # not there on a first migration
            await qmp.execute("object-del", id=tls_id)
        try:
            await qmp.execute(
                "object-add",
                **{
                    "qom-type": "tls-creds-x509",
                    "id": tls_id,
                    "dir": tls.directory,
                    "endpoint": endpoint,
                    "verify-peer": True,
                },
            )
        except QMPCommandError as e:
            raise TLSError(f"QEMU cannot load TLS credentials from {tls.directory}: {e.desc}") from e
        options.update({"tls-creds": tls_id, "tls-hostname": tls.hostname})
    else:
        options.update({"tls-creds": "", "tls-hostname": ""})
    await qmp.execute("migrate-set-parameters", **options)


def bandwidth_bytes(mibps: float | None, accel: Accel | None) -> int:
    """QEMU's ``max-bandwidth`` for a requested cap (None: the default for ``accel``; 0: none)."""
    if mibps is None:
        mibps = TCG_DEFAULT_BANDWIDTH_MIBPS if accel is Accel.TCG else 0.0
    return _UNLIMITED_BANDWIDTH if mibps == 0 else int(mibps * (1 << 20))


def free_port(host: str) -> int:
    """A port the kernel just had free on ``host``; the destination binds it moments later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"listen address {host} does not exist on this host") from e
            raise
        return int(s.getsockname()[1])

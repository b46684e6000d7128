"""``smig ivt`` and ``smig audit``: read the Integrity Validation Table and check its audit log.

Both only read: a missing database is an error, never a new empty file. ``--db`` takes a path
or a store URL (``sqlite:///abs/path``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import OverflowMethod
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from smig.cli.common import emit_json, fail, out
from smig.errors import AuditChainBroken, SmigError
from smig.ivt.base import AuditEntry, IVTStore, open_store
from smig.model import HostRecord, PlacedVM, TrustState
from smig.paths import smig_home

audit_app = typer.Typer(
    help=(
        "The IVT's audit log: every decision the RC-TCB took, each entry hash-chained to the one "
        "before, so that an edited, removed, reordered or cut-off entry is caught by 'smig audit verify'."
    ),
    no_args_is_help=True,
)

_DB = typer.Option(
    None, "--db", help="IVT database: a path or sqlite:///abs/path [default: $SMIG_HOME/rctcb/ivt.sqlite]."
)
_JSON = typer.Option(False, "--json", help="Print JSON (for scripts) instead of a table.")
_BROKEN_EXIT = 3  # distinct from 1 (could not read at all): the log was read and is not intact

STATE_STYLE = {
    TrustState.TRUSTED: "green",
    TrustState.SUSPECT: "yellow",
    TrustState.UNTRUSTED: "red",
    TrustState.UNKNOWN: "magenta",
    TrustState.ENROLLING: "cyan",
    TrustState.MAINTENANCE: "blue",
}


def default_db() -> Path:
    """Where the RC-TCB keeps its IVT under $SMIG_HOME."""
    return smig_home() / "rctcb" / "ivt.sqlite"


@contextmanager
def _store(db: str | None) -> Iterator[IVTStore]:
    try:
        store = open_store(db or str(default_db()), create=False)
    except SmigError as e:
        fail(f"{e}{'' if db else ' (start the RC-TCB to create it, or name another with --db)'}")
    try:
        yield store
    finally:
        store.close()


def _age(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    s = max(0.0, now - then)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def host_json(r: HostRecord, vms: list[PlacedVM]) -> dict[str, Any]:
    """One row of ``smig ivt --json``. ``host``, ``state`` and ``verified_at`` are a contract."""
    v = r.verified
    return {
        "host": r.host,
        "region": r.region,
        "address": r.address,
        "state": r.state.value,
        "state_since": r.state_since,
        "verified_at": r.verified_at,
        "monitor": v.monitor if v else None,
        "verified_sequence": v.sequence if v else None,
        "verdict": v.verdict.value if v else None,
        "capacity": {"vcpus": r.capacity.vcpus, "memory_mib": r.capacity.memory_mib},
        "load": {"vcpus": r.load.vcpus, "memory_mib": r.load.memory_mib},
        "vms": [vm.name for vm in vms],
        "suspected_by": list(r.suspected_by),
        "strikes": r.strikes,
        "enrolled_at": r.enrolled_at,
    }


def _snapshot(store: IVTStore) -> list[tuple[HostRecord, list[PlacedVM]]]:
    by_host: dict[str, list[PlacedVM]] = {}
    for vm in store.placements():
        by_host.setdefault(vm.host, []).append(vm)
    return [(r, by_host.get(r.host, [])) for r in store.hosts()]


def _table(rows: list[tuple[HostRecord, list[PlacedVM]]], now: float, where: str) -> Table:
    # No box and one space between columns: the nine columns fit an 80-column terminal uncut.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, title=where, title_justify="left")
    table.caption = f"{len(rows)} host(s) at {datetime.fromtimestamp(now):%H:%M:%S}"
    for name in ("host", "region", "state", "for", "verified", "monitor", "vCPU", "RAM GiB", "VMs"):
        numeric = name in ("vCPU", "RAM GiB", "VMs")
        # Host ids and states fold onto a second line rather than lose their end to an ellipsis.
        overflow: OverflowMethod = "fold" if name in ("host", "state") else "ellipsis"
        table.add_column(name, justify="right" if numeric else "left", overflow=overflow)
    for r, vms in rows:
        table.add_row(
            escape(r.host),
            escape(r.region),
            r.state.value.upper(),
            _age(r.state_since, now),
            _age(r.verified_at, now),
            escape(r.verified.monitor) if r.verified else "-",
            f"{r.load.vcpus}/{r.capacity.vcpus}",
            f"{r.load.memory_mib / 1024:g}/{r.capacity.memory_mib / 1024:g}",
            str(len(vms)),
            style=STATE_STYLE.get(r.state),
        )
    return table


def ivt(
    db: str | None = _DB,
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of rows; each has host, state and verified_at (Unix seconds or null)."
    ),
    watch: float | None = typer.Option(
        None, "--watch", min=0.1, metavar="SECONDS", help="Redraw the table every SECONDS until Ctrl-C."
    ),
) -> None:
    """Show the Integrity Validation Table: each hypervisor host, its trust state, and when it was last verified.

    Rows are coloured by state: TRUSTED green, SUSPECT yellow, UNTRUSTED red, UNKNOWN magenta,
    ENROLLING cyan, MAINTENANCE blue. 'for' is how long the host has been in its state, 'verified'
    how long ago the RC-TCB accepted the last report about it, 'monitor' the neighbour that
    measured it. vCPU and RAM are used/capacity (--json has RAM in MiB).
    Only TRUSTED hosts verified recently are migration targets.
    """
    if watch is not None and as_json:
        fail("--watch redraws a table; for scripts, run 'smig ivt --json' at your own interval", 2)
    with _store(db) as store:
        where = str(db or default_db())
        try:
            if watch is None:
                rows = _snapshot(store)
                if as_json:
                    emit_json([host_json(r, vms) for r, vms in rows])
                else:
                    out.print(_table(rows, time.time(), where))
                return
            with Live(_table(_snapshot(store), time.time(), where), console=out, auto_refresh=False) as live:
                while True:
                    time.sleep(watch)
                    live.update(_table(_snapshot(store), time.time(), where), refresh=True)
        except SmigError as e:
            fail(str(e))
        except KeyboardInterrupt:
            pass  # Ctrl-C is how --watch ends


@audit_app.command()
def verify(db: str | None = _DB, as_json: bool = _JSON) -> None:
    """Check the audit log's hash chain, from the first entry to the recorded head.

    Exit 0 and print the number of entries when the chain is intact. Exit 3 with a one-line error
    naming the first bad entry when an entry was edited (hash mismatch), removed (gap in seq),
    reordered (broken link) or cut off the end (head mismatch). Exit 1 when the log cannot be read.
    """
    with _store(db) as store:
        try:
            count = store.verify_audit()
        except AuditChainBroken as e:
            if as_json:
                emit_json({"valid": False, "seq": e.seq, "error": str(e)})
            fail(str(e), _BROKEN_EXIT)
        except SmigError as e:
            fail(str(e))
    if as_json:
        emit_json({"valid": True, "entries": count})
    else:
        out.print(f"{count} entries, audit chain intact")


def _short(value: object, width: int = 40) -> str:
    """A body value for a table cell: long ones (agent keys) are cut, the full text is in --json."""
    text = " ".join((value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def entry_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": e.at,
        "kind": e.kind,
        "subject": e.subject,
        "body": dict(e.body),
        "prev": e.prev,
        "hash": e.hash,
    }


@audit_app.command("list")
def list_entries(
    db: str | None = _DB,
    since: int = typer.Option(0, "--since", min=0, metavar="SEQ", help="Only entries after this seq."),
    as_json: bool = _JSON,
) -> None:
    """List audit entries in order: when, what kind, about whom, and what was decided.

    This reads entries as stored; it does not check the chain (that is 'smig audit verify').
    """
    with _store(db) as store:
        try:
            entries = list(store.audit_entries(since))
        except SmigError as error:
            fail(str(error))
    if as_json:
        emit_json([entry_json(e) for e in entries])
        return
    table = Table(box=box.SIMPLE_HEAD, caption=f"{len(entries)} entries")
    for name in ("seq", "at (UTC)", "kind", "subject", "body", "hash"):
        table.add_column(name, justify="right" if name == "seq" else "left")
    for e in entries:
        at = datetime.fromtimestamp(e.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        body = ", ".join(f"{k}={_short(v)}" for k, v in sorted(e.body.items()))
        table.add_row(str(e.seq), at, escape(e.kind), escape(e.subject), escape(body), e.hash[:12])
    out.print(table)


def migrations(
    db: str | None = _DB,
    everything: bool = typer.Option(False, "--all", help="Also the finished orders (done or failed)."),
    as_json: bool = _JSON,
) -> None:
    """Show the RC-TCB's migration orders: each VM being moved off an untrusted host, where to, and how far.

    An order goes planned → preparing (the target readies a slot) → ready (only while the
    limits on migrations sending at once are reached) → migrating → completing → done; a source that refuses or
    stalls is fenced and the VM restarted on the target from its disk (fencing → restarting →
    done); failed means no trusted host could take the VM, which keeps running where it was.
    """
    # Imported here: the order format is the orchestrator's, and `smig ivt` does not need it.
    from smig.rctcb.orders import Order

    with _store(db) as store:
        orders = [Order.from_json(stored.body) for stored in store.orders(active_only=not everything)]
    orders.sort(key=lambda o: (o.created_at, o.id))
    if as_json:
        emit_json([o.to_json() for o in orders])
        return
    if not orders:
        out.print("no migration orders" + ("" if everything else " in flight (--all shows finished ones)"))
        return
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("order", "vm", "from", "to", "state", "attempt", "since", "reason"):
        table.add_column(column)
    now = time.time()
    for o in orders:
        table.add_row(
            escape(o.id),
            escape(o.vm.name),
            escape(o.source),
            escape(o.target or "-"),
            o.state.value,
            str(o.attempt),
            _age(o.updated_at, now),
            escape(o.reason),
        )
    out.print(table)

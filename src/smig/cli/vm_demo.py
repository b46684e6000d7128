"""``smig vm demo``: the migration demo — one guest, busy writing memory, moved live twice.

It shows the foundation everything else in SMIG stands on: the guest boots, counts heartbeats
and dirties memory; it is live-migrated into a fresh QEMU process, first in the clear and then
over mutual TLS; its heartbeat keeps rising and its boot id never changes (no reboot); the
old process is gone after each move. The region demo, with AIM and the RC-TCB, is ``smig demo``.
"""

from __future__ import annotations

import secrets
from contextlib import nullcontext
from typing import Any

import typer
from rich.table import Table

from smig.cli.common import driver, emit_json, err, out, run
from smig.cli.vm import migrate_with_bar
from smig.hypervisor import process
from smig.model import MigrationParams, VMSpec
from smig.paths import smig_home
from smig.pki import ensure_local_migration_tls


def demo(
    memory: int = typer.Option(256, "--memory", "-m", help="Guest RAM in MiB."),
    dirty_mbps: int = typer.Option(20, "--dirty-mbps", help="MiB the guest dirties per second."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """Boot a guest that dirties memory, live-migrate it plain and over TLS, and prove it never
    stopped counting nor rebooted."""

    async def body() -> None:
        tls = ensure_local_migration_tls(smig_home())
        d = driver(tls=tls)
        accel, reason = await d.accelerator()
        name = f"demo-{secrets.token_hex(2)}"
        show = not as_json
        if show:
            err.print(f"[bold]SMIG migration demo[/bold] — accelerator [bold]{accel.value}[/bold] ({reason})")
        with err.status(f"booting {name}: {memory} MiB, dirtying {dirty_mbps} MiB/s…") if show else nullcontext():
            info = await d.launch(VMSpec(name=name, memory_mib=memory, dirty_mbps=dirty_mbps))
        rows: list[dict[str, Any]] = []
        try:
            first = await d.wait_heartbeat(name, 10)
            if show and first is not None:
                err.print(f"{name} up: pid {info.pid}, boot id {first.boot_id}, heartbeat {first.counter}")
            for label, params in (("plain", MigrationParams()), ("TLS", MigrationParams(tls=True))):
                before = (await d.status(name)).heartbeat
                stats = await migrate_with_bar(d, d, name, params, None, show=show)
                after = await d.wait_heartbeat(name, 10, after=before.counter if before else -1)
                rows.append(
                    {
                        "migration": label,
                        "total_ms": stats.total_ms,
                        "downtime_ms": stats.downtime_ms,
                        "transferred_mib": round(stats.transferred_bytes / (1 << 20), 1),
                        "source_pid": stats.source_pid,
                        "target_pid": stats.target_pid,
                        "source_gone": not process.alive(stats.source_pid),
                        "heartbeat_before": before.counter if before else None,
                        "heartbeat_after": after.counter if after else None,
                        "boot_id_unchanged": bool(before and after and before.boot_id == after.boot_id),
                    }
                )
        finally:
            await d.stop(name)
        if as_json:
            emit_json(
                {"vm": name, "accel": accel.value, "memory_mib": memory, "dirty_mbps": dirty_mbps, "migrations": rows}
            )
            return
        table = Table(
            "move",
            "total",
            "down",
            "sent",
            "pid",
            "beat",
            "same boot",
            "old gone",
            title=f"{name}: {memory} MiB, dirtying {dirty_mbps} MiB/s, {accel.value}",
        )
        for r in rows:
            table.add_row(
                r["migration"],
                f"{r['total_ms']} ms",
                f"{r['downtime_ms']} ms",
                f"{r['transferred_mib']:.0f}M",
                f"{r['source_pid']} → {r['target_pid']}",
                f"{r['heartbeat_before']} → {r['heartbeat_after']}",
                "yes" if r["boot_id_unchanged"] else "[red]NO[/red]",
                "yes" if r["source_gone"] else "[red]NO[/red]",
            )
        out.print(table)
        ok = all(r["boot_id_unchanged"] and r["source_gone"] for r in rows)
        out.print("[green]the guest kept running through both moves[/green]" if ok else "[red]something broke[/red]")
        if not ok:
            raise typer.Exit(1)

    run(body)

"""``smig demo``: SMIG's main job, end to end — tamper with a host, watch its VMs move to trusted ones."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from smig.cli.common import err, fail, out
from smig.errors import SmigError

_QUIET = frozenset({"effect.ignored", "migration.progress"})
_COLOURS = {"trusted": "green", "suspect": "yellow", "untrusted": "red", "unknown": "magenta", "enrolling": "cyan"}


def _screen(watch: Any, started: float) -> Group:
    table = Table(title=f"IVT  (t = {time.monotonic() - started:.1f} s)", expand=False)
    for column in ("host", "state", "verified", "strikes"):
        table.add_column(column)
    now = time.time()
    for host, row in sorted(watch.rows.items()):
        colour = _COLOURS.get(row.get("state", ""), "white")
        verified = f"{now - row['verified_at']:.1f}s ago" if row.get("verified_at") else "-"
        table.add_row(host, f"[{colour}]{row['state']}[/{colour}]", verified, str(row.get("strikes", 0)))
    moves = Table(title="migrations", expand=False)
    for column in ("VM", "from → to", "step", "progress"):
        moves.add_column(column)
    for vm, p in sorted(watch.progress.items()):
        sent, left = p.get("transferred_bytes", 0), p.get("remaining_bytes", 0)
        share = sent / (sent + left) if sent + left else (1.0 if p["kind"] == "migration.done" else 0.0)
        bar = "█" * int(share * 20) + "░" * (20 - int(share * 20))
        moves.add_row(vm, f"{p['source']} → {p['target'] or '?'}", p["state"], f"{bar} {share * 100:3.0f}%")
    # Reports the policy ignores (on an already untrusted host, say) are noise on this screen.
    shown = [(at, kind, data) for at, kind, data in watch.events if kind not in _QUIET]
    lines = [
        Text(
            f"{time.strftime('%H:%M:%S', time.localtime(at))} {kind} {_brief(data)}", overflow="ellipsis", no_wrap=True
        )
        for at, kind, data in shown[-8:]
    ]
    return Group(table, moves, *lines)


def _brief(data: dict[str, Any]) -> str:
    keys = ("host", "subject", "monitor", "old", "new", "vm", "target", "reason")
    return " ".join(f"{k}={data[k]}" for k in keys if data.get(k) not in (None, "", []))


def _fmt(t: float | None, zero: float) -> str:
    return "-" if t is None else f"{(t - zero) * 1000:.0f}"


def _print_timeline(result: Any) -> None:
    # Piped to a file or a pager the console would assume 80 columns and squeeze the timeline.
    console = out if out.is_terminal else Console(width=140)
    table = Table(
        title=f"{result.attacked_host} tampered ({result.attack}, policy {result.policy}): ms after the tamper",
        caption="mismatch: first verified mismatch · moving/running: migration start/end · down: guest-visible pause",
    )
    for column in ("VM", "to", "mode", "mismatch", "UNTRUSTED", "decided", "moving", "running", "down", "beat", "boot"):
        table.add_column(column, no_wrap=True)
    for v in result.vms:
        zero = v["tamper_at"]
        same = v["boot_id_before"] is not None and v["boot_id_before"] == v["boot_id_after"]
        table.add_row(
            v["name"],
            v["target"] or "-",
            v["mode"],
            _fmt(v["detected_at"], zero),
            _fmt(v["untrusted_at"], zero),
            _fmt(v["decided_at"], zero),
            _fmt(v["migration_started_at"], zero),
            _fmt(v["migration_completed_at"], zero),
            f"{v['downtime_ms']:.0f}" if v["downtime_ms"] is not None else "-",
            f"{v['heartbeat_before']}→{v['heartbeat_after']}",
            "same" if same else "NEW" if v["boot_id_after"] else "-",
        )
    console.print(table)
    states = ", ".join(f"{h['id']} {h['state']}" for h in result.hosts)
    console.print(f"hosts at the end: {states}")
    if result.response_time_ms is not None:
        console.print(f"response time, tamper → last VM running on a trusted host: {result.response_time_ms:.0f} ms")
    else:
        console.print("[red]not every VM reached a trusted host[/red]")


def demo(
    hosts: int | None = typer.Option(
        None, "--hosts", min=2, max=8, help="Hypervisor hosts in the region [default: 4; Xen: 3]."
    ),
    vms_per_host: int = typer.Option(1, "--vms-per-host", min=1, max=4, help="Guests on each host."),
    attack: str | None = typer.Option(
        None,
        "--attack",
        help="patch (the default), patch-lib, anon-exec, swap-binary or preload; on Xen, xen-code (the default) "
        "or xen-toolstack.",
    ),
    policy: str | None = typer.Option(
        None,
        "--policy",
        help="quorum (two monitors must agree; needs 3 hosts) or immediate [default: quorum; with 2 hosts: immediate].",
    ),
    memory: int | None = typer.Option(None, "--memory", "-m", help="Guest RAM in MiB [default: 256; Xen: 96]."),
    dirty_mbps: int | None = typer.Option(
        None, "--dirty-mbps", help="MiB each guest dirties per second [default: 10; Xen: 0]."
    ),
    interval: float = typer.Option(1.0, "--interval", help="Mean seconds between a monitor's measurements."),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Give the evacuation this long, in seconds [default: 300; Xen: 900]."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the timeline as JSON to this file."),
    report: Path | None = typer.Option(
        None, "--report", help="Write an HTML report with plots (response time by step, the region before and after)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Leave the lab up afterwards (`smig lab down` removes it)."),
    name: str = typer.Option("demo", "--name", help="The lab's name."),
    network: str = typer.Option(
        "auto", "--network", help="netns (a namespace per host), loopback (one address each here), or auto."
    ),
    hypervisor: str = typer.Option(
        "qemu",
        "--hypervisor",
        help="qemu, or xen: nested Xen hosts (the paper's platform), Xen's own code tampered from outside; "
        "slow under TCG (about 10 minutes).",
    ),
) -> None:
    """Bring up a region (hosts as network namespaces, an agent each, real guests), wait until every
    host is TRUSTED, tamper with one host's hypervisor, and show the RC-TCB finding it and moving
    its VMs live to trusted hosts. Ends with each VM's timeline; --json PATH writes it."""
    from smig.lab.demo import Watch, run_demo, write_json

    xen = hypervisor == "xen"

    started = time.monotonic()
    watch = Watch()
    live = Live(_screen(watch, started), console=err, refresh_per_second=4, transient=False)
    watch.on_change = lambda w: live.update(_screen(w, started)) if live.is_started else None

    def progress(line: str) -> None:
        err.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}")
        if "tampering" in line:
            live.start()

    try:
        try:
            result = run_demo(
                name=name,
                hosts=hosts or (3 if xen else 4),
                vms_per_host=vms_per_host,
                attack=attack or ("xen-code" if xen else "patch"),
                policy=policy or ("immediate" if (hosts or 3) < 3 else "quorum"),
                memory_mib=memory or (96 if xen else 256),
                dirty_mbps=(0 if xen else 10) if dirty_mbps is None else dirty_mbps,
                interval_s=interval,
                timeout_s=timeout or (900.0 if xen else 300.0),
                keep=keep,
                network=network,
                hypervisor=hypervisor,
                progress=progress,
                watch=watch,
            )
        finally:
            if live.is_started:
                live.stop()
    except SmigError as e:
        fail(str(e))
    _print_timeline(result)
    if json_path is not None:
        write_json(result, json_path)
        out.print(f"timeline written to {json_path}")
    if report is not None:
        from smig.lab.report import write_report

        out.print(f"report written to {write_report(result.to_json(), report)}")
    ok = result.response_time_ms is not None and all(
        h["state"] != "untrusted" or h["id"] == result.attacked_host for h in result.hosts
    )
    if not ok:
        raise typer.Exit(1)

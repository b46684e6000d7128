"""``smig vm``: run, inspect, live-migrate and stop VMs on this machine."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from smig.cli.common import driver, emit_json, err, fail, out, run
from smig.errors import ConfigError
from smig.hypervisor.accel import parse_override
from smig.hypervisor.base import HypervisorDriver
from smig.hypervisor.migration import live_migrate
from smig.model import (
    MigrationParams,
    MigrationProgress,
    MigrationStats,
    Transport,
    VMInfo,
    VMSpec,
    VMStatus,
)
from smig.paths import smig_home
from smig.pki import ensure_local_migration_tls, tls_config_for

app = typer.Typer(help="Run, inspect, live-migrate and stop VMs on this machine.", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print one JSON object (for scripts) instead of text.")


def _info_json(info: VMInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "pid": info.pid,
        "accel": info.accel.value,
        "state": info.state.value,
        "instance": info.instance,
        "memory_mib": info.spec.memory_mib,
        "vcpus": info.spec.vcpus,
        "dirty_mbps": info.spec.dirty_mbps,
    }


def _status_json(status: VMStatus) -> dict[str, Any]:
    hb = status.heartbeat
    data = _info_json(status.info)
    data.update(
        {
            "heartbeat": hb.counter if hb else None,
            "boot_id": hb.boot_id if hb else None,
            "guest_uptime_ms": hb.guest_uptime_ms if hb else None,
        }
    )
    return data


@app.command()
def launch(
    name: str = typer.Argument(..., help="A name for the VM: lower-case letters, digits, '.', '_', '-'."),
    memory: int = typer.Option(256, "--memory", "-m", help="Guest RAM in MiB."),
    dirty_mbps: int = typer.Option(0, "--dirty-mbps", help="Memory the guest dirties per second, in MiB (0: idle)."),
    working_set: int = typer.Option(64, "--working-set", help="MiB of guest memory the dirtier cycles over."),
    vcpus: int = typer.Option(1, "--vcpus", help="Virtual CPUs."),
    accel: str = typer.Option("auto", "--accel", help="auto (KVM only where a Linux guest boots), kvm or tcg."),
    as_json: bool = JSON,
) -> None:
    """Boot a guest (Debian cloud kernel + busybox) and wait for its first heartbeat.

    The guest counts heartbeats on its second serial port and, with --dirty-mbps, keeps
    writing non-zero data over its working set so that migrations have real work to do.
    """

    async def body() -> None:
        d = driver(parse_override(accel))
        chosen, reason = await d.accelerator()
        with err.status(f"booting {name} under {chosen.value}…", spinner="dots") if not as_json else nullcontext():
            info = await d.launch(
                VMSpec(name=name, memory_mib=memory, dirty_mbps=dirty_mbps, working_set_mib=working_set, vcpus=vcpus)
            )
        status = await d.status(name)
        if as_json:
            data = _status_json(status)
            data["accel_reason"] = reason
            emit_json(data)
        else:
            boot = status.heartbeat.boot_id if status.heartbeat else "?"
            out.print(f"{info.name} running: pid {info.pid}, {memory} MiB, boot id {boot}")
            out.print(f"accelerator: {info.accel.value} ({reason})")

    run(body)


@app.command("list")
def list_vms(as_json: bool = JSON) -> None:
    """List the VMs on this machine."""

    async def body() -> None:
        infos = await driver().list()
        if as_json:
            emit_json([_info_json(i) for i in infos])
            return
        table = Table("name", "state", "pid", "accel", "memory", "dirty")
        for i in infos:
            table.add_row(
                i.name,
                i.state.value,
                str(i.pid),
                i.accel.value,
                f"{i.spec.memory_mib} MiB",
                f"{i.spec.dirty_mbps} MiB/s",
            )
        out.print(table if infos else "no VMs")

    run(body)


@app.command()
def status(name: str = typer.Argument(..., help="The VM."), as_json: bool = JSON) -> None:
    """Show a VM's state and its guest's last heartbeat (counter and boot id)."""

    async def body() -> None:
        st = await driver().status(name)
        if as_json:
            emit_json(_status_json(st))
            return
        hb = st.heartbeat
        out.print(
            f"{name}: {st.info.state.value}, pid {st.info.pid}, {st.info.accel.value}, {st.info.spec.memory_mib} MiB\n"
            f"  heartbeat {hb.counter if hb else '-'}  boot id {hb.boot_id if hb else '-'}"
        )

    run(body)


@app.command()
def migrate(
    name: str = typer.Argument(..., help="The VM to move."),
    tls: bool = typer.Option(False, "--tls", help="Encrypt and authenticate with x509 certificates (mutual)."),
    tls_dir: str = typer.Option(
        "", "--tls-dir", help="QEMU x509 credentials directory to use instead of the generated local one."
    ),
    tls_hostname: str = typer.Option(
        "smig-local",
        "--tls-hostname",
        help="The name in the certificate of --tls-dir (the destination is checked against it).",
    ),
    transport: Transport = typer.Option(Transport.TCP, "--transport", help="tcp (loopback) or unix socket."),
    port: int = typer.Option(0, "--port", help="TCP port the destination listens on (0: pick a free one)."),
    bandwidth: str = typer.Option(
        "auto",
        "--bandwidth",
        help="Cap in MiB/s, 'unlimited', or 'auto': none under KVM, 128 MiB/s under TCG (faster TCG "
        "migrations corrupted busy guests here; see docs/BENCHMARKS.md).",
    ),
    downtime_ms: int = typer.Option(300, "--downtime-ms", help="Longest pause allowed for the final copy."),
    timeout: float = typer.Option(0, "--timeout", help="Cancel if not done after this many seconds (0: never)."),
    auto_converge: bool = typer.Option(False, "--auto-converge", help="Throttle the guest's CPU to converge."),
    as_json: bool = JSON,
) -> None:
    """Live-migrate a VM into a fresh QEMU process on this machine.

    The guest keeps running throughout; on any failure (or Ctrl-C) the migration is rolled
    back and the VM keeps running in its original process.
    """
    if tls_dir and not tls:
        fail("--tls-dir needs --tls")

    async def body() -> None:
        creds = None
        if tls:
            creds = tls_config_for(Path(tls_dir), tls_hostname) if tls_dir else ensure_local_migration_tls(smig_home())
        src = driver(tls=creds)
        # The destination must use the accelerator the guest runs under now.
        current = (await src.status(name)).info
        dst = driver(current.accel, tls=creds)
        if timeout < 0:
            raise ConfigError("--timeout must not be negative")
        params = MigrationParams(
            transport=transport,
            bandwidth_mibps=_parse_bandwidth(bandwidth),
            downtime_limit_ms=downtime_ms,
            tls=tls,
            auto_converge=auto_converge,
            timeout_s=timeout or None,
        )
        stats = await migrate_with_bar(src, dst, name, params, port or None, show=not as_json)
        if as_json:
            emit_json(_stats_json(stats))
        else:
            out.print(
                f"{name} migrated{' over TLS' if stats.tls else ''} ({stats.transport.value}): "
                f"total {stats.total_ms} ms, downtime {stats.downtime_ms} ms, "
                f"{stats.transferred_bytes / (1 << 20):.1f} MiB sent in {stats.iterations} passes, "
                f"pid {stats.source_pid} → {stats.target_pid}"
            )

    run(body)


async def migrate_with_bar(
    src: HypervisorDriver, dst: HypervisorDriver, name: str, params: MigrationParams, port: int | None, *, show: bool
) -> MigrationStats:
    """Live-migrate ``name``, drawing progress on stderr when ``show``; shared with ``smig demo``."""
    if not show:
        return await live_migrate(src, dst, name, params, port=port)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bar:
        task = bar.add_task(f"migrating {name}", total=None, detail="")

        def update(p: MigrationProgress) -> None:
            total = max(p.total_bytes, p.transferred_bytes + p.remaining_bytes) or None
            dirty = p.dirty_rate_bytes / (1 << 20)
            detail = f"{p.status.value}, pass {p.iterations}, dirty {dirty:.0f} MiB/s"
            if p.expected_downtime_ms is not None:
                detail += f", expected downtime {p.expected_downtime_ms} ms"
            bar.update(task, completed=p.transferred_bytes, total=total, detail=detail)

        return await live_migrate(src, dst, name, params, on_progress=update, port=port)


def _parse_bandwidth(text: str) -> float | None:
    if text == "auto":
        return None
    if text == "unlimited":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--bandwidth {text!r}: give MiB/s, 'unlimited' or 'auto'") from None
    if value <= 0:
        raise ConfigError("--bandwidth must be positive (or 'unlimited')")
    return value


def _stats_json(stats: MigrationStats) -> dict[str, Any]:
    return {
        "name": stats.vm,
        "total_ms": stats.total_ms,
        "downtime_ms": stats.downtime_ms,
        "setup_ms": stats.setup_ms,
        "transferred_bytes": stats.transferred_bytes,
        "iterations": stats.iterations,
        "throughput_mbps": round(stats.throughput_mbps, 1),
        "source_pid": stats.source_pid,
        "target_pid": stats.target_pid,
        "transport": stats.transport.value,
        "tls": stats.tls,
        "uri": stats.uri,
    }


@app.command()
def stop(name: str = typer.Argument(..., help="The VM."), as_json: bool = JSON) -> None:
    """Stop a VM and remove its runtime files."""

    async def body() -> None:
        await driver().stop(name)
        if as_json:
            emit_json({"name": name, "stopped": True})
        else:
            out.print(f"{name} stopped")

    run(body)

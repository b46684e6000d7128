"""``smig lab``: a whole region on this machine — up, status, attack, heal, down."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from smig.cli.common import emit_json, err, fail, out
from smig.errors import SmigError

app = typer.Typer(
    help=(
        "A region on one machine: each host a network namespace with its own address on a bridge, "
        "the RC-TCB in its own, an agent per host, real QEMU guests, live migrations across the virtual network.\n\n"
        "  smig lab up --hosts 4 --vms-per-host 2\n\n"
        "  smig lab status\n\n"
        "  smig lab attack h2 patch          # watch h2 turn UNTRUSTED and its VMs move\n\n"
        "  smig lab heal\n\n"
        "  smig lab down                     # also after a crash: reclaims every process and namespace"
    ),
    no_args_is_help=True,
)

NAME = typer.Option("lab", "--name", help="The lab's name (1-8 lower-case letters or digits).")
JSON = typer.Option(False, "--json", help="Print JSON on stdout.")


@app.command("up")
def up(
    hosts: int = typer.Option(4, "--hosts", min=2, max=16, help="Hypervisor hosts."),
    vms_per_host: int = typer.Option(1, "--vms-per-host", min=0, max=8, help="Guests booted on each host."),
    memory: int | None = typer.Option(None, "--memory", "-m", help="Guest RAM in MiB [default: 256; Xen: 96]."),
    dirty_mbps: int = typer.Option(0, "--dirty-mbps", help="MiB each guest dirties per second."),
    policy: str = typer.Option("quorum", "--policy", help="quorum (two monitors must agree) or immediate."),
    interval: float = typer.Option(1.0, "--interval", help="Mean seconds between a monitor's measurements."),
    link: str | None = typer.Option(
        None,
        "--link",
        help="Model each host's link: a rate such as 1gbit (tc tbf; this kernel has no netem, so no delay).",
    ),
    network: str = typer.Option(
        "auto", "--network", help="netns (a namespace per host), loopback (one address each here), or auto."
    ),
    hypervisor: str = typer.Option(
        "qemu",
        "--hypervisor",
        help="qemu (each host runs its guests in QEMU) or xen (each host is a nested Xen host: the agent in "
        "its dom0, its monitor outside it; slow under TCG, minutes to come up).",
    ),
    name: str = NAME,
    as_json: bool = JSON,
) -> None:
    """Bring a region up and wait until every host is TRUSTED (verified by its neighbours) and every
    guest is in the IVT. On failure, everything made is taken down again."""
    from smig.lab import region, xen_region

    started = time.monotonic()

    def progress(line: str) -> None:
        if not as_json:
            err.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}")

    try:
        state = region.up(
            name,
            hosts,
            vms_per_host,
            memory_mib=memory or (xen_region.GUEST_MIB if hypervisor == "xen" else 256),
            dirty_mbps=dirty_mbps,
            policy=policy,
            interval_s=interval,
            link=link,
            network=network,
            hypervisor=hypervisor,
            progress=progress,
        )
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(_status(state))
    else:
        _print_status(_status(state))
        out.print(f"lab {name} is up in {time.monotonic() - started:.0f} s; `smig lab down` takes it away")


def _status(state: Any) -> dict[str, Any]:
    from smig.lab import net, region

    async def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with region.operator_client(state) as op:
            rows = {h["host"]: h for h in (await op.get("/v1/hosts")).json()["hosts"]}
            vms = (await op.get("/v1/vms")).json()["vms"]
            return rows, vms

    try:
        rows, vms = region.inside(state, read)
        reachable = True
    except Exception:  # the RC-TCB is down: say what the lab itself knows
        rows, vms, reachable = {}, [], False
    network = state.network
    hosts = []
    for host in state.hosts:
        row = rows.get(host, {})
        hosts.append(
            {
                "id": host,
                "state": row.get("state", "unknown"),
                "address": network.hosts[host].address,
                "verified_at": row.get("verified_at"),
                "strikes": row.get("strikes", 0),
                "vms": sorted(v["name"] for v in vms if v["host"] == host),
            }
        )
    return {
        "lab": state.lab,
        "rctcb": {"address": network.rctcb.address, "reachable": reachable},
        "policy": state.policy,
        "link": state.link,
        "network": state.mode,
        "hypervisor": state.hypervisor,
        "hosts": hosts,
        "vms": [{"name": v["name"], "host": v["host"]} for v in vms],
        "attacks": state.attacks,
        "namespaces": state.lab in net.list_labs(),
    }


def _print_status(status: dict[str, Any]) -> None:
    colours = {"trusted": "green", "suspect": "yellow", "untrusted": "red", "unknown": "magenta"}
    table = Table(title=f"lab {status['lab']} · RC-TCB {status['rctcb']['address']} · policy {status['policy']}")
    for column in ("host", "address", "state", "verified", "strikes", "VMs"):
        table.add_column(column)
    now = time.time()
    for h in status["hosts"]:
        colour = colours.get(h["state"], "white")
        verified = f"{now - h['verified_at']:.1f}s ago" if h["verified_at"] else "-"
        table.add_row(
            h["id"],
            h["address"],
            f"[{colour}]{h['state']}[/{colour}]",
            verified,
            str(h["strikes"]),
            ", ".join(h["vms"]),
        )
    out.print(table)
    if not status["rctcb"]["reachable"]:
        out.print("[red]the RC-TCB does not answer[/red]")
    for a in status["attacks"]:
        out.print(f"attack {a['id']}: {a['kind']} on {a.get('host', '?')} ({a['path']} at {a['offset']:#x})")


@app.command("status")
def status(name: str = NAME, as_json: bool = JSON) -> None:
    """The region: each host's trust state and VMs, as the RC-TCB's IVT has them."""
    from smig.lab import region

    try:
        state = region.load(name)
    except SmigError as e:
        fail(str(e))
    data = _status(state)
    if as_json:
        emit_json(data)
    else:
        _print_status(data)


@app.command("attack")
def attack(
    host: str = typer.Argument(..., help="The host to attack, e.g. h2."),
    kind: str = typer.Argument(
        "patch",
        help="patch, patch-lib, anon-exec, swap-binary, preload, lie (a lying monitor) or ignore-orders; "
        "in a Xen lab, xen-code (a byte of Xen's own code, from outside the host) or xen-toolstack "
        "(a byte of dom0's xenstored's code, the same way).",
    ),
    transient_ms: int | None = typer.Option(
        None, "--transient-ms", min=1, help="patch/patch-lib only: restore the bytes after this many ms."
    ),
    name: str = NAME,
    as_json: bool = JSON,
) -> None:
    """Tamper with one host's hypervisor; `smig lab heal` undoes it."""
    from smig.lab import region
    from smig.lab.host_attacks import attack_host

    try:
        state = region.load(name)
        record = attack_host(state, host, kind, transient_ms=transient_ms)
    except SmigError as e:
        fail(str(e))
    entry = {**record.to_json(), "host": host}
    state.attacks.append(entry)
    state.save()
    if as_json:
        emit_json(entry)
    else:
        out.print(f"{kind} on {host}: {record.path} at {record.offset:#x} (+{record.length}) in process {record.pid}")


@app.command("heal")
def heal(name: str = NAME, as_json: bool = JSON) -> None:
    """Undo every attack made in this lab (a host already UNTRUSTED stays so until re-enrolled)."""
    from smig.lab import region
    from smig.lab.attacks import AttackRecord
    from smig.lab.host_attacks import heal_record

    try:
        state = region.load(name)
    except SmigError as e:
        fail(str(e))
    done = []
    kept = []  # what could not be undone stays on the record, for another heal or for `down`
    for entry in state.attacks:
        record = AttackRecord.from_json({k: v for k, v in entry.items() if k != "host"})
        try:
            done.append({"id": record.id, "undone": heal_record(record, state)})
        except SmigError as e:
            done.append({"id": record.id, "error": str(e)})
            kept.append(entry)
    state.attacks = kept
    state.save()
    if as_json:
        emit_json({"healed": done})
    else:
        for d in done:
            out.print(f"{d['id']}: {d.get('undone') or d.get('error')}")
        if not done:
            out.print("no attacks to undo")


@app.command("down")
def down(name: str = NAME, as_json: bool = JSON) -> None:
    """End every process of the lab and remove its namespaces, interfaces and files (also after a crash)."""
    from smig.lab import region

    try:
        reclaimed = region.down(name)
    except SmigError as e:
        fail(str(e))
    data = {
        "lab": name,
        "namespaces": list(reclaimed.namespaces),
        "processes": list(reclaimed.pids),
        "survivors": list(reclaimed.survivors),
    }
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"lab {name}: ended {len(reclaimed.pids)} process(es), removed {len(reclaimed.namespaces)} namespace(s)"
            if reclaimed.found
            else f"lab {name}: nothing left to remove"
        )

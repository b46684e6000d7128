"""The whole region on this machine, end to end, on real parts: network namespaces, the RC-TCB and
an agent per host as separate processes, real TCG guests, real TLS live migrations across the
lab's bridge. Slow by nature (each lab boots real guests): kept to two labs.

1. ``smig demo`` as a user runs it: a host's QEMU code is patched; the host ends UNTRUSTED and its
   VM runs, live (same boot id, heartbeat still rising), exactly once, on a trusted host; the
   other hosts stay TRUSTED; ``smig lab down`` leaves nothing behind.
2. One lab, the hard cases in turn: a lying monitor (quorum: no migration; the liar is struck and
   turns SUSPECT); a source whose agent ignores every order (fenced out of band, restarted cold
   on a trusted host); an agent and then the RC-TCB killed (SIGKILL) in the middle of an
   evacuation, and restarted: it completes, each VM once.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smig.aim import procfs
from smig.lab import net, region
from smig.lab.host_attacks import attack_host, heal_record
from smig.lab.region import LabState

pytestmark = pytest.mark.qemu

SMIG = str(Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "smig")
if not Path(SMIG).exists():
    SMIG = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "smig")


def _vm_processes(lab: str, vm: str) -> dict[str, int]:
    """Which of the lab's hosts run a QEMU process of ``vm`` (host → count), read from /proc: a
    VM's QEMU runs from ``.../lab/LAB/hosts/HOST/vms/VM/``, in either kind of lab network."""
    found: dict[str, int] = {}
    pattern = re.compile(rf"/lab/{lab}/hosts/([a-z0-9-]+)/vms/{re.escape(vm)}/".encode())
    for pid in procfs.hypervisor_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        hosts = set(pattern.findall(cmdline))
        for host in hosts:
            found[host.decode()] = found.get(host.decode(), 0) + 1
    return found


def _status(env: dict[str, str], lab: str) -> dict[str, Any]:
    done = subprocess.run([SMIG, "lab", "status", "--name", lab, "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def _down(env: dict[str, str], lab: str) -> None:
    subprocess.run([SMIG, "lab", "down", "--name", lab], env=env, capture_output=True, timeout=60)
    assert lab not in net.list_labs()


@pytest.mark.parametrize("network", ["netns", "loopback"])
def test_the_demo_moves_a_tampered_hosts_vm_live_to_a_trusted_host(
    cli_env: dict[str, str], tmp_path: Path, network: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMIG_HOME", cli_env["SMIG_HOME"])  # region.load reads it, as the CLI does
    lab = f"e2ed{network[0]}"
    out = tmp_path / "demo.json"
    argv = [SMIG, "demo", "--hosts", "3", "--vms-per-host", "1", "--memory", "128", "--dirty-mbps", "5"]
    argv += ["--attack", "patch", "--policy", "quorum", "--json", str(out), "--name", lab, "--keep"]
    argv += ["--network", network, "--report", str(tmp_path / "report")]
    try:
        done = subprocess.run(argv, env=cli_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"demo failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        result = json.loads(out.read_text())
        attacked = result["attacked_host"]
        states = {h["id"]: h["state"] for h in result["hosts"]}
        assert states[attacked] == "untrusted"
        assert all(s == "trusted" for h, s in states.items() if h != attacked), states
        assert len(result["vms"]) == 1 and result["response_time_ms"] > 0
        (vm,) = result["vms"]
        assert vm["source"] == attacked and vm["target"] not in (None, attacked) and states[vm["target"]] == "trusted"
        assert vm["mode"] == "live"
        assert vm["boot_id_before"] == vm["boot_id_after"] is not None
        assert vm["heartbeat_after"] > vm["heartbeat_before"]
        times = [vm[k] for k in ("tamper_at", "detected_at", "untrusted_at", "decided_at")]
        times += [vm["migration_started_at"], vm["migration_completed_at"]]
        assert times == sorted(times), times
        assert vm["downtime_ms"] is not None and vm["downtime_ms"] < 5000
        # Exactly once, where the IVT says, and nothing placed on the tampered host afterwards.
        status = _status(cli_env, lab)
        assert {v["name"]: v["host"] for v in status["vms"]}[vm["name"]] == vm["target"]
        assert _vm_processes(lab, vm["name"]) == {vm["target"]: 1}
        others = [h for h in status["hosts"] if h["id"] == attacked]
        assert others[0]["vms"] == [] and status["network"] == network
        # The healthy hosts stayed TRUSTED throughout, by the RC-TCB's own record.
        state = region.load(lab)
        entries = region.inside(state, lambda: _api(state, "GET", "/v1/audit?limit=10000"))["entries"]
        changes = [(e["subject"], e["body"]["new"]) for e in entries if e["kind"] == "trust.changed"]
        assert changes and all(host == attacked for host, _ in changes), changes
        assert "response.png" in (tmp_path / "report" / "index.html").read_text()
    finally:
        _down(cli_env, lab)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{net.PREFIX}{lab}-")]
    assert not (Path(cli_env["SMIG_HOME"]) / "lab" / lab).exists()


# -- the hard cases, in one lab ------------------------------------------------------------------


@pytest.fixture
def lab(cli_env: dict[str, str]) -> Iterator[LabState]:
    os.environ["SMIG_HOME"] = cli_env["SMIG_HOME"]  # region.* reads it, as the CLI would
    name = "e2eh"
    try:
        yield region.up(name, 4, 1, memory_mib=128, dirty_mbps=5, policy="quorum", vm_hosts=["h1", "h2"])
    finally:
        region.down(name)
        os.environ.pop("SMIG_HOME", None)


async def _api(state: LabState, method: str, path: str) -> Any:
    async with region.operator_client(state) as op:
        r = await op.request(method, path)
        r.raise_for_status()
        return r.json()


def api(state: LabState, path: str) -> Any:
    return region.inside(state, lambda: _api(state, "GET", path))


def until(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def rows(state: LabState) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in api(state, "/v1/hosts")["hosts"]}


def placed(state: LabState) -> dict[str, str]:
    return {v["name"]: v["host"] for v in api(state, "/v1/vms")["vms"]}


def orders(state: LabState) -> list[dict[str, Any]]:
    return list(api(state, "/v1/migrations?all=true")["orders"])


def landed(state: LabState, vm: str) -> dict[str, Any] | None:
    return next((o for o in orders(state) if o["vm"]["name"] == vm and o["state"] in ("done", "failed")), None)


def test_lying_monitor_refusing_source_and_crashes_mid_evacuation(lab: LabState) -> None:
    state = lab
    assert placed(state) == {"h1-vm1": "h1", "h2-vm1": "h2"}

    # 1. A lying monitor, under the quorum policy: nothing moves, the liar is struck, then SUSPECT.
    lie = attack_host(state, "h4", "lie")
    until("the liar to turn suspect", lambda: rows(state)["h4"]["state"] == "suspect", 60)
    assert rows(state)["h4"]["strikes"] >= 1
    assert orders(state) == [], "a lie moved a VM"
    assert all(rows(state)[h]["state"] == "trusted" for h in ("h1", "h2", "h3"))
    heal_record(lie, state)
    # A struck monitor stays SUSPECT (a match about its code does not restore its word) until the
    # operator, having dealt with it, re-enrols it; then a neighbour's match makes it TRUSTED.
    time.sleep(3.0)
    assert rows(state)["h4"]["state"] == "suspect"
    region.inside(state, lambda: _api(state, "POST", "/v1/hosts/h4/reenrol"))
    until("h4 to be trusted again", lambda: rows(state)["h4"]["state"] == "trusted", 60)

    # 2. A source whose agent ignores orders: fenced out of band and restarted on a trusted host.
    attack_host(state, "h1", "ignore-orders")
    time.sleep(1.0)
    attack_host(state, "h1", "patch")
    order = until("h1's VM to land", lambda: landed(state, "h1-vm1"), 240)
    assert order["state"] == "done" and order["target"] in ("h2", "h3"), order
    assert rows(state)["h1"]["state"] == "untrusted"
    assert _vm_processes(state.lab, "h1-vm1") == {order["target"]: 1}
    assert placed(state)["h1-vm1"] == order["target"]

    # 3. h2 tampered; its target's agent and then the RC-TCB are killed mid-evacuation.
    attack_host(state, "h2", "patch")
    moving = until(
        "h2's VM to start moving",
        lambda: next((o for o in orders(state) if o["vm"]["name"] == "h2-vm1" and o["state"] != "planned"), None),
        60,
        0.1,
    )
    assert moving["state"] != "failed" and moving["target"], moving
    target = moving["target"]
    region.stop_process(state, f"agent-{target}", signal.SIGKILL)
    region.start_agent(state, target)
    region.stop_process(state, "rctcb", signal.SIGKILL)
    region.start_rctcb(state)
    state.save()

    async def wait_up() -> None:
        await region._wait_rctcb(state, 30)

    region.inside(state, wait_up)
    order = until("h2's VM to land after the crashes", lambda: landed(state, "h2-vm1"), 240)
    assert order["state"] == "done", order
    where = _vm_processes(state.lab, "h2-vm1")
    assert where == {order["target"]: 1}, where
    assert rows(state)[order["target"]]["state"] == "trusted"
    # Nothing lost, nothing twice: each VM once in the IVT, on the host that runs it.
    assert placed(state) == {"h1-vm1": _only(_vm_processes(state.lab, "h1-vm1")), "h2-vm1": order["target"]}
    verify = api(state, "/v1/audit/verify")
    assert verify["valid"], verify


def _only(where: dict[str, int]) -> str:
    assert list(where.values()) == [1], where
    return next(iter(where))


@pytest.fixture
def wide_lab(cli_env: dict[str, str]) -> Iterator[LabState]:
    os.environ["SMIG_HOME"] = cli_env["SMIG_HOME"]
    name = "e2ek"
    try:
        yield region.up(name, 6, 1, memory_mib=128, dirty_mbps=5, policy="quorum", vm_hosts=["h1", "h2", "h3", "h4"])
    finally:
        region.down(name)
        os.environ.pop("SMIG_HOME", None)


def _all_on(state: LabState, hosts: tuple[str, ...]) -> bool:
    return all(h in hosts for h in placed(state).values()) and not any(
        o["state"] not in ("done", "failed") for o in orders(state)
    )


def _is_untrusted(state: LabState, host: str) -> bool:
    return bool(rows(state)[host]["state"] == "untrusted")


def test_every_attack_kind_turns_its_host_untrusted_and_its_vm_moves_live(wide_lab: LabState) -> None:
    from smig.lab.demo import current_beat

    state = wide_lab
    kinds = {"h1": "patch-lib", "h2": "anon-exec", "h3": "swap-binary", "h4": "preload"}
    before = {vm: current_beat(state, vm) for vm in state.vms}
    assert all(b is not None for b in before.values())
    for host, kind in kinds.items():
        attack_host(state, host, kind)
        until(f"{host} ({kind}) to turn untrusted", functools.partial(_is_untrusted, state, host), 60)
        vm = f"{host}-vm1"
        order = until(f"{vm} to land", functools.partial(landed, state, vm), 120)
        assert order["state"] == "done", (kind, order)
    # A VM that landed on a host attacked later moves again: wait for the last of those moves.
    until("every VM on h5 or h6", functools.partial(_all_on, state, ("h5", "h6")), 120)
    states = {h: r["state"] for h, r in rows(state).items()}
    assert states == {"h1": "untrusted", "h2": "untrusted", "h3": "untrusted", "h4": "untrusted",
                      "h5": "trusted", "h6": "trusted"}, states  # fmt: skip
    where = placed(state)
    for vm, first in before.items():
        assert where[vm] in ("h5", "h6"), (vm, where)
        assert _vm_processes(state.lab, vm) == {where[vm]: 1}, vm
        now = until(f"{vm}'s heartbeat", functools.partial(current_beat, state, vm), 10)
        assert first is not None and now.boot_id == first.boot_id and now.counter > first.counter, (vm, first, now)

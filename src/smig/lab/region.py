"""A whole region on one machine: the RC-TCB, N hosts with their agents, M real guests on each.

``smig lab up`` builds it in this order, each step on real parts:

1. the network (:mod:`smig.lab.net`): a namespace per host and one for the RC-TCB, on a bridge;
2. the region's credentials: a CA, certificates for the RC-TCB, each agent (for its address) and
   the operator; an Ed25519 signing key per agent; a reference manifest built from the installed
   QEMU, signed with the lab's reference key;
3. the RC-TCB (``smig rctcb serve``) inside its namespace; the operator enrols every host,
   vouching for it (they are freshly set up from the approved reference);
4. an agent per host (``smig agent run``) inside the host's namespace;
5. the guests (``smig vm launch``) inside their hosts' namespaces, so they are the hosts'
   hypervisor processes that neighbours measure and that migrate across the bridge;
6. wait until every host is TRUSTED, verified by its neighbours, and every guest is in the IVT.

Everything lives under ``$SMIG_HOME/lab/<name>``; the processes are in the lab's namespaces, so
``smig lab down`` (:func:`down`) finds and ends all of them from the namespaces alone, also after a
crash, then removes the namespaces and the directory. The operator's side talks to the RC-TCB from
inside the RC-TCB's namespace (:mod:`smig.lab.inside`): the lab's addresses exist nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from smig.aim import procfs
from smig.aim.keys import load_private_key, public_key_pem
from smig.errors import ConfigError, SmigError
from smig.hypervisor import process
from smig.lab import net, xen_region
from smig.lab.inside import run_inside
from smig.lab.lab_config import AGENT_PORT, RCTCB_PORT, agent_config, make_credentials, rctcb_config
from smig.paths import smig_cache, smig_home
from smig.rctcb.ca import client_ssl_context

log = logging.getLogger(__name__)

STATE = "lab.json"
# Where network namespaces cannot be made: every part on this machine's loopback, one address each.
LOOPBACK_SUBNET = "127.77.0.0/24"
NETWORK_ENV = "SMIG_LAB_NETWORK"  # auto (default), netns or loopback


class LabStateError(SmigError):
    """The lab is not up, is up already, or its state cannot be read."""


@dataclass
class LabState:
    """What ``lab up`` made, as ``lab.json`` records it."""

    lab: str
    directory: str
    hosts: list[str]
    subnet: str
    policy: str
    interval_s: float
    link: str | None
    vms: dict[str, str] = field(default_factory=dict)  # VM → the host it was launched on
    pids: dict[str, int] = field(default_factory=dict)  # "rctcb", "agent-h1", ...
    attacks: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    manifest: str = ""
    mode: str = "netns"  # or "loopback": no namespaces, hosts told apart by address and directory
    hypervisor: str = "qemu"  # or "xen": nested Xen hosts (smig.lab.xen_region)

    @property
    def loopback(self) -> bool:
        return self.mode == "loopback"

    def netns_of(self, node: net.Node) -> str | None:
        return None if self.loopback else node.netns

    @property
    def path(self) -> Path:
        return Path(self.directory)

    @property
    def network(self) -> net.LabNetwork:
        return net.plan_network(self.lab, self.hosts, self.subnet)

    @property
    def rctcb_url(self) -> str:
        return f"https://{self.network.rctcb.address}:{RCTCB_PORT}"

    def host_home(self, host: str) -> Path:
        return self.path / "hosts" / host

    def save(self) -> None:
        tmp = self.path / f".{STATE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, self.path / STATE)


def lab_dir(lab: str) -> Path:
    return smig_home() / "lab" / lab


def load(lab: str) -> LabState:
    """The state of a lab that is up. Raises LabStateError."""
    path = lab_dir(lab) / STATE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabStateError(f"no lab {lab!r} is up (start one with `smig lab up`)") from None
    except (OSError, ValueError) as e:
        raise LabStateError(f"cannot read the lab's state {path}: {e}") from e
    return LabState(**data)


def _smig(*args: str) -> list[str]:
    return [sys.executable, "-m", "smig", *args]


def _spawn(netns: str | None, argv: list[str], log_file: Path, env: dict[str, str]) -> int:
    """Start a long-running process in ``netns`` (None: here), detached from this one (its own session)."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            net.netns_argv(netns, argv) if netns else argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    return proc.pid


# -- the operator's client (use inside the RC-TCB's namespace) ----------------------------------


def operator_client(state: LabState, *, timeout_s: float = 10.0) -> httpx.AsyncClient:
    ca = state.path / "ca"
    ctx = client_ssl_context(
        ca / "issued" / "operator" / "cert.pem", ca / "issued" / "operator" / "key.pem", ca / "ca.pem"
    )
    return httpx.AsyncClient(base_url=state.rctcb_url, verify=ctx, timeout=timeout_s)


def inside(state: LabState, main: Callable[[], Any]) -> Any:
    """Run ``main()`` (a coroutine function) where the lab's addresses are reachable."""
    if state.loopback:
        return asyncio.run(main())
    return run_inside(state.network.rctcb.netns_path, main)


def hypervisor_pids(state: LabState, host: str) -> list[int]:
    """``host``'s hypervisor processes: those in its namespace, or run from its directory."""
    if state.loopback:
        return procfs.hypervisor_pids(cmdline_contains=f"{state.host_home(host)}/")
    return procfs.hypervisor_pids(state.network.hosts[host].netns_path)


async def _wait_rctcb(state: LabState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with operator_client(state, timeout_s=2.0) as op:
        while True:
            try:
                if (await op.get("/v1/hosts")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise LabStateError(
                    f"the RC-TCB did not answer within {timeout_s:.0f} s; see {state.path / 'rctcb.log'}"
                )
            await asyncio.sleep(0.2)


async def _enrol_all(state: LabState) -> None:
    xen = state.hypervisor == "xen"
    async with operator_client(state) as op:
        for host, node in state.network.hosts.items():
            key = public_key_pem(_agent_key(state, host)).decode()
            body = {
                "host": host,
                "agent_key": key,
                "manifest": state.manifest,
                "capacity": {"vcpus": 4, "memory_mib": xen_region.GUEST_CAPACITY_MIB if xen else 4096},
                "region": f"lab-{state.lab}",
                "address": f"https://{node.address}:{AGENT_PORT}",
                "vouched": True,  # freshly set up from the approved reference: the region's first hosts
            }
            r = await op.post("/v1/hosts", json=body)
            if r.status_code not in (201, 409):
                raise LabStateError(f"enrolling {host} failed: {r.status_code} {r.text}")


def _agent_key(state: LabState, host: str) -> Any:
    return load_private_key(state.host_home(host) / "agent-key.pem")


async def wait_ready(state: LabState, timeout_s: float, progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Until every host is TRUSTED and verified by a neighbour, and every VM is in the IVT."""
    deadline = time.monotonic() + timeout_s
    said = ""
    async with operator_client(state) as op:
        while True:
            try:
                hosts = {h["host"]: h for h in (await op.get("/v1/hosts")).json()["hosts"]}
                placed = {v["name"] for v in (await op.get("/v1/vms")).json()["vms"]}
            except (httpx.TransportError, KeyError, ValueError):
                hosts, placed = {}, set()
            waiting = [
                h for h in state.hosts if hosts.get(h, {}).get("state") != "trusted" or not hosts[h].get("verified_at")
            ]
            unplaced = [vm for vm in state.vms if vm not in placed]
            if not waiting and not unplaced:
                return hosts
            now = f"waiting for {', '.join(waiting) or 'no host'} to be verified, {len(unplaced)} VM(s) to be reported"
            if now != said:
                progress(now)
                said = now
            if time.monotonic() > deadline:
                raise LabStateError(f"the region was not ready within {timeout_s:.0f} s: {now}; see {state.path}/*.log")
            await asyncio.sleep(0.5)


# -- up and down ---------------------------------------------------------------------------------


def up(
    lab: str,
    hosts: int,
    vms_per_host: int,
    *,
    memory_mib: int = 256,
    dirty_mbps: int = 0,
    policy: str = "quorum",
    interval_s: float = 1.0,
    link: str | None = None,
    vm_hosts: Sequence[str] | None = None,
    network: str | None = None,
    ready_timeout_s: float = 240.0,
    hypervisor: str = "qemu",
    progress: Callable[[str], None] = lambda _: None,
) -> LabState:
    """Bring a lab up and wait until it is ready; on any failure, take down what was made.

    ``vm_hosts`` limits the guests to those hosts (default: every host). ``hypervisor="xen"``:
    the hosts are nested Xen hosts (:mod:`smig.lab.xen_region`). Raises LabStateError,
    ConfigError, LabError, LaunchError, ImageError."""
    if hypervisor not in ("qemu", "xen"):
        raise ConfigError(f"--hypervisor must be qemu or xen, not {hypervisor!r}")
    if hypervisor == "xen":
        xen_region.python_ok()
        xen_region.images()  # both built by the setup, or a clear error before anything starts
    if hosts < 2:
        raise ConfigError("a region needs at least 2 hosts: each is measured by its neighbours")
    if policy not in ("quorum", "immediate"):
        raise ConfigError(f"--policy must be quorum or immediate, not {policy!r}")
    names = [f"h{i}" for i in range(1, hosts + 1)]
    link_model = net.parse_link(link) if link else None
    directory = lab_dir(lab)
    if lab in net.list_labs() or (directory / STATE).exists():
        raise LabStateError(f"lab {lab!r} is up already (or was not taken down): run `smig lab down --name {lab}`")
    mode = _network_mode(network or os.environ.get(NETWORK_ENV, "auto"), progress)
    if mode == "loopback" and hypervisor == "xen":
        raise ConfigError("nested Xen hosts need network namespaces: their dom0s sit on the lab's bridge")
    if mode == "loopback" and link_model is not None:
        raise ConfigError("--link needs network namespaces (a tc rate limit on loopback would slow this whole machine)")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    subnet = LOOPBACK_SUBNET if mode == "loopback" else net.DEFAULT_SUBNET
    state = LabState(
        lab, str(directory), names, subnet, policy, interval_s, link, created_at=time.time(), mode=mode,
        hypervisor=hypervisor,
    )  # fmt: skip
    try:
        if state.loopback:
            progress(f"network: loopback, the RC-TCB on {state.network.rctcb.address} and a host on each next address")
        else:
            progress(
                f"network: {hosts} host namespaces and the RC-TCB's on a bridge"
                + (f", {link_model}" if link_model else "")
            )
            net.create(state.network, link=link_model)
        progress("credentials: region CA, certificates, agent keys, reference manifest")
        make_credentials(state)
        (directory / "rctcb").mkdir()
        (directory / "rctcb.toml").write_text(rctcb_config(state))
        start_rctcb(state)
        state.save()
        progress("RC-TCB starting")

        async def enrol() -> None:
            await _wait_rctcb(state, 30)
            await _enrol_all(state)

        targets = list(vm_hosts) if vm_hosts is not None else names
        wanted = [(h, f"{h}-vm{i}") for h in targets for i in range(1, vms_per_host + 1)]
        if hypervisor == "xen":
            xen_region.up_hosts(
                state,
                wanted,
                memory_mib,
                dirty_mbps,
                progress,
                enrol=lambda: inside(state, enrol),
                spawn_monitor=lambda host: _spawn_monitor(state, host),
            )
        else:
            progress("enrolling the hosts")
            inside(state, enrol)
            for host in names:
                start_agent(state, host)
            state.save()
            if wanted:
                progress(f"booting {len(wanted)} guests ({memory_mib} MiB, dirtying {dirty_mbps} MiB/s)")
            with ThreadPoolExecutor(max_workers=4) as pool:
                booted = pool.map(lambda hv: launch_vm(state, hv[0], hv[1], memory_mib, dirty_mbps), wanted)
                for (host, _), vm in zip(wanted, booted, strict=True):
                    state.vms[vm] = host
        state.save()
        timeout_s = ready_timeout_s if hypervisor == "qemu" else max(ready_timeout_s, 600.0)
        try:
            inside(state, lambda: wait_ready(state, timeout_s, progress))
        except LabStateError as e:
            if hypervisor == "xen":
                tails = {h: asyncio.run(xen_region.dom0_log(state, h, 8)) for h in names}
                raise LabStateError(f"{e}; the agents in dom0 said: {tails}") from e
            raise
        return state
    except BaseException:
        down(lab)
        raise


def _spawn_monitor(state: LabState, host: str) -> int:
    """A Xen host's monitor, beside it in its node's namespace (not in its dom0)."""
    home = state.host_home(host)
    return _spawn(
        state.netns_of(state.network.hosts[host]),
        _smig("agent", "run", "--config", str(home / "monitor.toml")),
        state.path / f"monitor-{host}.log",
        {"SMIG_HOME": str(home), "SMIG_CACHE": str(smig_cache())},
    )


def _network_mode(asked: str, progress: Callable[[str], None]) -> str:
    if asked not in ("auto", "netns", "loopback"):
        raise ConfigError(f"the lab's network is auto, netns or loopback, not {asked!r}")
    if asked == "loopback":
        return asked
    ok, why = net.available()
    if ok:
        return "netns"
    if asked == "netns":
        raise LabStateError(f"network namespaces are not available here: {why}")
    progress(
        f"network namespaces are not available here ({why}): falling back to loopback addresses "
        f"({LOOPBACK_SUBNET}); every host then shares this machine's network, and no link model applies"
    )
    return "loopback"


def start_agent(state: LabState, host: str, *, lie_about: Sequence[str] = (), ignore_orders: bool = False) -> int:
    """Start ``host``'s agent (after :func:`stop_process` of the old one, to restart it); with
    ``lie_about``/``ignore_orders`` it is the lab's compromised agent. Returns its pid."""
    home = state.host_home(host)
    config = agent_config(state, host, lie_about=lie_about, ignore_orders=ignore_orders)
    (home / "agent.toml").write_text(config)
    pid = _spawn(
        state.netns_of(state.network.hosts[host]),
        _smig("agent", "run", "--config", str(home / "agent.toml")),
        state.path / f"agent-{host}.log",
        {"SMIG_HOME": str(home), "SMIG_CACHE": str(smig_cache())},
    )
    state.pids[f"agent-{host}"] = pid
    return pid


def start_rctcb(state: LabState) -> int:
    """Start the RC-TCB in its namespace (again, after a crash: it resumes from its store)."""
    env = {"SMIG_HOME": str(state.path / "rctcb"), "SMIG_CACHE": str(smig_cache())}
    pid = _spawn(
        state.netns_of(state.network.rctcb),
        _smig("rctcb", "serve", "--config", str(state.path / "rctcb.toml")),
        state.path / "rctcb.log",
        env,
    )
    state.pids["rctcb"] = pid
    return pid


def stop_process(state: LabState, name: str, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Signal one of the lab's own processes (``"rctcb"``, ``"agent-h1"``) and wait until it is gone."""
    pid = state.pids.get(name)
    if pid is None:
        raise LabStateError(f"the lab has no process {name!r} ({', '.join(sorted(state.pids))})")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it
            if done:
                return
        except ChildProcessError:  # not our child (another `smig lab` started it)
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)
    raise LabStateError(f"{name} (pid {pid}) did not stop within {timeout_s:.0f} s")


def launch_vm(state: LabState, host: str, name: str, memory_mib: int, dirty_mbps: int) -> str:
    """Boot a guest on ``host`` (inside its namespace, in its agent's home). Raises LaunchError."""
    from smig.errors import LaunchError

    argv = _smig("vm", "launch", name, "--memory", str(memory_mib), "--dirty-mbps", str(dirty_mbps), "--json")
    env = {**os.environ, "SMIG_HOME": str(state.host_home(host)), "SMIG_CACHE": str(smig_cache())}
    r = subprocess.run(
        net.netns_argv(state.network.hosts[host].netns, argv) if not state.loopback else argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    if r.returncode != 0:
        raise LaunchError(f"booting {name} on {host} failed: {r.stderr.strip() or r.stdout.strip()}")
    return name


def down(lab: str) -> net.Reclaimed:
    """End every process of the lab, remove its namespaces and its directory. Idempotent."""
    reclaimed = net.reclaim(lab)
    directory = lab_dir(lab)
    swept = _sweep(directory)
    if swept:
        reclaimed = dataclasses.replace(reclaimed, pids=tuple(sorted({*reclaimed.pids, *swept})))
    state_file = directory / STATE
    if state_file.exists():
        try:
            state = load(lab)
            for attack in state.attacks:
                _undo_quietly(attack)
        except SmigError as e:
            log.warning("the lab's state could not be read while taking it down: %s", e)
    shutil.rmtree(directory, ignore_errors=True)
    return reclaimed


def _sweep(directory: Path, term_timeout_s: float = 3.0) -> list[int]:
    """End every process run from ``directory`` (the loopback lab's, or any a crash left outside
    the namespaces): SIGTERM, then SIGKILL. Never this process."""
    needle = str(directory).encode() + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(needle in arg for arg in argv):
            found.append(int(entry.name))
    for sig, wait in ((signal.SIGTERM, term_timeout_s), (signal.SIGKILL, 5.0)):
        alive = [pid for pid in found if process.alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(process.alive(pid) for pid in alive):
            time.sleep(0.05)
    return found


def _undo_quietly(record: dict[str, Any]) -> None:
    from smig.lab import attacks
    from smig.lab.host_attacks import heal_record

    try:
        heal_record(attacks.AttackRecord.from_json({k: v for k, v in record.items() if k != "host"}))
    except SmigError as e:
        log.info("undoing %s: %s", record.get("id"), e)

"""The parts of a lab whose hosts are nested Xen hosts (``smig lab up --hypervisor xen``).

Each host is a nested Xen host (:mod:`smig.lab.xen_host`) in its own namespace, dom0 holding the
host's address on the lab's network (:mod:`smig.lab.xen_net`). Each host runs two SMIG parts,
the way a real Xen host would (docs/XEN.md):

- **the agent, in dom0**, on the host's address: it enrols, takes the RC-TCB's orders and
  carries them out with the Xen driver (``xl``, locally), and reports the host's guests. dom0
  runs it with its own Python 3.11 and SMIG's code from read-only shares of the lab machine, at
  the same paths; its credentials come from a read-only share of that host's files alone.
- **the host's monitor, outside it**, on the lab machine in the host's namespace, on a
  management address of its own (the host's out-of-band side, like a BMC): it measures the
  subjects the RC-TCB assigns this host by reading their Xen from their outer QEMU, against the
  ``xen-syms`` the approved manifest names, and signs with the host's key. A monitor inside
  dom0 could not reach a neighbour's memory, and a compromised Xen could forge what it says.

The region's reference manifest is built from the image's ``xen-syms``: the RC-TCB approves
that file, and a monitor refuses to judge against any other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import smig
from smig.errors import ConfigError, ImageError, LaunchError
from smig.guest.image import GuestImage, ImageBuilder
from smig.hypervisor.commands import CommandRunner
from smig.hypervisor.heartbeat import parse_last
from smig.hypervisor.xen import XenConfig, XenDriver
from smig.lab import net, xen_host
from smig.lab.lab_config import AGENT_PORT, agent_head
from smig.lab.xen_host import Dom0Channel, XenHostSpec
from smig.lab.xen_image import XenHostImage, XenImageBuilder
from smig.lab.xen_net import add_monitor_address, attach_nested_host, mac_of
from smig.model import Heartbeat, VMSpec
from smig.paths import smig_cache

if TYPE_CHECKING:
    from smig.lab.region import LabState

HOST_MIB = 1280
# One vCPU each: two hosts of two vCPUs contend for a 2-core machine's cores. Measured here: the
# hosts boot in about 50 s and dom0 imports SMIG in under a minute, against about 100 s and three
# minutes with two.
HOST_CPUS = 1
DOM0_MIB = 640
GUEST_CAPACITY_MIB = 512  # what Xen has left for guests once dom0 has its share
GUEST_MIB = 96  # the least a Xen PV guest of the lab's kernel boots with (smig.hypervisor.xl)
DOM0_HOME = "/var/lib/smig"  # the agent's home in dom0 (on dom0's own disk)
DOM0_STATE = f"{DOM0_HOME}/xen"  # the Xen driver's records
AGENT_LOG = "/var/log/smig-agent.log"
AGENT_START_TIMEOUT_S = 300.0  # importing SMIG under TCG in dom0 takes about a minute


def images() -> tuple[XenHostImage, GuestImage]:
    """The nested host image and the guest image, both built by the setup. Raises ImageError."""
    return XenImageBuilder(smig_cache()).load(), ImageBuilder(smig_cache()).load()


def reference_files() -> list[Path]:
    """What the lab's manifest approves for its monitors: xen-syms, dom0's kernel and toolstack."""
    image = images()[0]
    files = [image.xen_syms, image.kernel, *(local for _path, local in image.dom0_tools)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ImageError(f"the Xen host image lacks {', '.join(missing)}: run `smig image xen`")
    return files


def monitor_address(state: LabState, node: net.Node) -> str:
    """The host's out-of-band address, where its monitor runs: the top of the lab's subnet,
    counting down, clear of the RC-TCB's and the hosts' addresses (which count up)."""
    subnet = ipaddress.ip_network(state.subnet)
    address = subnet.broadcast_address - node.index
    if int(address) <= int(subnet.network_address) + len(state.hosts) + 1:
        raise ConfigError(f"lab subnet {state.subnet} is too small for {len(state.hosts)} Xen hosts and their monitors")
    return str(address)


def host_spec(state: LabState, host: str, tap: str) -> XenHostSpec:
    node = state.network.hosts[host]
    guest = images()[1]
    return XenHostSpec(
        name=f"{state.lab}-{host}",
        directory=state.host_home(host) / "xen-host",
        memory_mib=HOST_MIB,
        dom0_mib=DOM0_MIB,
        cpus=HOST_CPUS,
        ip=node.cidr,
        tap=tap,
        mac=mac_of(node),
        shares=(
            (guest.kernel.parent, str(guest.kernel.parent)),
            (_dom0_files(state, host), str(_dom0_files(state, host))),
            *xen_host.shares_for_code(*_code_dirs()),
        ),
    )


def _code_dirs() -> tuple[Path, list[Path]]:
    """SMIG's source and the libraries it imports, to share with dom0 (same paths there)."""
    src = Path(smig.__file__).resolve().parent.parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    return src, ([] if site == src else [site])


def _pythonpath() -> str:
    src, others = _code_dirs()
    return ":".join(str(p) for p in (*others, src))


def _dom0_files(state: LabState, host: str) -> Path:
    return state.host_home(host) / "dom0"


async def boot_hosts(state: LabState, progress: Callable[[str], None]) -> dict[str, int]:
    """Attach each host's namespace to a tap, boot the nested hosts side by side; their PIDs."""
    image, _ = images()
    specs = []
    for host in state.hosts:
        node = state.network.hosts[host]
        tap = attach_nested_host(node)
        add_monitor_address(node, monitor_address(state, node))
        specs.append((host_spec(state, host, tap), node))
    progress(f"booting {len(specs)} nested Xen hosts (TCG: about a minute)")
    booted = await asyncio.gather(
        *(xen_host.boot(image, spec, netns=node.netns) for spec, node in specs), return_exceptions=True
    )
    failed = [b for b in booted if isinstance(b, BaseException)]
    for b in booted:
        if not isinstance(b, BaseException):
            await b.channel.close()
    if failed:
        raise failed[0]
    return {spec.name: b.pid for (spec, _), b in zip(specs, booted, strict=True) if not isinstance(b, BaseException)}


def write_dom0_files(state: LabState, host: str, agent_toml: str) -> None:
    """What the agent in ``host``'s dom0 may read: its own credentials, the CA, the reference."""
    d = _dom0_files(state, host)
    d.mkdir(parents=True, exist_ok=True)
    ca = state.path / "ca"
    for src, name in (
        (ca / "ca.pem", "ca.pem"),
        (ca / "issued" / host / "cert.pem", "cert.pem"),
        (ca / "issued" / host / "key.pem", "key.pem"),
        (state.host_home(host) / "agent-key.pem", "agent-key.pem"),
        (state.path / "reference" / "manifest.json", "manifest.json"),
        (state.path / "reference" / "key.pub", "reference-key.pub"),
    ):
        shutil.copyfile(src, d / name)
        if name.endswith("key.pem"):
            (d / name).chmod(0o600)  # dom0 sees the mode through the share
    (d / "agent.toml").write_text(agent_toml)


def dom0_agent_config(state: LabState, host: str) -> str:
    node = state.network.hosts[host]
    d = _dom0_files(state, host)
    guest = images()[1]
    return f"""[agent]
host = "{host}"
region = "lab-{state.lab}"
rctcb = "{state.rctcb_url}"
listen = "{node.address}:{AGENT_PORT}"
home = "{DOM0_HOME}"
cache = "{DOM0_HOME}/cache"
ca = "{d / "ca.pem"}"
cert = "{d / "cert.pem"}"
key = "{d / "key.pem"}"
signing_key = "{d / "agent-key.pem"}"
capacity_vcpus = 4
capacity_memory_mib = {GUEST_CAPACITY_MIB}
hypervisor = "xen"

[monitor]
enabled = false  # this host's monitor runs outside it: see smig.lab.xen_region
reference = "{d / "manifest.json"}"
reference_key = "{d / "reference-key.pub"}"

[migration]
tls = true  # socat's TLS, with this agent's certificate: the receiver's name is checked

[xen]
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
state_dir = "{DOM0_STATE}"
"""


def monitor_config(state: LabState, host: str) -> str:
    node = state.network.hosts[host]
    # Its listen address is not served (a monitor takes no orders): the key is required all the same.
    return (
        agent_head(state, host, f"{monitor_address(state, node)}:{AGENT_PORT}")
        + f"""role = "monitor"

[monitor]
reference = "{state.path / "reference" / "manifest.json"}"
reference_key = "{state.path / "reference" / "key.pub"}"
mean_interval_s = {state.interval_s}
subject_netns = "/run/netns/{net.PREFIX}{state.lab}-{{host}}"
subjects = "xen"
xen_syms = "{images()[0].xen_syms}"
dom0_kernel = "{images()[0].kernel}"
dom0_tools = {{ {", ".join(f'"{path}" = "{local}"' for path, local in images()[0].dom0_tools)} }}

[migration]
tls = false  # a monitor migrates nothing
"""
    )


def channel(state: LabState, host: str) -> Dom0Channel:
    return Dom0Channel(state.host_home(host) / "xen-host" / "exec.sock")


async def start_dom0_agent(state: LabState, host: str) -> int:
    """Start the agent in ``host``'s dom0; its PID there. Raises LaunchError."""
    config = _dom0_files(state, host) / "agent.toml"
    script = (
        f'mkdir -p {DOM0_HOME}/cache && cd / && SMIG_HOME={DOM0_HOME} PYTHONPATH="$1" '
        f'setsid /usr/bin/python3 -m smig.agent "$2" >> {AGENT_LOG} 2>&1 < /dev/null & echo $!'
    )
    async with channel(state, host) as ch:
        done = await ch.run(["sh", "-c", script, "sh", _pythonpath(), str(config)], timeout_s=30)
    if not done.ok or not done.stdout.strip().isdigit():
        raise LaunchError(f"cannot start the agent in {host}'s dom0: {done.why()}", host=host)
    return int(done.stdout.strip())


async def wait_dom0_agent(state: LabState, host: str, pid: int, timeout_s: float = AGENT_START_TIMEOUT_S) -> None:
    """Until the agent in ``host``'s dom0 says it is ready (its orders API is up). Raises
    LaunchError: it exited, or was not ready in time; its log's tail is in the message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with channel(state, host) as ch:
        while True:
            done = await ch.run(
                ["sh", "-c", f'grep -q " ready" {AGENT_LOG} && echo ready; kill -0 "$1" || echo gone', "sh", str(pid)],
                timeout_s=30,
            )
            if "ready" in done.stdout:
                return
            if "gone" in done.stdout or loop.time() > deadline:
                why = "exited" if "gone" in done.stdout else f"was not ready within {timeout_s:.0f} s"
                tail = await ch.run(["tail", "-n", "8", AGENT_LOG], timeout_s=20)
                raise LaunchError(
                    f"the agent in {host}'s dom0 {why}: {tail.stdout.strip() or '(no output)'}", host=host
                )
            await asyncio.sleep(3.0)


async def dom0_log(state: LabState, host: str, lines: int = 20) -> str:
    """The tail of the agent's log in ``host``'s dom0 (for an error message)."""
    try:
        async with channel(state, host) as ch:
            done = await ch.run(["tail", "-n", str(lines), AGENT_LOG], timeout_s=20)
    except xen_host.XenHostError as e:
        return f"(cannot read it: {e})"
    return done.stdout.strip() or "(empty)"


def driver(state: LabState, host: str, ch: Dom0Channel) -> XenDriver:
    """The Xen driver of ``host``'s dom0, driven from the lab through ``ch``: it keeps its records
    where the agent in dom0 keeps its own, so the guests it launches are the agent's."""
    guest = images()[1]
    return XenDriver(
        ch,
        XenConfig(
            kernel=str(guest.kernel),
            initrd=str(guest.initrd),
            state_dir=DOM0_STATE,
            migration_address=state.network.hosts[host].address,
        ),
    )


async def launch_vms(state: LabState, wanted: Sequence[tuple[str, str]], memory_mib: int, dirty_mbps: int) -> None:
    """Boot the guests: the hosts side by side, each host's one after another (a dom0 under TCG
    builds one domain at a time at best). Raises LaunchError, ConfigError."""

    async def on(host: str) -> None:
        async with channel(state, host) as ch:
            for name in (n for h, n in wanted if h == host):
                spec = VMSpec(name=name, memory_mib=memory_mib, dirty_mbps=dirty_mbps, working_set_mib=16)
                await driver(state, host, ch).launch(spec)

    failed = [
        r for r in await asyncio.gather(*map(on, dict.fromkeys(h for h, _ in wanted)), return_exceptions=True) if r
    ]
    if failed:
        raise failed[0]


# The last heartbeat of every guest a dom0's driver records: one command per host and sample.
_BEATS = (
    'for j in "$1"/*.json; do [ -e "$j" ] || continue; n=$(basename "$j" .json); '
    'c=$(sed -n \'s/.*"console": *"\\([^"]*\\)".*/\\1/p\' "$j"); '
    'echo "== $n"; tail -c 400 "$c" 2>/dev/null; echo; done'
)


async def heartbeats(runner: CommandRunner, state_dir: str = DOM0_STATE) -> dict[str, Heartbeat]:
    """Each guest the Xen driver records in ``state_dir``, with its last heartbeat (a guest
    without one is left out), through ``runner`` (a dom0's channel)."""
    done = await runner.run(["sh", "-c", _BEATS, "sh", state_dir], timeout_s=20)
    out: dict[str, Heartbeat] = {}
    for section in done.stdout.split("== ")[1:]:
        name, _, text = section.partition("\n")
        hb = parse_last(text)
        if hb is not None:
            out[name.strip()] = hb
    return out


def python_ok() -> None:
    """dom0 runs SMIG with its own Python: this one must be the same minor version."""
    if sys.version_info[:2] != (3, 11):
        raise ConfigError(
            f"the Xen lab runs SMIG in dom0 with Debian bookworm's Python 3.11; this is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}, whose compiled libraries dom0 cannot load"
        )


def up_hosts(
    state: LabState,
    wanted: list[tuple[str, str]],
    memory_mib: int,
    dirty_mbps: int,
    progress: Callable[[str], None],
    *,
    enrol: Callable[[], None],
    spawn_monitor: Callable[[str], int],
) -> None:
    """Boot the nested Xen hosts, enrol them, start the agent in each dom0 and each host's monitor
    beside it (``spawn_monitor``, once its configuration is written), then the guests.

    Enrolled only once booted: a host enrolled earlier would go UNKNOWN, unmeasured, while it
    boots, and an UNKNOWN host measures no one."""
    for host in state.hosts:  # shared with dom0 from its boot on
        write_dom0_files(state, host, dom0_agent_config(state, host))
    for name, pid in asyncio.run(boot_hosts(state, progress)).items():
        state.pids[f"xen-{name}"] = pid
    state.save()
    progress("enrolling the hosts")
    enrol()
    progress("starting the agent in each dom0 (importing SMIG under TCG takes about a minute) and each host's monitor")
    agents = {}
    for host in state.hosts:
        agents[host] = asyncio.run(start_dom0_agent(state, host))
        (state.host_home(host) / "monitor.toml").write_text(monitor_config(state, host))
        state.pids[f"monitor-{host}"] = spawn_monitor(host)
    state.save()

    async def agents_ready() -> None:
        await asyncio.gather(*(wait_dom0_agent(state, h, pid) for h, pid in agents.items()))

    # Before the guests: an agent starting while its dom0 builds domains takes minutes, not one.
    asyncio.run(agents_ready())
    progress("the agents in dom0 are up")
    if wanted:
        progress(f"booting {len(wanted)} Xen PV guests ({memory_mib} MiB, dirtying {dirty_mbps} MiB/s)")
        asyncio.run(launch_vms(state, wanted, memory_mib, dirty_mbps))
        for host, vm in wanted:
            state.vms[vm] = host

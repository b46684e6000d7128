"""The lab's virtual network: every host of a region, and its RC-TCB, in a network namespace of
its own, joined by a bridge that lives in a namespace of its own too.

::

      smig-<lab>-rctcb        smig-<lab>-h1           smig-<lab>-h2
     ┌───────────────┐      ┌───────────────┐      ┌───────────────┐
     │ eth0 10.77.0.1│      │ eth0 10.77.0.2│      │ eth0 10.77.0.3│   (tbf on each eth0
     └──────┬────────┘      └──────┬────────┘      └──────┬────────┘    with a link model)
            │ veth                 │ veth                 │ veth
     ┌──────┴──────────────────────┴──────────────────────┴────────┐
     │  v0                        v1                     v2        │
     │  └──────────────────────── br0 ──────────────────────┘      │
     │                        smig-<lab>-sw                        │
     └─────────────────────────────────────────────────────────────┘

The root namespace gains no interface and no address: the bridge sits in the switch namespace,
and each veth pair is created straight into its two namespaces. So a lab cannot collide with the
machine's own network, nor two labs with each other, even when they use the same subnet.

Everything a lab owns is named ``smig-<lab>-*`` under ``/run/netns``, so :func:`reclaim` finds it
from the system alone, after a crash too, and removes it with the processes running inside it.

The lab machine's kernel has no ``netem`` qdisc, so a link is modelled by its rate alone (``tbf``): see
:func:`parse_link`.
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from smig.errors import ConfigError, SmigError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
PREFIX = "smig-"
DEFAULT_SUBNET = "10.77.0.0/24"
RCTCB = "rctcb"
SWITCH = "sw"
BRIDGE = "br0"
NODE_IFNAME = "eth0"
# The kernel's IFNAMSIZ is 16 bytes including the terminating NUL.
MAX_IFNAME = 15

_LAB_RE = re.compile(r"[a-z0-9]{1,8}")
_HOST_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,11}")
_COMMAND_TIMEOUT_S = 30.0


class LabError(SmigError):
    """The lab's network could not be created or removed; the message names the command."""


@dataclass(frozen=True)
class Node:
    """One end of the lab network: a host or the RC-TCB, in its own namespace.

    ``ifname`` is the node's side of its veth pair; ``peer`` is the switch side, enslaved to the
    bridge. Both names exist only inside namespaces.
    """

    name: str
    netns: str
    address: str
    prefixlen: int
    index: int
    ifname: str = NODE_IFNAME

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def peer(self) -> str:
        return f"v{self.index}"

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class LabNetwork:
    """The plan of one lab's network; :func:`create` makes it real."""

    lab: str
    subnet: str
    switch_ns: str
    rctcb: Node
    hosts: dict[str, Node]
    bridge: str = BRIDGE

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The RC-TCB first, then the hosts in the order they were given."""
        return (self.rctcb, *self.hosts.values())

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.switch_ns, *(n.netns for n in self.nodes))


@dataclass(frozen=True)
class LinkModel:
    """A link's rate, as a token bucket (``tbf``) on every node's egress.

    ``burst_bytes`` is how much may leave at line speed before the rate applies; ``latency_ms``
    bounds the queue (tc derives its length from it), not a delay added to packets.
    """

    rate_bps: int
    burst_bytes: int
    latency_ms: int = 50

    def __post_init__(self) -> None:
        if self.rate_bps <= 0 or self.burst_bytes <= 0 or self.latency_ms <= 0:
            raise ConfigError(f"a link model needs a positive rate, burst and latency, not {self!r}")

    def tc_args(self) -> list[str]:
        """The qdisc part of ``tc qdisc add dev IF root ...``."""
        return ["tbf", "rate", f"{self.rate_bps}bit", "burst", str(self.burst_bytes), "latency", f"{self.latency_ms}ms"]

    def __str__(self) -> str:
        for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
            if self.rate_bps % scale == 0:
                return f"{self.rate_bps // scale}{unit}"
        return f"{self.rate_bps}bit"


@dataclass(frozen=True)
class Reclaimed:
    """What :func:`reclaim` removed. ``survivors`` are processes that outlived SIGKILL
    (stuck in the kernel); their namespaces were unnamed all the same."""

    lab: str
    namespaces: tuple[str, ...]
    pids: tuple[int, ...]
    survivors: tuple[int, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.namespaces or self.pids)


# Planning: pure


def _check_lab(lab: str) -> None:
    if not _LAB_RE.fullmatch(lab):
        raise ConfigError(f"lab name {lab!r} is not usable: give 1-8 lowercase letters or digits (e.g. 'lab1')")


def plan_network(lab: str, hosts: Sequence[str], subnet: str = DEFAULT_SUBNET) -> LabNetwork:
    """Name and address everything of a lab: the RC-TCB gets the subnet's first address, the hosts
    the next ones in the order given.

    Raises:
        ConfigError: a bad lab name or host id, a duplicate host, a host named like the lab's own
            namespaces (``rctcb``, ``sw``), a subnet that is not IPv4 or too small.
    """
    _check_lab(lab)
    seen: set[str] = set()
    for host in hosts:
        if not _HOST_RE.fullmatch(host):
            raise ConfigError(
                f"host id {host!r} is not usable in the lab: give 1-12 lowercase letters, digits or '-', "
                "starting with a letter or digit",
                host=host,
            )
        if host in (RCTCB, SWITCH):
            raise ConfigError(f"host id {host!r} is reserved for the lab's own namespace; choose another", host=host)
        if host in seen:
            raise ConfigError(f"host id {host!r} is given twice", host=host)
        seen.add(host)
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as e:
        raise ConfigError(f"lab subnet {subnet!r} is not a network address such as {DEFAULT_SUBNET}: {e}") from e
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(f"lab subnet {subnet!r} must be IPv4 (e.g. {DEFAULT_SUBNET})")
    usable = net.num_addresses - 2  # network and broadcast addresses
    if usable < 1 + len(hosts):
        raise ConfigError(
            f"lab subnet {subnet} has {max(usable, 0)} usable addresses; the RC-TCB and {len(hosts)} hosts "
            f"need {1 + len(hosts)}: choose a larger subnet"
        )

    def node(name: str, index: int) -> Node:
        return Node(
            name=name,
            netns=f"{PREFIX}{lab}-{name}",
            address=str(net.network_address + 1 + index),
            prefixlen=net.prefixlen,
            index=index,
        )

    plan = LabNetwork(
        lab=lab,
        subnet=str(net),
        switch_ns=f"{PREFIX}{lab}-{SWITCH}",
        rctcb=node(RCTCB, 0),
        hosts={h: node(h, i) for i, h in enumerate(hosts, start=1)},
    )
    for n in plan.nodes:
        assert len(n.ifname) <= MAX_IFNAME and len(n.peer) <= MAX_IFNAME, n
    return plan


_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)")
_UNIT = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# Anything that reads as delay, jitter or loss: words, a time or a percentage, a second term.
_NETEM_RE = re.compile(r"delay|latenc|jitter|loss|netem|duplicat|corrupt|reorder|rtt|[\d.]\s*(ms|us|s|sec)\b|%|,")
# One clock tick's worth of tokens keeps the rate reachable at HZ=250; the floor lets a few
# full-size frames through, while keeping small rates honest.
_TICK_HZ = 250
_MIN_BURST = 16 * 1024


def parse_link(text: str) -> LinkModel:
    """Read a link model: a rate such as ``1gbit``, ``100mbit``, ``500kbit``, ``10gbit``.

    Raises:
        ConfigError: the text is not a rate, or asks for delay, jitter or loss, which needs netem.
    """
    spec = text.strip().lower()
    m = _RATE_RE.fullmatch(spec)
    if m is None:
        if _NETEM_RE.search(spec):
            raise ConfigError(
                f"link model {text!r} asks for delay, jitter or loss; {_netem_absence()} So the lab models a "
                "link by its rate alone (the tbf qdisc): give a rate such as 1gbit, 100mbit or 500kbit."
            )
        raise ConfigError(
            f"link model {text!r} is not a rate: give a number and kbit, mbit or gbit, e.g. 1gbit, 100mbit, 500kbit "
            "(bits per second; tc's 'mbps' would mean bytes)"
        )
    rate = round(float(m.group(1)) * _UNIT[m.group(2)])
    if rate < 1000:
        raise ConfigError(f"link model {text!r}: the rate must be at least 1kbit")
    return LinkModel(rate_bps=rate, burst_bytes=max(rate // 8 // _TICK_HZ, _MIN_BURST))


def _netem_absence() -> str:
    """Why there is no delay emulation, as precisely as the running kernel lets us say."""
    release = os.uname().release
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            config = f.read()
    except OSError:
        config = ""
    if "# CONFIG_NET_SCH_NETEM is not set" in config:
        modules = "" if Path("/lib/modules", release).is_dir() else " and loads no modules"
        return (
            f"delay and loss need the netem qdisc, and this kernel ({release}) was built without it "
            f"(sch_netem: CONFIG_NET_SCH_NETEM is not set){modules}, so `tc qdisc add ... netem` "
            "fails with 'Specified qdisc kind is unknown'."
        )
    return (
        "delay and loss need the netem qdisc (sch_netem), which the lab's kernels do not have, so the lab "
        "does not offer them."
    )


def netns_argv(node_or_name: Node | str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside a node's (or a named) network namespace."""
    name = node_or_name.netns if isinstance(node_or_name, Node) else node_or_name
    return ["ip", "netns", "exec", name, *argv]


# Commands


def _run(argv: Sequence[str], what: str) -> None:
    """Run one command; a failure becomes a LabError that shows the command and its stderr."""
    cmd = shlex.join(argv)
    try:
        proc = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except FileNotFoundError as e:
        raise LabError(f"{what}: {argv[0]!r} is not installed (iproute2), so `{cmd}` cannot run") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{what}: `{cmd}` did not finish within {_COMMAND_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip() or "no error output"
        raise LabError(f"{what}: `{cmd}` failed (exit {proc.returncode}): {err}")


def _ip(netns: str, args: str, *, what: str) -> None:
    # Splitting on spaces is safe: every name in a lab is validated to be free of them.
    _run(["ip", "-n", netns, *args.split()], what)


def _add_netns(name: str, made: list[str]) -> None:
    _run(["ip", "netns", "add", name], f"cannot create network namespace {name}")
    made.append(name)
    _ip(name, "link set lo up", what=f"cannot bring up lo in {name}")


def _netns_names() -> list[str]:
    try:
        return [p.name for p in NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return []


def _lab_namespaces(lab: str) -> list[str]:
    return sorted(n for n in _netns_names() if n.startswith(f"{PREFIX}{lab}-"))


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Unname each namespace (its devices go with it); return the errors instead of stopping."""
    errors = []
    for name in names:
        try:
            _run(["ip", "netns", "delete", name], f"cannot delete network namespace {name}")
        except LabError as e:
            if (NETNS_DIR / name).exists():
                errors.append(str(e))
    return errors


# Creating


def create(network: LabNetwork, *, link: LinkModel | None = None) -> None:
    """Make the planned network real: the namespaces, the bridge, a veth pair and an address per
    node, and with ``link`` a ``tbf`` rate limit on every node's egress.

    Raises:
        LabError: the lab exists already (remove it with ``smig lab down <lab>``), or a command
            failed; whatever was made before the failure has been removed again.
    """
    lab = network.lab
    existing = _lab_namespaces(lab)
    if existing:
        raise LabError(
            f"lab {lab!r} already exists on this machine (namespaces {', '.join(existing)}): "
            f"remove it with `smig lab down {lab}` and try again"
        )
    if link is not None and shutil.which("tc") is None:
        raise LabError(
            f"a link model needs the 'tc' command (iproute2), which is not installed; "
            f"create lab {lab!r} without one or install iproute2"
        )
    made: list[str] = []
    sw = network.switch_ns
    try:
        _add_netns(sw, made)
        _ip(sw, f"link add {network.bridge} type bridge", what="cannot create the lab's bridge")
        _ip(sw, f"link set {network.bridge} up", what="cannot bring up the lab's bridge")
        for node in network.nodes:
            _add_netns(node.netns, made)
            # Created inside the switch namespace, its peer straight into the node's: the pair
            # never appears in the root namespace, not even for a moment.
            veth = f"link add {node.peer} type veth peer name {node.ifname} netns {node.netns}"
            _ip(sw, veth, what=f"cannot create the veth pair of {node.name}")
            _ip(sw, f"link set {node.peer} master {network.bridge} up", what=f"cannot bridge {node.name}'s veth")
            _ip(node.netns, f"addr add {node.cidr} dev {node.ifname}", what=f"cannot give {node.name} its address")
            _ip(node.netns, f"link set {node.ifname} up", what=f"cannot bring up {node.name}'s {node.ifname}")
            if link is not None:
                _run(
                    ["tc", "-n", node.netns, "qdisc", "add", "dev", node.ifname, "root", *link.tc_args()],
                    f"cannot limit {node.name}'s link to {link}",
                )
    except LabError as e:
        errors = _delete_namespaces(made[::-1])
        undo = "; undoing it also failed: " + "; ".join(errors) if errors else " (what was made is removed again)"
        raise LabError(f"cannot create lab {lab!r}: {e}{undo}") from e
    except BaseException:
        # Interrupted: leave nothing half made behind, and let the interruption through.
        _delete_namespaces(made[::-1])
        raise
    log.info("lab %s: %s up, %d hosts, link %s", lab, network.subnet, len(network.hosts), link or "uncapped")


# Finding and tearing down


def list_labs() -> list[str]:
    """The labs whose namespaces exist on this machine, by name."""
    labs = set()
    for name in _netns_names():
        lab, sep, rest = name.removeprefix(PREFIX).partition("-")
        if name.startswith(PREFIX) and sep and rest and _LAB_RE.fullmatch(lab):
            labs.add(lab)
    return sorted(labs)


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in(ns_ids: set[tuple[int, int]]) -> list[int]:
    me = os.getpid()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != me and _ns_id(f"/proc/{entry.name}/ns/net") in ns_ids:
            pids.append(int(entry.name))
    return pids


def _signal(pid: int, sig: signal.Signals, ns_ids: set[tuple[int, int]]) -> bool:
    """Signal ``pid`` only if it is still in one of the namespaces.

    A pidfd pins the process: checked after opening it, the namespace proves this is the process
    found in the scan and not a newcomer that took its PID.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if _ns_id(f"/proc/{pid}/ns/net") not in ns_ids:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _stop_processes(ns_ids: set[tuple[int, int]], term_timeout_s: float) -> tuple[list[int], list[int]]:
    """SIGTERM everything in the namespaces, SIGKILL what is left after the timeout; processes
    started meanwhile are caught by the next scan. Returns (signalled, survivors)."""
    signalled: set[int] = set()
    deadline = time.monotonic() + term_timeout_s
    while (pids := _pids_in(ns_ids)) and time.monotonic() < deadline:
        for pid in set(pids) - signalled:
            if _signal(pid, signal.SIGTERM, ns_ids):
                signalled.add(pid)
        time.sleep(0.05)
    killed: set[int] = set()
    deadline = time.monotonic() + 2.0
    while (pids := _pids_in(ns_ids)) and time.monotonic() < deadline:
        for pid in set(pids) - killed:
            if _signal(pid, signal.SIGKILL, ns_ids):
                killed.add(pid)
                log.warning("process %d still running %.1f s after SIGTERM; killed", pid, term_timeout_s)
        time.sleep(0.02)
    return sorted(signalled | killed), pids


def reclaim(lab: str, *, term_timeout_s: float = 3.0) -> Reclaimed:
    """Remove everything of ``lab`` that this machine holds, however it was left: stop every process
    inside the lab's namespaces (SIGTERM, then SIGKILL after ``term_timeout_s``), then delete the
    namespaces, which takes their veths and the bridge with them. Idempotent.

    Raises:
        ConfigError: ``lab`` is not a valid lab name.
        LabError: a namespace could not be deleted.
    """
    _check_lab(lab)
    names = _lab_namespaces(lab)
    ns_ids = {i for n in names if (i := _ns_id(str(NETNS_DIR / n))) is not None}
    pids, survivors = _stop_processes(ns_ids, term_timeout_s) if ns_ids else ([], [])
    if survivors:
        log.warning("lab %s: processes %s survived SIGKILL; their namespaces are unnamed anyway", lab, survivors)
    errors = _delete_namespaces(names)
    if errors:
        raise LabError(f"cannot remove lab {lab!r} completely: " + "; ".join(errors))
    if names:
        log.info("lab %s: removed namespaces %s and stopped processes %s", lab, names, pids)
    return Reclaimed(lab=lab, namespaces=tuple(names), pids=tuple(pids), survivors=tuple(survivors))


# Availability


def available() -> tuple[bool, str]:
    """Whether the lab can use network namespaces here, and why not when it cannot (so the caller
    can fall back to loopback ports and say why). Tries a throwaway namespace with a veth pair
    and a bridge inside, and removes it."""
    if os.geteuid() != 0:
        return False, f"network namespaces need root; running as uid {os.geteuid()}"
    if shutil.which("ip") is None:
        return False, "the 'ip' command (iproute2) is not installed"
    # Not 'smig-' + name: list_labs and reclaim must never mistake the probe for a lab.
    probe = f"smigprobe{os.getpid()}x{time.monotonic_ns() % 10**6}"
    try:
        _run(["ip", "netns", "add", probe], "cannot create a network namespace")
    except LabError as e:
        return False, str(e)
    try:
        _ip(probe, "link add p0 type veth peer name p1", what="cannot create a veth pair")
        _ip(probe, "link add pbr type bridge", what="cannot create a bridge")
    except LabError as e:
        return False, str(e)
    finally:
        _delete_namespaces([probe])
    return True, "network namespaces, veth pairs and bridges work"

"""The lab network: planning, and real namespaces made, used, capped and reclaimed.

Every test that touches the system uses labs of its own, with random names, and reclaims them
when it ends, failed or not."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smig.errors import ConfigError
from smig.lab import net
from smig.lab.net import LabError, LinkModel, Node

# ---------------------------------------------------------------------------------------------
# Planning


def test_plan_names_and_addresses() -> None:
    plan = net.plan_network("lab1", ["h1", "h2", "edge-3"])

    assert plan.lab == "lab1"
    assert plan.subnet == "10.77.0.0/24"
    assert plan.switch_ns == "smig-lab1-sw"
    assert (plan.rctcb.netns, plan.rctcb.address, plan.rctcb.prefixlen) == ("smig-lab1-rctcb", "10.77.0.1", 24)
    assert plan.rctcb.netns_path == "/run/netns/smig-lab1-rctcb"
    assert list(plan.hosts) == ["h1", "h2", "edge-3"]
    assert [(n.netns, n.address) for n in plan.hosts.values()] == [
        ("smig-lab1-h1", "10.77.0.2"),
        ("smig-lab1-h2", "10.77.0.3"),
        ("smig-lab1-edge-3", "10.77.0.4"),
    ]
    assert plan.namespaces == ("smig-lab1-sw", "smig-lab1-rctcb", "smig-lab1-h1", "smig-lab1-h2", "smig-lab1-edge-3")
    assert [n.peer for n in plan.nodes] == ["v0", "v1", "v2", "v3"]


def test_plan_uses_the_subnet_given() -> None:
    plan = net.plan_network("a", ["x"], subnet="192.168.50.0/29")
    assert (plan.rctcb.cidr, plan.hosts["x"].cidr) == ("192.168.50.1/29", "192.168.50.2/29")


def test_every_interface_name_fits_ifnamsiz() -> None:
    hosts = [f"host-{i:07d}" for i in range(253)]  # the longest host ids, a /24 full
    plan = net.plan_network("abcdefgh", hosts)

    for node in plan.nodes:
        assert len(node.ifname) <= 15 and len(node.peer) <= 15, node
    assert len(plan.bridge) <= 15
    assert plan.hosts[hosts[-1]].address == "10.77.0.254"


@pytest.mark.parametrize(
    ("lab", "hosts", "subnet", "words"),
    [
        ("Lab", ["h1"], "10.77.0.0/24", "lab name"),
        ("toolongname", ["h1"], "10.77.0.0/24", "1-8"),
        ("a-b", ["h1"], "10.77.0.0/24", "lab name"),
        ("", ["h1"], "10.77.0.0/24", "lab name"),
        ("lab", ["H1"], "10.77.0.0/24", "host id"),
        ("lab", ["a-very-long-host"], "10.77.0.0/24", "1-12"),
        ("lab", ["-h"], "10.77.0.0/24", "host id"),
        ("lab", ["h_1"], "10.77.0.0/24", "host id"),
        ("lab", ["rctcb"], "10.77.0.0/24", "reserved"),
        ("lab", ["sw"], "10.77.0.0/24", "reserved"),
        ("lab", ["h1", "h1"], "10.77.0.0/24", "twice"),
        ("lab", ["h1", "h2"], "10.77.0.0/30", "larger subnet"),
        ("lab", ["h1"], "10.77.0.1/24", "network address"),
        ("lab", ["h1"], "not-a-net", "network address"),
        ("lab", ["h1"], "fd00::/64", "IPv4"),
    ],
)
def test_plan_refuses_bad_input(lab: str, hosts: list[str], subnet: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        net.plan_network(lab, hosts, subnet)


def test_netns_argv() -> None:
    node = net.plan_network("lab1", ["h1"]).hosts["h1"]
    assert net.netns_argv(node, ["true", "x"]) == ["ip", "netns", "exec", "smig-lab1-h1", "true", "x"]
    assert net.netns_argv("smig-lab1-sw", ["true"]) == ["ip", "netns", "exec", "smig-lab1-sw", "true"]


# ---------------------------------------------------------------------------------------------
# Link models


@pytest.mark.parametrize(
    ("text", "rate"),
    [("1gbit", 10**9), ("100mbit", 10**8), ("500kbit", 5 * 10**5), ("10gbit", 10**10), (" 1.5GBit ", 15 * 10**8)],
)
def test_parse_link_reads_rates(text: str, rate: int) -> None:
    link = net.parse_link(text)
    assert link.rate_bps == rate
    assert link.tc_args()[:3] == ["tbf", "rate", f"{rate}bit"]
    assert net.parse_link(str(link)) == link


@pytest.mark.parametrize("text", ["1gbit,10ms", "delay 10ms", "netem", "1gbit loss 1%", "100mbit jitter 2ms", "20ms"])
def test_parse_link_refuses_delay_and_loss_for_want_of_netem(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        net.parse_link(text)
    message = str(err.value)
    assert "netem" in message and "tbf" in message and "1gbit" in message


@pytest.mark.parametrize("text", ["", "fast", "10mbps", "1gb", "0kbit", "-1mbit"])
def test_parse_link_refuses_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ConfigError, match="kbit"):
        net.parse_link(text)


# ---------------------------------------------------------------------------------------------
# Real namespaces


@pytest.fixture(scope="module")
def netns_ok() -> None:
    ok, why = net.available()
    if not ok:
        pytest.skip(f"network namespaces cannot be used here: {why}")


@pytest.fixture
def new_lab(netns_ok: None) -> Iterator[Callable[[], str]]:
    """Hands out fresh lab names; every lab of the test is reclaimed at its end, even on failure."""
    names: list[str] = []

    def make() -> str:
        names.append("t" + secrets.token_hex(3))
        return names[-1]

    yield make
    for name in names:
        net.reclaim(name, term_timeout_s=0.5)
    assert not set(names) & set(net.list_labs())


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


def _root_network() -> tuple[set[str], set[str]]:
    """Interface names and (interface, address) pairs of the root namespace."""
    links = {line.split(":")[1].strip().split("@")[0] for line in _run(["ip", "-o", "link"]).splitlines()}
    addrs = {" ".join(line.split()[1:4]) for line in _run(["ip", "-o", "addr"]).splitlines()}
    return links, addrs


# A server that tells each client the address it saw the connection come from.
_PEER_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7000))
print("ready", flush=True)
c, peer = s.accept()
c.sendall(peer[0].encode())
"""
_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=5)
print(c.recv(64).decode())
"""


def _connect(client: Node, server: Node) -> str:
    """Connect from ``client``'s namespace to a listener in ``server``'s; the source address seen."""
    srv = subprocess.Popen(
        net.netns_argv(server, [sys.executable, "-c", _PEER_SERVER, server.address]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        return _run(net.netns_argv(client, [sys.executable, "-c", _CLIENT, server.address])).strip()
    finally:
        srv.kill()
        srv.wait()


def test_available_here() -> None:
    ok, why = net.available()
    assert ok, why
    assert not any(name.startswith("smigprobe") for name in _ns_names())


def _ns_names() -> set[str]:
    return {p.name for p in Path("/run/netns").iterdir()} if Path("/run/netns").is_dir() else set()


def test_hosts_and_rctcb_talk_across_the_bridge_and_the_root_namespace_is_untouched(new_lab: Callable[[], str]) -> None:
    before = _root_network()
    plan = net.plan_network(new_lab(), ["h1", "h2"])
    net.create(plan)

    h1, h2 = plan.hosts["h1"], plan.hosts["h2"]
    assert _connect(h2, h1) == h2.address
    assert _connect(h1, plan.rctcb) == h1.address
    assert _connect(plan.rctcb, h2) == plan.rctcb.address
    assert plan.lab in net.list_labs()
    assert set(plan.namespaces) <= _ns_names()
    assert _root_network() == before


def test_a_link_model_caps_every_node(new_lab: Callable[[], str]) -> None:
    plan = net.plan_network(new_lab(), ["h1", "h2"])
    net.create(plan, link=net.parse_link("100mbit"))

    for node in plan.nodes:
        shown = _run(["tc", "-n", node.netns, "qdisc", "show", "dev", "eth0"])
        assert "tbf" in shown and "rate 100Mbit" in shown, shown

    nbytes = 2_500_000  # 0.2 s at 100 Mbit/s; milliseconds uncapped
    sink = f"""
import socket
s = socket.create_server(("{plan.hosts["h2"].address}", 7001)); print("ready", flush=True)
c, _ = s.accept(); n = 0
while n < {nbytes}:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
c.sendall(b"k")
"""
    source = f"""
import socket, time
c = socket.create_connection(("{plan.hosts["h2"].address}", 7001), timeout=10)
t = time.monotonic(); c.sendall(bytes([7]) * {nbytes}); c.recv(1); print(time.monotonic() - t)
"""
    srv = subprocess.Popen(
        net.netns_argv(plan.hosts["h2"], [sys.executable, "-c", sink]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        seconds = float(_run(net.netns_argv(plan.hosts["h1"], [sys.executable, "-c", source])))
    finally:
        srv.kill()
        srv.wait()
    assert nbytes * 8 / seconds <= 110e6


def test_creating_a_lab_that_exists_names_the_fix_and_leaves_it_alone(new_lab: Callable[[], str]) -> None:
    plan = net.plan_network(new_lab(), ["h1"])
    net.create(plan)

    with pytest.raises(LabError, match=f"smig lab down {plan.lab}"):
        net.create(plan)
    assert set(plan.namespaces) <= _ns_names()
    assert _connect(plan.hosts["h1"], plan.rctcb) == plan.hosts["h1"].address


def test_a_creation_that_fails_half_way_leaves_nothing(new_lab: Callable[[], str]) -> None:
    plan = net.plan_network(new_lab(), ["h1", "h2"])
    too_big_a_burst = LinkModel(rate_bps=10**9, burst_bytes=2**33)  # tc refuses: over 32 bits

    with pytest.raises(LabError, match=r"tc -n .* burst") as err:
        net.create(plan, link=too_big_a_burst)
    assert "removed again" in str(err.value)
    assert plan.lab not in net.list_labs()
    assert not net.reclaim(plan.lab).found


def test_reclaim_stops_the_lab_processes_and_no_others(new_lab: Callable[[], str]) -> None:
    plan, other = net.plan_network(new_lab(), ["h1"]), net.plan_network(new_lab(), ["h1"])
    net.create(plan)
    net.create(other)

    def start(node: Node, script: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(net.netns_argv(node, ["sh", "-c", script]), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    sleeper = start(plan.hosts["h1"], "echo ready; exec sleep 600")
    stubborn = start(plan.rctcb, "trap '' TERM; echo ready; exec sleep 600")
    bystanders = [subprocess.Popen(["sleep", "600"], text=True), start(other.hosts["h1"], "echo ready; exec sleep 600")]
    try:
        started = time.monotonic()
        reclaimed = net.reclaim(plan.lab, term_timeout_s=0.5)

        assert sorted(reclaimed.pids) == sorted([sleeper.pid, stubborn.pid])
        assert sleeper.wait(timeout=2) == -15
        assert stubborn.wait(timeout=2) == -9
        assert time.monotonic() - started < 3
        assert sorted(reclaimed.namespaces) == sorted(plan.namespaces)
        assert not set(plan.namespaces) & _ns_names()
        assert plan.lab not in net.list_labs()
        assert all(p.poll() is None for p in bystanders)
        assert other.lab in net.list_labs()

        again = net.reclaim(plan.lab)
        assert (again.namespaces, again.pids, again.found) == ((), (), False)
    finally:
        for p in [sleeper, stubborn, *bystanders]:
            p.kill()
            p.wait()


def test_reclaim_clears_a_half_created_lab(new_lab: Callable[[], str]) -> None:
    lab = new_lab()
    sw, h1 = f"smig-{lab}-sw", f"smig-{lab}-h1"
    _run(["ip", "netns", "add", sw])
    _run(["ip", "netns", "add", h1])
    _run(["ip", "-n", sw, "link", "add", "v1", "type", "veth", "peer", "name", "eth0", "netns", h1])
    # What a crash between creating a namespace's file and mounting it leaves behind.
    Path(f"/run/netns/smig-{lab}-h2").touch()
    assert lab in net.list_labs()

    reclaimed = net.reclaim(lab)

    assert reclaimed.namespaces == (f"smig-{lab}-h1", f"smig-{lab}-h2", f"smig-{lab}-sw")
    assert lab not in net.list_labs()
    plan = net.plan_network(lab, ["h1", "h2"])
    net.create(plan)
    assert _connect(plan.hosts["h2"], plan.hosts["h1"]) == plan.hosts["h2"].address

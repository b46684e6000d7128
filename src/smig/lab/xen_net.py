"""A nested Xen host on the lab's network: the node's namespace keeps its veth to the lab's switch,
and dom0, behind a tap bridged with that veth, holds the node's address.

::

    smig-<lab>-h1 (namespace)                     nested host h1 (outer QEMU, in that namespace)
    eth0 ── xbr0 ── xt0  ═══ virtio-net ═══  dom0 eth0 10.77.0.2

So the rest of the lab (the RC-TCB, the other hosts) reaches dom0 at the address the node had,
and nothing of it appears in the root namespace.
"""

from __future__ import annotations

from smig.lab.net import Node, _ip

TAP = "xt0"
BRIDGE = "xbr0"


def attach_nested_host(node: Node) -> str:
    """Bridge a tap into ``node``'s namespace and hand the node's address to whatever is behind
    it; returns the tap's name, for the outer QEMU started in that namespace.

    Raises LabError: a command failed (the namespace goes with ``smig lab down``)."""
    ns = node.netns
    _ip(ns, f"tuntap add dev {TAP} mode tap", what=f"cannot create {node.name}'s tap")
    _ip(ns, f"link add {BRIDGE} type bridge", what=f"cannot create {node.name}'s bridge")
    _ip(ns, f"addr flush dev {node.ifname}", what=f"cannot take {node.name}'s address off {node.ifname}")
    _ip(ns, f"link set {node.ifname} master {BRIDGE}", what=f"cannot bridge {node.name}'s {node.ifname}")
    _ip(ns, f"link set {TAP} master {BRIDGE} up", what=f"cannot bridge {node.name}'s tap")
    _ip(ns, f"link set {BRIDGE} up", what=f"cannot bring up {node.name}'s bridge")
    return TAP


def add_monitor_address(node: Node, address: str) -> None:
    """Give ``node``'s namespace a second address on its bridge: where the host's monitor, which
    runs outside the nested host, reaches the RC-TCB from. Raises LabError."""
    _ip(node.netns, f"addr add {address}/{node.prefixlen} dev {BRIDGE}", what=f"cannot give {node.name} {address}")


def mac_of(node: Node) -> str:
    """A MAC unique in the lab (the hosts' dom0s share one segment)."""
    return f"52:54:00:5e:{node.index >> 8:02x}:{node.index & 0xFF:02x}"

"""The Xen lab's parts that need no nested host: the agent's and the monitor's configuration, the
monitor's addresses, the reference a Xen monitor accepts, reading guests' heartbeats from a dom0's
records, and a monitor that cannot measure its subject reporting nothing rather than a verdict."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from smig.agent.config import EXAMPLE, parse_config
from smig.agent.drivers import make_driver
from smig.agent.executor import OrderExecutor
from smig.aim import reference
from smig.aim.keys import generate_key
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor
from smig.aim.schedule import Schedule
from smig.aim.xen_measure import approved_xen_syms, xen_subject_found
from smig.errors import ConfigError, ManifestError
from smig.hypervisor.base import Capability
from smig.hypervisor.commands import LocalRunner
from smig.hypervisor.xen import XenDriver
from smig.lab import xen_region
from smig.lab.region import LabState
from smig.lab.xen_image import XenHostImage
from smig.model import TLSConfig

XEN_AGENT = EXAMPLE.replace('hypervisor = "qemu"', 'hypervisor = "xen"').replace(
    '# [xen]                                # hypervisor = "xen": what the guests boot, paths in dom0\n'
    '# kernel = "/var/lib/smig/guest/vmlinuz"\n# initrd = "/var/lib/smig/guest/initrd.img"',
    '[xen]\nkernel = "/g/vmlinuz"\ninitrd = "/g/initrd.img"',
)


def _lab(tmp_path: Path, hosts: int = 3, subnet: str = "10.77.0.0/24") -> LabState:
    names = [f"h{i}" for i in range(1, hosts + 1)]
    return LabState("t1", str(tmp_path), names, subnet, "quorum", 1.0, None, hypervisor="xen")


def test_a_xen_agent_drives_xl_in_dom0(tmp_path: Path) -> None:
    config = parse_config(XEN_AGENT)
    assert (config.hypervisor, config.xen_kernel, config.xen_initrd) == ("xen", "/g/vmlinuz", "/g/initrd.img")
    tls = TLSConfig(str(tmp_path), "10.77.0.2")
    assert make_driver(config, tls).capabilities >= {Capability.TLS_MIGRATION}  # over socat's TLS
    driver = make_driver(config, None)
    assert isinstance(driver, XenDriver)
    assert driver.config.state_dir == str(config.home / "xen")
    assert driver.config.migration_address == config.listen_host  # incoming migrations on the agent's address
    assert Capability.CANCEL_MIGRATION in driver.capabilities  # refused past xl's commit point
    OrderExecutor(driver, tmp_path / "agent")
    with pytest.raises(ConfigError, match="cannot do tls-migration"):
        OrderExecutor(driver, tmp_path / "agent2", tls=True)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (('hypervisor = "qemu"', 'hypervisor = "kvm"'), "agent.hypervisor"),
        (('hypervisor = "qemu"', 'hypervisor = "xen"'), r"\[xen\] kernel"),
        (('role = "host"', 'role = "observer"'), "agent.role"),
        (('# subjects = "xen"\n', 'subjects = "xen"\n'), r"\[monitor\] xen_syms"),
        (('# subjects = "xen"\n', 'subjects = "files"\n'), "monitor.subjects"),
    ],
)
def test_every_xen_mistake_in_an_agent_config_is_named(change: tuple[str, str], names: str) -> None:
    text = EXAMPLE.replace(*change, 1)
    assert text != EXAMPLE
    with pytest.raises(ConfigError, match=names):
        parse_config(text)


def test_the_monitor_addresses_count_down_clear_of_the_hosts(tmp_path: Path) -> None:
    state = _lab(tmp_path, hosts=3)
    nodes = state.network.hosts
    monitors = [xen_region.monitor_address(state, n) for n in nodes.values()]
    assert monitors == ["10.77.0.254", "10.77.0.253", "10.77.0.252"]
    assert not set(monitors) & {n.address for n in state.network.nodes}
    small = _lab(tmp_path, hosts=3, subnet="10.77.0.0/29")  # 6 addresses: the RC-TCB, 3 hosts, 2 left
    with pytest.raises(ConfigError, match="too small"):
        [xen_region.monitor_address(small, n) for n in small.network.hosts.values()]


def test_the_lab_writes_a_dom0_agent_and_an_outside_monitor_that_parse(tmp_path: Path, xen_image: XenHostImage) -> None:
    state = _lab(tmp_path, hosts=2)
    agent = parse_config(xen_region.dom0_agent_config(state, "h1"))
    assert (agent.hypervisor, agent.role, agent.monitoring, agent.migration_tls) == ("xen", "host", False, True)
    assert agent.listen_host == state.network.hosts["h1"].address  # dom0 holds the host's address
    assert agent.xen_state_dir == xen_region.DOM0_STATE
    # Its credentials are its own host's, from the one share dom0 gets.
    assert all(str(p).startswith(str(tmp_path / "hosts" / "h1" / "dom0")) for p in (agent.cert, agent.key, agent.ca))
    monitor = parse_config(xen_region.monitor_config(state, "h1"))
    assert (monitor.role, monitor.subjects, monitor.xen_syms) == ("monitor", "xen", xen_image.xen_syms)
    assert monitor.listen_host == "10.77.0.254" and monitor.netns_of("h2") == "/run/netns/smig-t1-h2"


def test_a_xen_monitor_judges_only_against_the_xen_syms_the_manifest_approves(
    tmp_path: Path, xen_image: XenHostImage
) -> None:
    copy = tmp_path / "xen-syms"
    shutil.copyfile(xen_image.xen_syms, copy)
    manifest = reference.build([copy])
    syms = approved_xen_syms(manifest, copy)
    assert syms.text.size > 1 << 20 and syms.alternatives
    with pytest.raises(ManifestError, match="does not list"):
        approved_xen_syms(reference.build([]), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="digest differs"):
        approved_xen_syms(manifest, copy)


def test_a_subject_without_its_outer_qemu_gets_no_report_and_the_loop_goes_on(xen_image: XenHostImage) -> None:
    syms = approved_xen_syms(reference.build([xen_image.xen_syms]), xen_image.xen_syms)
    asked = []

    def find() -> list[int]:
        asked.append(1)
        return []  # powered off, fenced, or never booted

    subject = xen_subject_found("h2", find, syms)
    monitor = Monitor("h1", generate_key(), Measurer(reference.build([])), Schedule(mean_interval_s=0.01))
    emitted: list[object] = []
    rounds = asyncio.run(monitor.run(subject, emitted.append, rounds=3))
    monitor.close()
    assert rounds == 3 and len(asked) == 3
    assert emitted == []  # no verdict on nothing: the RC-TCB sees the subject go stale instead


def test_heartbeats_are_read_from_the_driver_records_in_one_command(tmp_path: Path) -> None:
    state = tmp_path / "xen"
    state.mkdir()
    consoles = tmp_path / "console"
    consoles.mkdir()
    (consoles / "guest-a--incoming.log").write_text("boot\r\nSMIG-HB b1 7 700\r\nSMIG-HB b1 8 800\r\nSMIG-HB b1 9")
    (consoles / "guest-b.log").write_text("still booting\n")
    for name, console in (("a", "guest-a--incoming.log"), ("b", "guest-b.log"), ("c", "missing.log")):
        record = {"spec": {"name": name, "memory_mib": 96}, "domid": 3, "console": str(consoles / console)}
        (state / f"{name}.json").write_text(json.dumps(record))
    beats = asyncio.run(xen_region.heartbeats(LocalRunner(), str(state)))
    assert set(beats) == {"a"}  # b has not beaten yet; c's console is gone
    assert (beats["a"].boot_id, beats["a"].counter) == ("b1", 8)  # the line being written is not read
    assert asyncio.run(xen_region.heartbeats(LocalRunner(), str(tmp_path / "none"))) == {}

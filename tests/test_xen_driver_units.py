"""The Xen driver's pure parts: reading `xl list`, writing a guest's configuration, refusing
specs before anything starts."""

from __future__ import annotations

import pytest

from smig.errors import ConfigError
from smig.hypervisor.xen import MIN_MEMORY_MIB, check_spec, domain_config, parse_xl_list
from smig.model import VMSpec, VMState

XL_LIST = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0   768     2     r-----     107.3
running                                      4    96     1     -b----       0.2
busy                                         5    96     1     r-----       3.1
held                                         6    96     1     --p---       1.0
m1--incoming                                 7    96     1     ------       0.0
"""


def test_xl_list_is_read_by_name_without_dom0() -> None:
    domains = parse_xl_list(XL_LIST)
    assert "Domain-0" not in domains
    assert {n: (d.domid, d.memory_mib, d.state) for n, d in domains.items()} == {
        "running": (4, 96, VMState.RUNNING),
        "busy": (5, 96, VMState.RUNNING),
        "held": (6, 96, VMState.PAUSED),
        "m1--incoming": (7, 96, VMState.UNKNOWN),  # being built or received: not yet a guest
    }
    assert parse_xl_list("") == {} and parse_xl_list("Name ID\ngarbage line\n") == {}


def test_a_guest_config_boots_the_smig_guest_on_its_console() -> None:
    cfg = domain_config(VMSpec(name="g1", memory_mib=128, vcpus=2, dirty_mbps=5, heartbeat_ms=200), "/k", "/i")
    lines = dict(line.split(" = ", 1) for line in cfg.strip().splitlines())
    assert lines["name"] == '"g1"' and lines["type"] == '"pv"'
    assert lines["kernel"] == '"/k"' and lines["ramdisk"] == '"/i"'
    assert lines["memory"] == "128" and lines["vcpus"] == "2"
    assert "smig_hb_dev=hvc0" in lines["extra"] and "smig_hb_ms=200" in lines["extra"]
    assert "smig_dirty=5" in lines["extra"]
    assert lines["on_crash"] == '"preserve"'


@pytest.mark.parametrize(
    "spec, match",
    [
        (VMSpec(name="../x", memory_mib=128), "bad VM name"),
        (VMSpec(name="small", memory_mib=MIN_MEMORY_MIB - 1), "too little memory"),
        (VMSpec(name="ws", memory_mib=128, dirty_mbps=5, working_set_mib=100), "working set"),
    ],
)
def test_specs_xen_cannot_run_are_refused(spec: VMSpec, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_spec(spec)
    check_spec(VMSpec(name="fine", memory_mib=MIN_MEMORY_MIB, working_set_mib=16))

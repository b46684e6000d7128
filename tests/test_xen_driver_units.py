"""The Xen driver's pure parts: reading `xl list`, writing a guest's configuration, refusing
specs before anything starts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from smig.errors import ConfigError, LaunchError
from smig.hypervisor.commands import TIMED_OUT, CommandResult
from smig.hypervisor.xen import MIN_MEMORY_MIB, XenConfig, XenDriver, check_spec, domain_config, parse_xl_list
from smig.model import VMSpec, VMState

XL_LIST = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0   768     2     r-----     107.3
running                                      4    96     1     -b----       0.2
busy                                         5    96     1     r-----       3.1
held                                         6    96     1     --p---       1.0
m1--incoming                                 7    96     1     ------       0.0
waiting                                      8    96     1     ------       2.0
gone                                         9    96     1     ---s--       2.0
broken                                      10    96     1     ----c-       2.0
"""


def test_xl_list_is_read_by_name_without_dom0() -> None:
    domains = parse_xl_list(XL_LIST)
    assert "Domain-0" not in domains
    assert {n: (d.domid, d.memory_mib, d.state) for n, d in domains.items()} == {
        "running": (4, 96, VMState.RUNNING),
        "busy": (5, 96, VMState.RUNNING),
        "held": (6, 96, VMState.PAUSED),
        "m1--incoming": (7, 96, VMState.INCOMING),  # being received: not yet a guest
        "waiting": (8, 96, VMState.RUNNING),  # runnable, waiting for the CPU dom0 has
        "gone": (9, 96, VMState.UNKNOWN),
        "broken": (10, 96, VMState.UNKNOWN),
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


class _Dom0:
    """A dom0 that answers `xl list` and fails reading the driver's records (a timeout, say)."""

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        if list(argv[:2]) == ["xl", "list"]:
            return CommandResult(tuple(argv), 0, XL_LIST, "")
        return CommandResult(tuple(argv), TIMED_OUT, "", "timed out")


def test_a_listing_that_cannot_read_the_records_fails_rather_than_report_no_guests() -> None:
    driver = XenDriver(_Dom0(), XenConfig(kernel="/k", initrd="/i", state_dir="/var/lib/smig/xen"))
    with pytest.raises(LaunchError, match="cannot read the driver's records"):
        asyncio.run(driver.list())

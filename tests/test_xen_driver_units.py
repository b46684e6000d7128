"""The Xen driver: its pure parts (reading `xl list`, writing a guest's configuration, refusing
specs before anything starts), and its decisions against scripted dom0s (listing, cancelling,
resuming and aborting around xl's handover)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from smig.errors import ConfigError, LaunchError, MigrationCommitted, VMStateError
from smig.hypervisor.commands import TIMED_OUT, CommandResult
from smig.hypervisor.xen import XenConfig, XenDriver
from smig.hypervisor.xl import (
    COMMIT_POINT,
    MIN_MEMORY_MIB,
    NO_RETURN,
    TARGET_STARTING,
    check_spec,
    domain_config,
    parse_xl_list,
)
from smig.model import Accel, IncomingVM, VMSpec, VMState

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


class _Migrating:
    """A dom0 with xl migrate of m1 under way, where the cancel script reports xl past its commit
    point (exit 4) or cut (exit 0)."""

    def __init__(self, cancel_rc: int, log: str = "migration sender: ...") -> None:
        self.cancel_rc, self.log = cancel_rc, log
        self.scripts: list[str] = []

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        script = argv[2] if len(argv) > 2 else ""
        self.scripts.append(script)
        if "kill -STOP" in script:
            return CommandResult(tuple(argv), self.cancel_rc, "", "")
        record = '{"pid": 77, "transport": "socat - TCP:10.0.0.2:8002", "started_at": 0, "domid": 4}'
        rc = "1" if self.cancel_rc == 0 and any("kill -STOP" in s for s in self.scripts) else ""
        if argv[:1] == ["cat"] or tuple(argv[:1]) == ("cat",):  # the VM's own record
            return CommandResult(tuple(argv), 0, '{"spec": {"name": "m1", "memory_mib": 96}, "domid": 4}', "")
        return CommandResult(tuple(argv), 0, f"{record}\n%\n{rc}\n%\n{self.log}", "")


def test_a_cancel_past_xls_commit_point_is_refused_and_one_before_it_cuts_the_transport() -> None:
    config = XenConfig(kernel="/k", initrd="/i", state_dir="/s", poll_s=0.01)
    late = _Migrating(cancel_rc=4)
    with pytest.raises(MigrationCommitted, match="too late to cancel"):
        asyncio.run(XenDriver(late, config).cancel_migration("m1"))
    early = _Migrating(cancel_rc=0)
    asyncio.run(XenDriver(early, config).cancel_migration("m1"))  # returns once xl has exited
    cut = [s for s in early.scripts if "kill -STOP" in s]
    assert len(cut) == 1 and 'pkill -f -x "$4"' in cut[0]
    assert COMMIT_POINT == "migration sender: Target has acknowledged transfer"


def test_a_guest_handed_over_before_the_migration_broke_is_not_resumed_on_its_source() -> None:
    config = XenConfig(kernel="/k", initrd="/i", state_dir="/s", poll_s=0.01)
    broken = _Migrating(cancel_rc=0, log=f"{COMMIT_POINT}.\n{NO_RETURN}.\nmigration sender: failed\n")
    with pytest.raises(VMStateError, match="may run there"):
        asyncio.run(XenDriver(broken, config).resume_source("m1"))
    assert not any("unpause" in s or "rename" in s for s in broken.scripts)


class _Receiving:
    """A target dom0 whose xl migrate-receive has been told to start the guest, and has exited."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.written = ""

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout_s: float = 60.0) -> CommandResult:
        self.calls.append(tuple(argv))
        if argv[0] == "cat":
            return CommandResult(tuple(argv), 0, f"socat: listening\n{TARGET_STARTING}.\n", "")
        if argv[0] == "kill":
            return CommandResult(tuple(argv), 1, "", "no such process")
        if list(argv[:2]) == ["xl", "list"]:
            return CommandResult(tuple(argv), 0, XL_LIST.replace("running ", "m1      "), "")
        if input:
            self.written = input
        return CommandResult(tuple(argv), 0, "", "")


def test_aborting_a_receive_the_sender_already_handed_over_keeps_the_guest_here() -> None:
    dom0 = _Receiving()
    driver = XenDriver(dom0, XenConfig(kernel="/k", initrd="/i", state_dir="/s", poll_s=0.01))
    incoming = IncomingVM(VMSpec(name="m1", memory_mib=96), "tcp:10.0.0.2:8002", 55, "m1", Accel.XEN_PV)
    asyncio.run(driver.abort_incoming(incoming))
    assert '"received_by": 55' in dom0.written and '"domid": 4' in dom0.written  # adopted as this driver's
    assert not any(c[:2] == ("xl", "destroy") or "pkill" in " ".join(c) for c in dom0.calls)

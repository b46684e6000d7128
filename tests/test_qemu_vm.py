"""A real guest under QEMU: it boots, counts, reports, and stops without a trace."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smig.errors import ConfigError, VMExists, VMNotFound
from smig.hypervisor import process
from smig.hypervisor.qemu import QemuDriver
from smig.model import VMSpec, VMState
from tests.helpers import qemu_pids, rising_heartbeat

pytestmark = pytest.mark.qemu


def test_guest_boots_counts_and_stops(driver: QemuDriver, home: Path) -> None:
    async def story() -> None:
        info = await driver.launch(VMSpec(name="vm1", memory_mib=256, dirty_mbps=20))
        assert info.accel is (await driver.accelerator())[0]
        assert info.state is VMState.RUNNING and process.alive(info.pid)
        first = await rising_heartbeat(driver, "vm1")
        await asyncio.sleep(0.5)
        status = await driver.status("vm1")
        assert status.info.state is VMState.RUNNING and status.info.pid == info.pid
        assert status.heartbeat is not None
        assert status.heartbeat.boot_id == first.boot_id and status.heartbeat.counter > first.counter
        assert [i.name for i in await driver.list()] == ["vm1"]

        with pytest.raises(VMExists):
            await driver.launch(VMSpec(name="vm1", memory_mib=256))

        await driver.stop("vm1")
        assert not process.alive(info.pid)
        assert await driver.list() == []
        assert not (home / "vms" / "vm1").exists()
        assert qemu_pids(str(home)) == []

    asyncio.run(story())


def test_unknown_vm_is_a_clear_error(driver: QemuDriver) -> None:
    for call in (driver.status("ghost"), driver.stop("ghost"), driver.spec("ghost")):
        with pytest.raises(VMNotFound, match="no VM named 'ghost'"):
            asyncio.run(call)
    with pytest.raises(ConfigError, match="bad VM name"):
        asyncio.run(driver.status("../etc"))


def test_bad_sizes_are_refused_before_anything_starts(driver: QemuDriver, home: Path) -> None:
    with pytest.raises(ConfigError, match="too little memory"):
        asyncio.run(driver.launch(VMSpec(name="tiny", memory_mib=16)))
    with pytest.raises(ConfigError, match="working set"):
        asyncio.run(driver.launch(VMSpec(name="ws", memory_mib=128, working_set_mib=120)))
    assert qemu_pids(str(home)) == []

"""The shared driver suite: the same tests, through the HypervisorDriver interface only, against
every backend — QEMU on this machine, and Xen in a nested Xen host driven through its dom0."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from smig.errors import ConfigError, MigrationCancelled, VMExists, VMNotFound
from smig.guest.image import GuestImage
from smig.hypervisor.base import Capability, HypervisorDriver
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.xen import XenConfig, XenDriver
from smig.lab.xen_host import XenHost
from smig.model import Heartbeat, MigrationParams, MigrationProgress, MigrationStatus, VMSpec, VMState
from tests.conftest import make_driver

pytestmark = pytest.mark.qemu

_drivers = itertools.count()


@dataclass
class Backend:
    name: str
    new_driver: Callable[[], HypervisorDriver]  # each call: a driver with records of its own
    memory_mib: int  # the smallest guest the backend boots
    made: list[HypervisorDriver]


@pytest.fixture(params=["qemu", "xen"])
def backend(request: pytest.FixtureRequest, session_root: Path, guest_image: GuestImage) -> Iterator[Backend]:
    made: list[HypervisorDriver] = []
    if request.param == "qemu":

        def new_driver() -> HypervisorDriver:
            home = session_root / f"d{next(_drivers)}"
            home.mkdir()
            made.append(make_driver(home))
            return made[-1]

        memory = 128
    else:
        host: XenHost = request.getfixturevalue("xen_host_running")

        def new_driver() -> HypervisorDriver:
            config = XenConfig(
                kernel=str(guest_image.kernel),
                initrd=str(guest_image.initrd),
                state_dir=f"/var/lib/smig/suite{next(_drivers)}",
            )
            made.append(XenDriver(host.channel, config))
            return made[-1]

        memory = 96
    yield Backend(request.param, new_driver, memory, made)
    for driver in made:  # whatever a failed test left behind
        for info in asyncio.run(driver.list()):
            asyncio.run(driver.stop(info.name))


async def _heartbeat(driver: HypervisorDriver, name: str, *, after: int = -1, timeout_s: float = 60) -> Heartbeat:
    """A heartbeat of ``name`` counting past ``after``, then one past that: the guest runs."""
    seen = after
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    first: Heartbeat | None = None
    while loop.time() < deadline:
        hb = (await driver.status(name)).heartbeat
        if hb is not None and hb.counter > seen:
            if first is not None:
                return hb
            first, seen = hb, hb.counter
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name}'s heartbeat did not rise past {seen} within {timeout_s} s")


def test_a_guest_boots_counts_lists_and_stops(backend: Backend) -> None:
    driver = backend.new_driver()
    spec = VMSpec(name="suite1", memory_mib=backend.memory_mib, working_set_mib=16, heartbeat_ms=200)

    async def story() -> None:
        info = await driver.launch(spec)
        assert info.state is VMState.RUNNING and info.name == "suite1"
        hb = await _heartbeat(driver, "suite1")
        status = await driver.status("suite1")
        assert status.info.pid == info.pid and status.info.state is VMState.RUNNING
        assert status.heartbeat is not None and status.heartbeat.boot_id == hb.boot_id
        assert [i.name for i in await driver.list()] == ["suite1"]
        assert await driver.spec("suite1") == spec
        with pytest.raises(VMExists):
            await driver.launch(spec)
        await driver.stop("suite1")
        assert await driver.list() == []
        with pytest.raises(VMNotFound):
            await driver.status("suite1")

    asyncio.run(story())


def test_unknown_vms_and_bad_input_are_clear_errors(backend: Backend) -> None:
    driver = backend.new_driver()

    async def story() -> None:
        for call in (driver.status("ghost"), driver.stop("ghost"), driver.spec("ghost")):
            with pytest.raises(VMNotFound, match="ghost"):
                await call
        with pytest.raises(ConfigError, match="bad VM name"):
            await driver.status("../etc")
        with pytest.raises(ConfigError, match="too little memory"):
            await driver.launch(VMSpec(name="tiny", memory_mib=16))
        assert await driver.list() == []

    asyncio.run(story())


def test_live_migration_moves_the_running_guest_once(backend: Backend) -> None:
    source, target = backend.new_driver(), backend.new_driver()
    assert Capability.LIVE_MIGRATION in source.capabilities
    spec = VMSpec(name="suite2", memory_mib=backend.memory_mib, working_set_mib=16, heartbeat_ms=200)

    async def story() -> None:
        info = await source.launch(spec)
        before = await _heartbeat(source, "suite2")
        seen: list[MigrationProgress] = []
        stats = await live_migrate(source, target, "suite2", MigrationParams(), on_progress=seen.append)
        assert seen and seen[-1].status is MigrationStatus.COMPLETED
        assert stats.source_pid == info.pid and stats.total_ms > 0
        assert await source.list() == [], "the source must no longer hold the VM"
        assert [i.name for i in await target.list()] == ["suite2"]
        after = await _heartbeat(target, "suite2", after=before.counter)
        assert after.boot_id == before.boot_id, "the guest was rebooted, not migrated"
        await target.stop("suite2")

    asyncio.run(story())


def test_a_cancelled_migration_leaves_the_guest_running_on_its_source(backend: Backend) -> None:
    source, target = backend.new_driver(), backend.new_driver()
    spec = VMSpec(name="suite3", memory_mib=backend.memory_mib, dirty_mbps=20, working_set_mib=32, heartbeat_ms=200)
    if Capability.CANCEL_MIGRATION not in source.capabilities:
        pytest.fail(f"{backend.name} declares no cancel")

    async def story() -> None:
        info = await source.launch(spec)
        before = await _heartbeat(source, "suite3")
        cancel = asyncio.Event()

        def on_progress(p: MigrationProgress) -> None:
            if p.status is MigrationStatus.ACTIVE:
                cancel.set()

        # Throttled, so the migration is still running when it is cancelled.
        throttled = Capability.BANDWIDTH_LIMIT in source.capabilities
        params = MigrationParams(bandwidth_mibps=8) if throttled else MigrationParams()
        with pytest.raises(MigrationCancelled):
            await live_migrate(source, target, "suite3", params, on_progress=on_progress, cancel=cancel)
        assert await target.list() == []
        status = await source.status("suite3")
        assert status.info.pid == info.pid and status.info.state is VMState.RUNNING
        after = await _heartbeat(source, "suite3", after=before.counter)
        assert after.boot_id == before.boot_id
        await source.stop("suite3")

    asyncio.run(story())

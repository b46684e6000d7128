"""live_migrate's control flow against a scripted driver pair (no hypervisor): what a cancel does
when the source accepts it, and when it refuses it as too late (Xen's handover has begun)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from smig.errors import MigrationCancelled, MigrationCommitted, MigrationTimeout
from smig.hypervisor.base import Capability
from smig.hypervisor.migration import live_migrate
from smig.model import Accel, IncomingVM, MigrationParams, MigrationProgress, MigrationStatus, VMSpec

SPEC = VMSpec(name="m1", memory_mib=96)


def _progress(status: MigrationStatus) -> MigrationProgress:
    return MigrationProgress(status, 0, 0, 0, 0, 0, 4096, None, 0, 0.0)


class _Driver:
    """Both sides in one: migration_progress answers ACTIVE ``active`` times, then COMPLETED (or
    CANCELLED once a cancel was accepted); every call is recorded."""

    capabilities = frozenset({Capability.LIVE_MIGRATION, Capability.TCP_TRANSPORT, Capability.CANCEL_MIGRATION})

    def __init__(self, *, active: int, refuse_cancel: bool) -> None:
        self.active, self.refuse_cancel, self.cancelled = active, refuse_cancel, False
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            return None

        return call

    async def spec(self, name: str) -> VMSpec:
        return SPEC

    async def prepare_incoming(self, spec: VMSpec, params: MigrationParams, *, port: int | None = None) -> IncomingVM:
        self.calls.append("prepare_incoming")
        return IncomingVM(spec, "tcp:10.0.0.2:8002", 9, "m1", Accel.XEN_PV)

    async def migration_progress(self, name: str) -> MigrationProgress:
        if self.cancelled:
            return _progress(MigrationStatus.CANCELLED)
        self.active -= 1
        return _progress(MigrationStatus.ACTIVE if self.active >= 0 else MigrationStatus.COMPLETED)

    async def cancel_migration(self, name: str) -> None:
        self.calls.append("cancel_migration")
        if self.refuse_cancel:
            raise MigrationCommitted("too late to cancel the migration of m1", vm=name)
        self.cancelled = True


def _migrate(driver: _Driver, params: MigrationParams, cancel: asyncio.Event | None) -> Any:
    return asyncio.run(live_migrate(driver, driver, "m1", params, cancel=cancel))


def test_a_cancel_the_source_accepts_rolls_the_vm_back_to_it() -> None:
    driver, cancel = _Driver(active=5, refuse_cancel=False), asyncio.Event()
    cancel.set()
    with pytest.raises(MigrationCancelled):
        _migrate(driver, MigrationParams(poll_interval_s=0.0), cancel)
    assert driver.calls[-2:] == ["abort_incoming", "resume_source"]
    assert "finish_outgoing" not in driver.calls


def test_a_cancel_refused_as_too_late_lets_the_migration_finish_and_nothing_is_rolled_back() -> None:
    driver, cancel = _Driver(active=3, refuse_cancel=True), asyncio.Event()
    cancel.set()
    _migrate(driver, MigrationParams(poll_interval_s=0.0), cancel)
    assert driver.calls.count("cancel_migration") == 1  # asked once; then the migration runs to its end
    assert driver.calls[-2:] == ["finish_incoming", "finish_outgoing"]
    assert "abort_incoming" not in driver.calls and "resume_source" not in driver.calls


def test_a_time_limit_past_the_commit_point_waits_for_the_end_too() -> None:
    driver = _Driver(active=3, refuse_cancel=True)
    _migrate(driver, MigrationParams(poll_interval_s=0.0, timeout_s=0.0), None)
    assert "resume_source" not in driver.calls and driver.calls[-1] == "finish_outgoing"
    accepted = _Driver(active=3, refuse_cancel=False)
    with pytest.raises(MigrationTimeout):
        _migrate(accepted, MigrationParams(poll_interval_s=0.0, timeout_s=0.0), None)
    assert accepted.calls[-1] == "resume_source"

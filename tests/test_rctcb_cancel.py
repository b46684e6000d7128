"""Cancelling an evacuation: an operator stops one VM's move. The VM stays running where it is,
exactly once; a move that already landed is not undone; one past the point of no return (the
source fenced) cannot be cancelled."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from smig.errors import MigrationError
from smig.ivt.sqlite import SQLiteStore
from smig.rctcb.fake_agents import FakeRegionAgents
from smig.rctcb.orders import OrderState
from tests.test_rctcb_orchestrator import BAD, Clock, build_region, orchestrator, vm


def test_a_cancelled_migration_leaves_the_vm_on_its_source_and_aborts_the_target(tmp_path: Path) -> None:
    fake = FakeRegionAgents()
    fake.faults.stall.add(("t1", "*"))  # the migration into t1 never advances
    build_region(tmp_path / "ivt.sqlite", [vm("web")], fake)
    store = SQLiteStore(tmp_path / "ivt.sqlite")
    orch = orchestrator(store, fake, Clock())

    async def go() -> None:
        (order,) = await orch.evacuate(BAD, "mismatch confirmed by t1, t2")
        for _ in range(4):
            await orch.run_once()
        assert orch.orders()[0].state is OrderState.MIGRATING
        await orch.cancel(order.id, "alice: false alarm")
        await orch.run_until_idle(60)

    asyncio.run(go())
    (done,) = orch.orders()
    assert done.state is OrderState.FAILED and "cancelled by alice: false alarm" in done.reason
    assert fake.running_on("web") == [BAD] and fake.hosts["t1"] == {}
    assert [p.host for p in store.placements()] == [BAD]
    kinds = [e.kind for e in store.audit_entries()]
    assert "migration.cancel-requested" in kinds and kinds[-1] == "migration.failed"
    store.verify_audit()
    store.close()


def test_a_planned_order_is_cancelled_at_once_and_a_finished_one_not_at_all(tmp_path: Path) -> None:
    fake = FakeRegionAgents()
    build_region(tmp_path / "ivt.sqlite", [vm("web"), vm("db")], fake)
    store = SQLiteStore(tmp_path / "ivt.sqlite")
    orch = orchestrator(store, fake, Clock())

    async def go() -> None:
        orders = {o.vm.name: o for o in await orch.evacuate(BAD, "untrusted")}
        await orch.cancel(orders["db"].id, "alice")  # still PLANNED
        await orch.run_until_idle(60)
        with pytest.raises(MigrationError, match="already done"):
            await orch.cancel(orders["web"].id, "alice")
        with pytest.raises(MigrationError, match="no migration order"):
            await orch.cancel("nope", "alice")

    asyncio.run(go())
    states = {o.vm.name: o.state for o in orch.orders()}
    assert states == {"web": OrderState.DONE, "db": OrderState.FAILED}
    assert fake.running_on("db") == [BAD] and fake.running_on("web") != [BAD]
    store.close()


def test_a_fenced_source_is_past_the_point_of_no_return(tmp_path: Path) -> None:
    fake = FakeRegionAgents()
    fake.faults.refuse.add((BAD, "*"))
    build_region(tmp_path / "ivt.sqlite", [vm("web")], fake)
    store = SQLiteStore(tmp_path / "ivt.sqlite")
    orch = orchestrator(store, fake, Clock())

    async def go() -> None:
        (order,) = await orch.evacuate(BAD, "untrusted")
        while orch.orders()[0].state not in (OrderState.FENCING, OrderState.RESTARTING):
            await orch.run_once()
        with pytest.raises(MigrationError, match="cannot be cancelled"):
            await orch.cancel(order.id, "alice")
        await orch.run_until_idle(60)

    asyncio.run(go())
    assert orch.orders()[0].state is OrderState.DONE and fake.running_on("web") != [BAD]
    store.close()


def test_the_api_cancels_for_operators_only_and_says_why_it_cannot(tmp_path: Path) -> None:
    from smig.rctcb.orders import Order
    from tests.test_rctcb_api import new_lab, run

    fake = FakeRegionAgents()
    fake.faults.stall.add(("t1", "*"))
    build_region(tmp_path / "ivt.sqlite", [vm("web")], fake)
    store = SQLiteStore(tmp_path / "ivt.sqlite")
    orch = orchestrator(store, fake, Clock())
    lab = next(new_lab(tmp_path / "api"))

    async def story() -> None:
        async with lab.operator() as op, lab.agent("h1") as agent:
            r = await op.post("/v1/migrations/x/cancel")
            assert (r.status_code, r.json()["reason"]) == (409, "no-orchestrator")
            lab.app.state.cancel_order = orch.cancel
            (order,) = await orch.evacuate(BAD, "untrusted")
            r = await agent.post(f"/v1/migrations/{order.id}/cancel")
            assert (r.status_code, r.json()["reason"]) == (403, "wrong-role")
            r = await op.post(f"/v1/migrations/{order.id}/cancel", json={"reason": "false alarm"})
            assert r.status_code == 202, r.text
            assert Order.from_json(r.json()).cancel == "alice: false alarm"
            await orch.run_until_idle(60)
            r = await op.post(f"/v1/migrations/{order.id}/cancel")
            assert (r.status_code, r.json()["reason"]) == (409, "not-cancellable")
            r = await op.post("/v1/migrations/nope/cancel")
            assert (r.status_code, r.json()["reason"]) == (404, "unknown-order")

    run(story())
    assert orch.orders()[0].state is OrderState.FAILED and fake.running_on("web") == [BAD]
    store.close()
    lab.store.close()


# -- the pure rules, case by case ------------------------------------------------------------------


def _migrating(**changes: Any) -> Any:
    from smig.model import PlacedVM, Resources
    from smig.rctcb.orders import Order

    order = Order("o", PlacedVM("web", BAD, Resources(1, 1024)), BAD, "t1", OrderState.MIGRATING, 1, ("t1",),
                  100.0, 100.0, deadline=1000.0, address="a", cancel="alice")  # fmt: skip
    return dataclasses.replace(order, **changes)


def test_a_cancel_waits_for_where_and_adopts_a_copy_that_landed_anyway() -> None:
    from smig.rctcb.agents import VMWhere as W
    from smig.rctcb.orders import AbortIncoming, Cancel, Confirm, OrchestratorConfig, Where, next_step

    order, config = _migrating(), OrchestratorConfig(fence_timeout_s=30)
    same, actions = next_step(order, Where(((BAD, W.RUNNING), ("t1", W.INCOMING))), 101.0, config)
    assert same is order and actions == (Cancel(BAD, "o.1"), AbortIncoming("t1", "o.1"), Confirm())
    done, _ = next_step(order, Where(((BAD, W.ABSENT), ("t1", W.RUNNING))), 102.0, config)
    assert done.state is OrderState.DONE and done.target == "t1", "too late to cancel: the landed copy stays"
    failed, _ = next_step(order, Where(((BAD, W.RUNNING), ("t1", W.ABSENT))), 103.0, config)
    assert failed.state is OrderState.FAILED and failed.reason == "cancelled by alice"


def test_a_cancel_that_cannot_win_is_dropped_and_the_move_goes_on() -> None:
    from smig.rctcb.agents import VMWhere as W
    from smig.rctcb.orders import OrchestratorConfig, Tick, Where, next_step

    order, config = _migrating(), OrchestratorConfig(fence_timeout_s=30)
    # The VM left its source and runs nowhere yet: cancelling cannot put it back; the source is
    # fenced (its word is not proof) before any cold restart.
    moved_on, _ = next_step(order, Where(((BAD, W.ABSENT), ("t1", W.ABSENT))), 101.0, config)
    assert moved_on.state is OrderState.FENCING and not moved_on.cancel
    # Nothing answers for longer than the fence timeout: the cancel is dropped.
    late, _ = next_step(order, Tick(), 100.0 + 31, config)
    assert not late.cancel


def test_a_cold_restart_needs_a_fence_whatever_the_source_says() -> None:
    from smig.rctcb.agents import VMWhere as W
    from smig.rctcb.orders import Fence, Fenced, OrchestratorConfig, StartFromDisk, Where, next_step

    config = OrchestratorConfig()
    completing = _migrating(state=OrderState.COMPLETING, cancel="", deadline=None)
    # The source says the VM left; the target does not run it (it died on arrival): fence first.
    fencing, actions = next_step(completing, Where(((BAD, W.ABSENT), ("t1", W.ABSENT))), 101.0, config)
    assert fencing.state is OrderState.FENCING and Fence(BAD) in actions
    assert fencing.reason.startswith("the VM was lost on t1 after its migration completed"), fencing.reason
    restarting, _ = next_step(fencing, Fenced(), 102.0, config)
    assert restarting.state is OrderState.RESTARTING and restarting.fenced
    _, actions = next_step(restarting, Where(((BAD, None), ("t1", W.ABSENT))), 103.0, config)
    assert actions == (StartFromDisk("t1", "o.1"),), "fenced and silent: now the disk may boot"


def test_a_vm_still_arriving_is_waited_for_until_its_deadline() -> None:
    from smig.rctcb.agents import VMWhere as W
    from smig.rctcb.orders import Confirm, OrchestratorConfig, Where, completion_timeout, next_step

    config = OrchestratorConfig()
    completing = _migrating(state=OrderState.COMPLETING, cancel="", deadline=None)
    arriving = Where(((BAD, W.ABSENT), ("t1", W.INCOMING)))
    waiting, actions = next_step(completing, arriving, 101.0, config)
    assert (waiting.state, actions) == (OrderState.COMPLETING, (Confirm(),))
    assert waiting.deadline == 101.0 + completion_timeout(completing.vm, config)
    same, actions = next_step(waiting, Where(((BAD, W.PAUSED), ("t1", W.INCOMING))), 102.0, config)
    assert same is waiting and actions == (Confirm(),), "a postmigrate source is no reason to give up either"
    done, _ = next_step(waiting, Where(((BAD, W.ABSENT), ("t1", W.RUNNING))), 103.0, config)
    assert done.state is OrderState.DONE
    # It never lands: past the deadline the VM is treated as lost on the way, fenced before a restart.
    late, _ = next_step(waiting, arriving, waiting.deadline + 1, config)
    assert late.state is OrderState.FENCING

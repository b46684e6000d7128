"""READY: an order whose target is prepared while its source's sending slots are taken.

The pure rules first (``next_step`` with ``may_send``), then an evacuation over the in-memory
agents that prepares ahead and is crashed and resumed while orders wait READY.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from smig.ivt.sqlite import SQLiteStore
from smig.model import PlacedVM, Resources, TrustState
from smig.rctcb.agents import VMWhere
from smig.rctcb.fake_agents import FakeRegionAgents
from smig.rctcb.orchestrator import Orchestrator
from smig.rctcb.orders import (
    AbortIncoming,
    Confirm,
    Fence,
    OrchestratorConfig,
    Order,
    OrderState,
    Prepare,
    Prepared,
    StartFromDisk,
    StartMigration,
    TargetLost,
    Tick,
    Where,
    completion_timeout,
    next_step,
)
from smig.rctcb.placement import PlacementConfig
from smig.rctcb.region import Region
from tests.test_rctcb_orchestrator import (
    BAD,
    PLACEMENT,
    Clock,
    assert_evacuated,
    build_region,
    orchestrator,
    vm,
)
from tests.test_rctcb_orchestrator import CONFIG as ORCHESTRATION

CONFIG = OrchestratorConfig()


def _preparing(**changes: object) -> Order:
    order = Order("o", PlacedVM("web", BAD, Resources(1, 1024)), BAD, "t1", OrderState.PREPARING, 1, ("t1",),
                  100.0, 100.0)  # fmt: skip
    return dataclasses.replace(order, **changes)  # type: ignore[arg-type]


def test_a_prepared_order_without_a_sending_slot_waits_ready_and_sends_when_given_one() -> None:
    ready, actions = next_step(_preparing(), Prepared("tcp:t1:4444"), 101.0, CONFIG, may_send=False)
    assert (ready.state, ready.address, actions) == (OrderState.READY, "tcp:t1:4444", ())
    same, actions = next_step(ready, Tick(), 102.0, CONFIG, may_send=False)
    assert same is ready and actions == (), "no slot: nothing is sent, and nothing else is asked"
    sending, actions = next_step(ready, Tick(), 103.0, CONFIG, may_send=True)
    assert sending.state is OrderState.MIGRATING and actions == (StartMigration(BAD, "tcp:t1:4444", "o.1"),)
    assert sending.deadline == 103.0 + completion_timeout(ready.vm, CONFIG), "the deadline runs from the send"


def test_a_prepared_order_with_a_slot_sends_at_once() -> None:
    sending, actions = next_step(_preparing(), Prepared("tcp:t1:4444"), 101.0, CONFIG)
    assert sending.state is OrderState.MIGRATING and actions == (StartMigration(BAD, "tcp:t1:4444", "o.1"),)


def test_a_ready_order_is_cancelled_at_once_and_its_slot_dropped() -> None:
    ready = _preparing(state=OrderState.READY, address="tcp:t1:4444", cancel="alice")
    failed, actions = next_step(ready, Tick(), 101.0, CONFIG, may_send=True)
    assert failed.state is OrderState.FAILED and failed.reason == "cancelled by alice"
    assert actions == (AbortIncoming("t1", "o.1"),), "nothing was sent: only the prepared slot goes"


def test_a_ready_order_follows_where_like_a_migrating_one() -> None:
    ready = _preparing(state=OrderState.READY, address="tcp:t1:4444")
    W = VMWhere
    same, actions = next_step(ready, Where(((BAD, W.RUNNING), ("t1", W.INCOMING))), 101.0, CONFIG)
    assert same is ready and actions == (), "still on its source: it waits for its slot"
    # The VM vanished from its source before it was sent: fenced (the source's word is no proof)
    # before the prepared slot may take a cold restart.
    fencing, actions = next_step(ready, Where(((BAD, W.ABSENT), ("t1", W.INCOMING))), 101.0, CONFIG)
    assert fencing.state is OrderState.FENCING and Fence(BAD) in actions
    # Its slot is gone (the destination QEMU died, or a dropped cancel aborted it): prepared again,
    # not sent into a dead address.
    again, actions = next_step(ready, Where(((BAD, W.RUNNING), ("t1", W.ABSENT))), 101.0, CONFIG)
    assert (again.state, again.address, actions) == (OrderState.PREPARING, None, (Prepare("t1", "o.1"),))


def test_a_cancel_given_up_on_a_ready_order_does_not_send_past_the_slots() -> None:
    # An operator's cancel that cannot finish in time is dropped and the move goes on; a READY
    # order then waits for a sending slot like any other, it does not send on its own.
    ready = _preparing(state=OrderState.READY, address="tcp:t1:4444", attempt=2, tried=("t0", "t1"), cancel="alice")
    late, actions = next_step(ready, Tick(), 100.0 + CONFIG.fence_timeout_s + 1, CONFIG, may_send=True)
    assert late.state is OrderState.READY and not late.cancel and actions == ()


def test_a_cold_restart_goes_only_to_a_trusted_host() -> None:
    # The source was fenced and the VM runs nowhere: only its disk is left. If the target left
    # TRUSTED meanwhile, the restart moves to the next-best trusted host, never to that one.
    W = VMWhere
    restarting = _preparing(state=OrderState.RESTARTING, address="tcp:t1:4444", fenced=True)
    lost = TargetLost("t1 turned suspect")
    moved, actions = next_step(restarting, lost, 101.0, CONFIG, alternative="t2")
    assert (moved.state, moved.target, moved.tried) == (OrderState.RESTARTING, "t2", ("t1", "t2"))
    assert actions == (StartFromDisk("t2", "o.2"),)
    # With no trusted host left, it waits (asking where the VM is), and restarts nowhere.
    waiting, actions = next_step(restarting, lost, 101.0, CONFIG)
    assert waiting.state is OrderState.RESTARTING and waiting.target == "t1" and actions == (Confirm(),)
    # A landed copy found by `where` is still adopted wherever it runs among the hosts tried.
    done, _ = next_step(moved, Where(((BAD, None), ("t1", W.ABSENT), ("t2", W.RUNNING))), 102.0, CONFIG)
    assert done.state is OrderState.DONE and done.target == "t2"


def test_an_evacuation_that_prepares_ahead_survives_a_restart_with_orders_ready(tmp_path: Path) -> None:
    # Five VMs, two sending at once and two prepared ahead: after the first round two are READY.
    # The RC-TCB then stops (its orders persisted) and a new one resumes them from the store.
    db, vms, fake, placement = _evacuee_region(tmp_path, vms=5, polls=3, ahead=2)

    async def go() -> list[OrderState]:
        with SQLiteStore(db) as store:
            orch = orchestrator(store, fake, Clock(), placement)
            await orch.evacuate(BAD, "mismatch confirmed by t1, t2")
            await orch.run_once()  # targets prepared: four (two ahead)
            await orch.run_once()  # two send; two wait READY
            states = sorted(o.state for o in orch.orders())
        with SQLiteStore(db) as store:
            again = orchestrator(store, fake, Clock(), placement)
            await again.resume()
            await again.run_until_idle(600)
        return states

    states = asyncio.run(go())
    assert states.count(OrderState.READY) == 2 and states.count(OrderState.MIGRATING) == 2, states
    with SQLiteStore(db) as store:
        assert_evacuated(store, fake, vms)
        assert all(o.state is OrderState.DONE for o in orchestrator(store, fake, Clock()).orders())
    assert fake.peak_sending[BAD] == 2
    # Every VM went on its first attempt into the slot prepared for it (a resumed step is repeated,
    # idempotently, under the same id): no retry, no second target.
    for v in vms:
        assert {c[3] for c in fake.calls if c[1] == "migrate" and c[2] == v.name} == {f"{_order_of(fake, v.name)}.1"}
        assert len({c[0] for c in fake.calls if c[1] == "prepare_incoming" and c[2] == v.name}) == 1


def _evacuee_region(
    tmp_path: Path, *, vms: int, polls: int, ahead: int
) -> tuple[Path, list[PlacedVM], FakeRegionAgents, PlacementConfig]:
    """An untrusted host with ``vms`` VMs to move, and placement preparing ``ahead`` moves ahead."""
    db = tmp_path / "ivt.sqlite"
    placed = [vm(f"v{i}") for i in range(vms)]
    fake = FakeRegionAgents(polls_to_complete=polls)
    build_region(db, placed, fake)
    return db, placed, fake, dataclasses.replace(PLACEMENT, prepare_ahead=ahead)


def _order_of(fake: FakeRegionAgents, name: str) -> str:
    return str(fake.migrations[f"{BAD}/{name}"]["order"]).rsplit(".", 1)[0]


def test_a_ready_order_whose_target_lost_trust_goes_elsewhere_or_stays_home() -> None:
    # A slot prepared ahead may wait seconds; its target can turn SUSPECT or UNTRUSTED meanwhile.
    # Nothing is sent there: the order prepares the next-best target, or, with none, gives up
    # with the VM still on its source (never a fence: the source still runs it).
    ready = _preparing(state=OrderState.READY, address="tcp:t1:4444")
    lost = TargetLost("t1 is suspect")
    elsewhere, actions = next_step(ready, lost, 101.0, CONFIG, alternative="t2")
    assert (elsewhere.state, elsewhere.target, elsewhere.tried, elsewhere.address) == (
        OrderState.PREPARING, "t2", ("t1", "t2"), None,
    )  # fmt: skip
    assert AbortIncoming("t1", "o.1") in actions and Prepare("t2", "o.2") in actions
    home, actions = next_step(ready, lost, 101.0, CONFIG)
    assert home.state is OrderState.FAILED and "t1 is suspect" in home.reason
    assert actions == (AbortIncoming("t1", "o.1"),)
    # A slot just prepared on a target that lost trust meanwhile is dropped the same way.
    preparing, actions = next_step(_preparing(), lost, 101.0, CONFIG, alternative="t2")
    assert preparing.state is OrderState.PREPARING and preparing.target == "t2"


def test_the_orchestrator_sends_nothing_to_a_target_that_lost_trust_while_ready(tmp_path: Path) -> None:
    db, _, fake, placement = _evacuee_region(tmp_path, vms=3, polls=4, ahead=1)

    async def go() -> None:
        with SQLiteStore(db) as store:
            region = Region(store)
            orch = Orchestrator(region, fake, placement=placement, config=ORCHESTRATION, clock=Clock())
            await orch.evacuate(BAD, "mismatch confirmed by t1, t2")
            await orch.run_once()
            await orch.run_once()
            (ready,) = [o for o in orch.orders() if o.state is OrderState.READY]
            with region.writing() as (_, current, rows):
                rows[ready.target] = dataclasses.replace(current[ready.target], state=TrustState.SUSPECT)
            await orch.run_until_idle(600)
            final = {o.vm.name: o for o in orch.orders()}[ready.vm.name]
            assert final.state is OrderState.DONE and final.target != ready.target, final
            assert final.tried[0] == ready.target
            sent_to_lost = [c for c in fake.calls if c[1] == "migrate" and c[3] == ready.step_id]
            assert not sent_to_lost, "the VM was sent to a target that had lost trust"

    asyncio.run(go())


def test_the_orchestrator_restarts_a_fenced_vm_only_on_a_trusted_host(tmp_path: Path) -> None:
    db = tmp_path / "ivt.sqlite"
    web = vm("web")
    fake = FakeRegionAgents()
    build_region(db, [web], fake)
    fake.faults.refuse.add((BAD, "web"))  # the untrusted source will not migrate: fenced, then restarted

    async def go() -> None:
        with SQLiteStore(db) as store:
            region = Region(store)
            orch = Orchestrator(region, fake, placement=PLACEMENT, config=ORCHESTRATION, clock=Clock())
            await orch.evacuate(BAD, "mismatch confirmed by t1, t2")
            for _ in range(20):
                await orch.run_once()
                (order,) = orch.orders()
                if order.state is OrderState.RESTARTING:
                    break
            assert order.state is OrderState.RESTARTING, order
            with region.writing() as (_, current, rows):
                rows[order.target] = dataclasses.replace(current[order.target], state=TrustState.SUSPECT)
            await orch.run_until_idle(600)
            (final,) = orch.orders()
            assert final.state is OrderState.DONE and final.target != order.target, final
            assert fake.running_on("web") == [final.target]
            assert not [c for c in fake.calls if c[1] == "start_from_disk" and c[0] == order.target]

    asyncio.run(go())

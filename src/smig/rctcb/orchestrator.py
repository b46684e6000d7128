"""The orchestrator: carries out evacuations through the host agents, one persisted step at a time.

:meth:`Orchestrator.evacuate` plans where the VMs of a host go (:func:`plan_evacuation`) and
writes one order per VM. :meth:`Orchestrator.run_once` advances every active order by one step of
the pure state machine (:func:`smig.rctcb.orders.next_step`): it first commits every order that
changed, each with its ``migration.<state>`` audit entry, in **one** transaction, and only then
calls the agents (write-ahead). An order that reaches DONE moves its VM's placement and both hosts'
load in that same transaction. The agents' answers are kept in memory as the next observations.

Placement bounds the migrations *sending* at once, and lets a few more orders prepare their
target meanwhile (``PlacementConfig.prepare_ahead``): an order prepared while its source's sending
slots are taken waits READY, and sends the round a slot frees.

In the service each order's calls run as a task of their own (``run_once(wait=False)``): an order
whose destination takes seconds to prepare holds back no other order, and the round after an
answer arrives acts on it. An order whose call is still out is left alone until it answers.

A crash can therefore lose only answers, never a step: :meth:`Orchestrator.resume` reloads the
active orders, cleans up earlier attempts, asks ``where`` every host of each order holds the VM,
and lets the state machine decide from that ground truth. Every agent call is idempotent per
order id, so re-issuing the step written last is always safe.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TypeVar
from uuid import uuid4

from smig.errors import (
    DestinationUnreachable,
    HypervisorError,
    MigrationError,
    PortInUse,
    SmigError,
    TLSError,
)
from smig.ivt.base import StoredOrder, Transaction
from smig.model import HostRecord, PlacedVM, Resources, TrustState
from smig.rctcb.agents import AgentDirectory, MigrationPhase, VMWhere
from smig.rctcb.orders import (
    CANCELLABLE,
    AbortIncoming,
    Action,
    Admitted,
    Cancel,
    Confirm,
    Failed,
    Fence,
    Fenced,
    Observation,
    OrchestratorConfig,
    Order,
    OrderState,
    Poll,
    Prepare,
    Prepared,
    Progress,
    Refused,
    Restarted,
    StartFromDisk,
    StartMigration,
    TargetLost,
    Tick,
    Where,
    next_step,
    step_id,
)
from smig.rctcb.placement import InFlight, PlacementConfig, SendSlots, plan_evacuation
from smig.rctcb.region import Region

__all__ = ["Orchestrator", "OrchestratorConfig"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The failures a retry on another target may cure; any other from `migrate` means the source refused.
_TARGET_SIDE = (DestinationUnreachable, PortInUse, TLSError)
# What can go wrong in one agent call; anything else (a bug, a cancellation) is not caught.
_CALL_ERRORS = (SmigError, TimeoutError)


class Orchestrator:
    """Drives the evacuations of one region. One instance per RC-TCB process; not thread-safe."""

    def __init__(
        self,
        region: Region,
        agents: AgentDirectory,
        *,
        placement: PlacementConfig,
        config: OrchestratorConfig,
        clock: Callable[[], float],
    ) -> None:
        self._region = region
        self._store = region.store
        self._agents = agents
        self._placement = placement
        self._config = config
        self._clock = clock
        self._orders: dict[str, Order] = {}
        self._pending: dict[str, Observation] = {}  # the agents' last answers, not yet acted on
        self._calls: dict[str, asyncio.Task[Observation | None]] = {}  # order id -> its calls
        # Set when an answer came back that lets its order move on at once (see `_moves_on`).
        self.answered = asyncio.Event()
        # Told of every order step once it is committed, and of each progress answer: the
        # service streams them as ``migration.*`` events.
        self.listeners: list[Callable[[str, dict[str, object]], None]] = []
        # Deciding and writing a round's steps, and an operator's cancel, take turns: each reads
        # the orders the other may change. The agents' calls run outside it.
        self._deciding = asyncio.Lock()
        self._load()

    def _load(self) -> None:
        self._orders = {o.id: o for o in map(Order.from_json, (s.body for s in self._store.orders()))}
        self._pending.clear()

    # -- reading ---------------------------------------------------------------------------------

    def active(self) -> list[Order]:
        """The orders still being driven, in the order they are advanced."""
        return sorted(self._orders.values(), key=lambda o: (o.created_at, o.vm.name, o.id))

    def orders(self, active_only: bool = False) -> list[Order]:
        """Orders as the store has them (every one ever made, by default)."""
        return [Order.from_json(s.body) for s in self._store.orders(active_only)]

    # -- entry points ----------------------------------------------------------------------------

    async def evacuate(self, host: str, reason: str) -> list[Order]:
        """Order every VM of ``host`` moved; VMs that already have an active order are skipped.

        VMs with no trusted room get a FAILED order at once, with the reason (they keep running on
        ``host``). Returns the new orders. Raises StoreError.
        """
        async with self._deciding:
            now = self._clock()
            busy = {o.vm.name for o in self._orders.values()}
            evacuees = [vm for vm in self._store.placements(host) if vm.name not in busy]
            plan = plan_evacuation(
                evacuees, self._region.rows(), self._store.placements(), self._in_flight(), now, self._placement
            )
            new = [self._order(m.vm, m.target, OrderState.PLANNED, now, reason) for m in (*plan.start, *plan.waiting)]
            new += [
                self._order(n.vm, "", OrderState.FAILED, now, f"no trusted capacity: {n.reason}")
                for n in plan.no_capacity
            ]
            body = {"reason": reason, "orders": len(new), "no_capacity": len(plan.no_capacity)}
            await self._commit([(None, o) for o in new], now, ("evacuation.planned", host, body))
        log.warning("evacuating %s (%s): %d VMs, %d without room", host, reason, len(new), len(plan.no_capacity))
        return new

    async def cancel(self, order_id: str, who: str) -> Order:
        """Ask for ``order_id``'s move to stop (``who``: the operator and why); the next rounds
        carry it out. Raises MigrationError: no such order, finished, or past fencing."""
        async with self._deciding:
            order = self._orders.get(order_id)
            if order is None:
                stored = next((o for o in self.orders() if o.id == order_id), None)
                if stored is None:
                    raise MigrationError(f"no migration order {order_id!r}; GET /v1/migrations?all=true lists them")
                raise MigrationError(f"order {order_id} is already {stored.state.value}: there is nothing to cancel")
            if order.state not in CANCELLABLE:
                raise MigrationError(
                    f"order {order_id} is {order.state.value}: its source is being fenced, so it cannot be "
                    "cancelled (the VM would be left nowhere); it will end on the target"
                )
            now = self._clock()
            new = replace(order, cancel=who, updated_at=now)
            body: dict[str, object] = {"order": order.id, "by": who, "state": order.state.value}
            await self._commit([(order, new)], now, ("migration.cancel-requested", order.vm.name, body))
            return new

    async def resume(self) -> None:
        """On start-up: reload the active orders and learn from the agents where each VM is."""
        self._load()
        for order in self.active():
            if order.state is OrderState.PLANNED:
                continue
            # Earlier attempts of this order were rolled back before the retry was written, but a
            # crash may have come in between: roll them back again (idempotent), then look.
            for attempt, target in enumerate(order.tried[:-1], start=1):
                await self._do(order, Cancel(order.source, step_id(order.id, attempt)))
                await self._do(order, AbortIncoming(target, step_id(order.id, attempt)))
            obs = await self._do(order, Confirm())
            if obs is not None:
                self._pending[order.id] = obs

    async def run_once(self, *, wait: bool = True) -> None:
        """Advance every active order one step: decide, commit, then act. Raises StoreError.

        Each order's answer is taken in as it comes; one that lets its order move on at once (a
        slot prepared, a migration ended, a `where`...) sets :attr:`answered`, so the caller need
        not wait before the next round. ``wait``: await this round's agent calls before
        returning. Without it they run on as tasks, and an order with a call still out is skipped
        by the rounds until then."""
        async with self._deciding:
            now = self._clock()
            admitted: dict[str, Observation] = self._admit(now)
            slots = SendSlots(self._in_flight(), self._placement)
            steps: list[tuple[Order, Order, tuple[Action, ...]]] = []
            for order in self.active():
                if order.id in self._calls:
                    continue  # its last step's call has not answered yet
                obs = admitted.get(order.id) or self._pending.pop(order.id, Tick())
                if _would_send(order, obs) and (lost := self._target_lost(order)):
                    obs = TargetLost(lost)
                may_send = not _would_send(order, obs) or slots.take(order.source, order.target)
                new, actions = next_step(order, obs, now, self._config, may_send=may_send)
                restart = next((a.host for a in actions if isinstance(a, StartFromDisk)), None)
                if restart is not None and (lost := self._target_lost(new, restart)):
                    # Never boot a VM's disk on a host that left TRUSTED: the next-best one instead.
                    alternative = self._alternative(new, now)
                    new, actions = next_step(new, TargetLost(lost), now, self._config, alternative=alternative)
                if new.state in (OrderState.FENCING, OrderState.FAILED) and order.state in _RETRYABLE:
                    # Giving up on the target: ask placement for the next-best one, and decide
                    # again. (Placement runs only here, not on every poll.)
                    alternative = self._alternative(order, now)
                    new, actions = next_step(order, obs, now, self._config, alternative=alternative, may_send=may_send)
                steps.append((order, new, actions))
            changed = [(old, new) for old, new, _ in steps if new != old]
            if changed:
                await self._commit(changed, now, None)
            if any(not new.state.active for _, new in changed) and self._orders:
                # A slot freed in this round goes to a waiting order now: the calls below can take
                # seconds (a destination booting), and it would wait for all of them otherwise.
                steps += await self._start_waiting(now)
            launched = []
            for _, new, actions in steps:
                if actions:
                    task = asyncio.get_running_loop().create_task(self._execute(new, actions))
                    self._calls[new.id] = task
                    task.add_done_callback(functools.partial(self._answer, new.id))
                    launched.append(task)
        if wait:
            await asyncio.gather(*launched)  # a call's unexpected exception (a bug) propagates, as it did

    def _answer(self, order_id: str, task: asyncio.Task[Observation | None]) -> None:
        """Take in one order's answer (a done-callback, on the event loop)."""
        if self._calls.get(order_id) is task:
            del self._calls[order_id]
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("an evacuation call failed unexpectedly", exc_info=task.exception())
            return
        answer = task.result()
        if answer is None or order_id not in self._orders:
            return
        self._pending[order_id] = answer
        if _moves_on(answer):
            self.answered.set()
        if isinstance(answer, Progress):
            view = answer.view
            self._tell(
                "migration.progress",
                self._orders[order_id],
                at=self._clock(),
                status=view.status.value,
                transferred_bytes=view.transferred_bytes,
                remaining_bytes=view.remaining_bytes,
            )

    async def stop(self) -> None:
        """Cancel the agent calls still out (the service is stopping). Every call is idempotent per
        step, and the steps are written: the next run's :meth:`resume` finds where things stand."""
        calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    async def _start_waiting(self, now: float) -> list[tuple[Order, Order, tuple[Action, ...]]]:
        """Let READY orders send and admit PLANNED ones into the slots free now, commit their
        first step; their steps."""
        slots = SendSlots(self._in_flight(), self._placement)
        steps = []
        for order in self.active():
            if (
                order.id not in self._calls
                and _would_send(order, Tick())
                and not self._target_lost(order)
                and slots.take(order.source, order.target)
            ):
                steps.append((order, *next_step(order, Tick(), now, self._config)))
        admitted = self._admit(now)
        for order in self.active():
            if order.state is OrderState.PLANNED and order.id in admitted:
                new, actions = next_step(order, admitted[order.id], now, self._config)
                steps.append((order, new, actions))
        changed = [(old, new) for old, new, _ in steps if new != old]
        if changed:
            await self._commit(changed, now, None)
        return steps

    async def run_until_idle(self, timeout_s: float) -> None:
        """Run rounds until no order is active. Raises MigrationError if some still are after
        ``timeout_s`` (by the injected clock); they stay persisted and go on at the next run."""
        start = self._clock()
        while self._orders:
            await self.run_once()
            if not self._orders:
                return
            if self._clock() - start > timeout_s:
                left = ", ".join(f"{o.vm.name} ({o.state})" for o in self.active())
                raise MigrationError(f"evacuation orders still active after {timeout_s:g}s: {left}")
            await asyncio.sleep(self._config.poll_interval_s)

    # -- deciding --------------------------------------------------------------------------------

    def _order(self, vm: PlacedVM, target: str, state: OrderState, now: float, reason: str) -> Order:
        return Order(f"{vm.name}-{uuid4().hex[:10]}", vm, vm.host, target, state, 0, (), now, now, reason=reason)

    def _in_flight(self, but: str = "") -> list[InFlight]:
        return [
            InFlight(o.vm.name, o.source, o.target, o.vm.needs, sending=o.state not in _NOT_SENDING)
            for o in self._orders.values()
            if o.state is not OrderState.PLANNED and o.id != but
        ]

    def _admit(self, now: float) -> dict[str, Observation]:
        """Give PLANNED orders a slot as the concurrency limits allow, re-placing them on today's load."""
        planned = {o.vm.name: o for o in self._orders.values() if o.state is OrderState.PLANNED}
        if not planned:
            return {}
        vms = [o.vm for o in planned.values()]
        plan = plan_evacuation(
            vms, self._region.rows(), self._store.placements(), self._in_flight(), now, self._placement
        )
        out: dict[str, Observation] = {planned[m.vm.name].id: Admitted(m.target) for m in plan.start}
        out.update({planned[n.vm.name].id: Failed(n.reason) for n in plan.no_capacity})
        return out

    def _target_lost(self, order: Order, host: str | None = None) -> str:
        """Why ``host`` (``order``'s target by default) may no longer receive its VM, or "".
        Checked before every send and every cold restart: a slot prepared ahead may wait seconds,
        and its host can turn SUSPECT or worse meanwhile. (A target merely stale is still used:
        its state, not a late report, is what distrusts it.)"""
        host = host or order.target
        row = self._region.rows().get(host)
        if row is None:
            return f"{host} left the region before {order.vm.name} got there"
        if row.state is not TrustState.TRUSTED:
            return f"{host} turned {row.state.value} before {order.vm.name} got there"
        return ""

    def _alternative(self, order: Order, now: float) -> str | None:
        """The next-best trusted target for ``order`` among the hosts it has not tried."""
        rows = {h: r for h, r in self._region.rows().items() if h not in order.tried}
        plan = plan_evacuation(
            [order.vm], rows, self._store.placements(), self._in_flight(order.id), now, self._placement
        )
        # The order is running already: a concurrency limit does not hold its retry back.
        moves = (*plan.start, *plan.waiting)
        return moves[0].target if moves else None

    # -- persisting (in a worker thread: the store blocks) ---------------------------------------

    async def _commit(
        self,
        changes: Sequence[tuple[Order | None, Order]],
        now: float,
        extra: tuple[str, str, dict[str, object]] | None,
    ) -> None:
        """Write ``changes`` (in a worker thread), then take them into the orders held here, on the
        event loop: nothing else reads or changes those from another thread."""
        await asyncio.to_thread(self._persist, changes, now, extra)
        for _, new in changes:
            if new.state.active:
                self._orders[new.id] = new
            else:
                self._orders.pop(new.id, None)
                self._pending.pop(new.id, None)
            self._tell(f"migration.{new.state.value}", new, at=now)

    def _persist(
        self,
        changes: Sequence[tuple[Order | None, Order]],
        now: float,
        extra: tuple[str, str, dict[str, object]] | None,
    ) -> None:
        # The region keeps the rows in memory: a DONE order changes two rows' load, so write
        # through the region, which commits those rows to its table with this transaction.
        with self._region.writing() as (tx, current, rows):
            if extra is not None:
                tx.audit(*extra, now)
            for _, new in changes:
                if new.state is OrderState.DONE:
                    self._land(tx, new, current, rows)
                tx.put_order(StoredOrder(new.id, new.vm.name, new.state.value, new.state.active, new.to_json()))
                body = {"order": new.id, "source": new.source, "target": new.target, "attempt": new.attempt}
                tx.audit(f"migration.{new.state.value}", new.vm.name, {**body, "reason": new.reason}, now)

    def _tell(self, kind: str, order: Order, **extra: object) -> None:
        body: dict[str, object] = {
            "order": order.id,
            "vm": order.vm.name,
            "source": order.source,
            "target": order.target,
            "state": order.state.value,
            "attempt": order.attempt,
            "reason": order.reason,
            **extra,
        }
        for listener in self.listeners:
            try:
                listener(kind, body)
            except Exception:  # a listener's failure must not stop an evacuation
                log.exception("a migration listener failed")

    def _land(self, tx: Transaction, order: Order, current: dict[str, HostRecord], rows: dict[str, HostRecord]) -> None:
        """Record that ``order``'s VM runs on its target now: placements and both hosts' load."""
        moved = replace(order.vm, host=order.target)
        others = [vm for vm in self._store.placements(order.target) if vm.name != moved.name]
        tx.set_placements(order.target, [*others, moved])  # also takes the VM's row off its source
        needs = order.vm.needs
        for host, sign in ((order.source, -1), (order.target, 1)):
            row = rows.get(host) or current.get(host)
            if row is not None:
                load = row.load + needs if sign > 0 else row.load - needs
                rows[host] = replace(row, load=Resources(max(0, load.vcpus), max(0, load.memory_mib)))

    # -- acting ----------------------------------------------------------------------------------

    async def _execute(self, order: Order, actions: Sequence[Action]) -> Observation | None:
        obs: Observation | None = None
        for action in actions:
            result = await self._do(order, action)
            obs = result if result is not None else obs
        return obs

    async def _call(self, coro: Awaitable[T]) -> T:
        return await asyncio.wait_for(coro, self._config.call_timeout_s)

    async def _do(self, order: Order, action: Action) -> Observation | None:
        """One agent call; its outcome as an observation (None for best-effort rollbacks)."""
        name, agent = order.vm.name, self._agents.agent
        match action:
            case Prepare(host, step):
                try:
                    return Prepared(await self._call(agent(host).prepare_incoming(order.vm, step)))
                except _CALL_ERRORS as e:
                    return Failed(_why(e))
            case StartMigration(source, address, step):
                try:
                    await self._call(agent(source).migrate(name, address, step))
                except _TARGET_SIDE as e:
                    return Failed(_why(e))
                except (MigrationError, HypervisorError, TimeoutError) as e:
                    return Refused(_why(e))
                return await self._do(order, Poll(source, step))
            case Poll(source, step):
                try:
                    return Progress(await self._call(agent(source).progress(name, step, self._config.progress_wait_s)))
                except _CALL_ERRORS as e:
                    return Failed(_why(e))
            case Cancel(source, step):
                await self._best_effort(agent(source).cancel(name, step), action)
            case AbortIncoming(host, step):
                await self._best_effort(agent(host).abort_incoming(name, step), action)
            case Confirm():
                hosts = list(dict.fromkeys((order.source, *order.tried)))
                answers = await asyncio.gather(*(self._where(order, host) for host in hosts))
                return Where(tuple(zip(hosts, answers, strict=True)))
            case Fence(host):
                try:
                    await self._call(agent(host).fence(name))
                    return Fenced()
                except _CALL_ERRORS as e:
                    return Failed(_why(e))
            case StartFromDisk(host, step):
                try:
                    await self._call(agent(host).start_from_disk(order.vm, step))
                    return Restarted()
                except _CALL_ERRORS as e:
                    return Failed(_why(e))
        return None

    async def _where(self, order: Order, host: str) -> VMWhere | None:
        try:
            return await self._call(self._agents.agent(host).where(order.vm.name))
        except _CALL_ERRORS as e:
            log.warning("%s: where on %s: %s", order.vm.name, host, _why(e))
            return None

    async def _best_effort(self, coro: Awaitable[None], action: Action) -> None:
        try:
            await self._call(coro)
        except _CALL_ERRORS as e:
            # What it left behind is found by the next `where` (a copy that landed is adopted).
            log.warning("%s failed: %s", action, _why(e))


_RETRYABLE = (OrderState.PREPARING, OrderState.READY, OrderState.MIGRATING, OrderState.COMPLETING)
# Begun but not sending yet: they count against placement's limits, not against the sending slots.
_NOT_SENDING = (OrderState.PREPARING, OrderState.READY)


def _would_send(order: Order, obs: Observation) -> bool:
    """Whether ``obs`` takes ``order`` into MIGRATING if a sending slot is free (see next_step)."""
    if order.cancel:
        return False
    if order.state is OrderState.PREPARING:
        return isinstance(obs, Prepared)
    return order.state is OrderState.READY and not isinstance(obs, Where | TargetLost)


def _moves_on(answer: Observation) -> bool:
    """An answer the next step acts on at once. A migration still running, a VM still arriving
    where nothing runs it yet, or a call that failed (an agent that is down), waits for the next
    round: asking again at once would only spin."""
    if isinstance(answer, Progress):
        return answer.view.status is not MigrationPhase.ACTIVE
    if isinstance(answer, Where):
        places = [where for _, where in answer.places]
        return VMWhere.INCOMING not in places or VMWhere.RUNNING in places
    return isinstance(answer, Prepared | Fenced | Restarted | Refused | Admitted)


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__

"""Migration orders: one VM's move off an untrusted host, as a pure state machine.

:func:`next_step` takes an order, what the agents last said about it (an *observation*) and the
time, and returns the order's next version and the *actions* to take. It does no I/O: the
orchestrator persists the new order (write-ahead) and only then carries out the actions, whose
results become the next observations. Every state change is one of :data:`TRANSITIONS`.

The path of a live migration is ``PLANNED → PREPARING → MIGRATING → COMPLETING → DONE``; an order
prepared while its source's sending slots are taken waits in READY between PREPARING and
MIGRATING (``next_step``'s ``may_send``: the source's, the target's or the region's limit on
migrations sending at once is reached; see :class:`smig.rctcb.placement.SendSlots`). A target
that fails, or a migration that stalls past its size-based deadline, sends the order back to
PREPARING on the next-best target while attempts remain. A source that refuses (or, attempts
spent, still fails) is fenced and the VM restarted from its disk on the prepared target:
``MIGRATING → FENCING → RESTARTING → COMPLETING → DONE``. Safety rules:

- fencing only with a target slot prepared (``address`` set), so a fenced VM has somewhere to go;
- a restart only after the source was fenced (its own word that the VM is gone is not proof)
  and :class:`Where` showed no trusted host running the VM: never two running copies;
- whenever :class:`Where` shows the VM running on a trusted host it tried, that copy is adopted;
- FAILED only where the VM still runs on its source (nothing was fenced), with the reason;
- an operator's cancel (``Order.cancel``) stops a move only before its source is fenced, ends it
  only once :class:`Where` shows the VM on its source and on no target, and a VM that already
  landed stays where it landed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from smig.errors import ConfigError, StoreError
from smig.model import PlacedVM, Resources
from smig.rctcb.agents import MigrationPhase, MigrationView, VMWhere


class OrderState(StrEnum):
    PLANNED = "planned"  # placed, waiting for a concurrency slot
    PREPARING = "preparing"  # the target is asked for an incoming slot
    READY = "ready"  # the target's slot is prepared; waiting for a sending slot
    MIGRATING = "migrating"  # the source sends the VM live
    COMPLETING = "completing"  # the agents said done; confirming where the VM runs
    FENCING = "fencing"  # the source's VM processes are being stopped out of band
    RESTARTING = "restarting"  # cold restart from disk on the target
    DONE = "done"  # runs on the target, recorded in the placements
    FAILED = "failed"  # nowhere trusted to go: still running on its source

    @property
    def active(self) -> bool:
        return self not in (OrderState.DONE, OrderState.FAILED)


_O = OrderState
TRANSITIONS: frozenset[tuple[OrderState, OrderState]] = frozenset(
    (old, new)
    for old, news in {
        _O.PLANNED: (_O.PREPARING, _O.FAILED),
        _O.PREPARING: (_O.READY, _O.MIGRATING, _O.FENCING, _O.FAILED, _O.DONE),
        _O.READY: (_O.PREPARING, _O.MIGRATING, _O.FENCING, _O.FAILED, _O.DONE),
        _O.MIGRATING: (_O.PREPARING, _O.COMPLETING, _O.FENCING, _O.RESTARTING, _O.DONE, _O.FAILED),
        _O.COMPLETING: (_O.PREPARING, _O.FENCING, _O.RESTARTING, _O.DONE),
        _O.FENCING: (_O.RESTARTING, _O.FAILED, _O.DONE),
        _O.RESTARTING: (_O.FENCING, _O.DONE),
    }.items()
    for new in news
)
"""Every (from, to) change :func:`next_step` may make, besides staying in a state with new fields
(a retry stays PREPARING on another target). Into DONE from the early states is the adoption of a
copy that :class:`Where` found running on a trusted host; PREPARING or READY → FENCING fences a
source found running next to such a copy (READY also fences a source that lost the VM before
sending it, as MIGRATING does). READY → PREPARING: its target lost trust before the send."""


@dataclass(frozen=True)
class OrchestratorConfig:
    """Timing and retries. A migration's deadline is ``max(floor, per_gib * GiB of RAM)`` after it
    starts, like Nova's ``live_migration_completion_timeout`` (800 s/GiB there; we move off an
    untrusted host and would rather fence early). Raises ConfigError on an unusable value."""

    completion_timeout_per_gib_s: float = 60.0
    completion_timeout_floor_s: float = 30.0
    max_attempts: int = 3  # targets tried live before falling back to fence + cold restart
    fence_timeout_s: float = 60.0  # fencing failing this long: give up, the VM stays on its source
    call_timeout_s: float = 30.0  # one agent call
    poll_interval_s: float = 0.5  # between rounds of :meth:`Orchestrator.run_until_idle`
    # A progress call waits this long for its migration to end (a long poll), so a completed
    # migration is seen when it completes rather than at the next round.
    progress_wait_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("completion_timeout_per_gib_s", "completion_timeout_floor_s", "fence_timeout_s", "call_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"orchestrator {name} must be a positive number of seconds, got {value!r}")
        if not (isinstance(self.poll_interval_s, int | float) and 0 <= self.poll_interval_s < math.inf):
            raise ConfigError(
                f"orchestrator poll_interval_s must be zero or more seconds, got {self.poll_interval_s!r}"
            )
        wait = self.progress_wait_s
        if not (isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 10):
            raise ConfigError(f"orchestrator progress_wait_s must be 0-10 seconds, got {wait!r}")
        if wait >= self.call_timeout_s:
            raise ConfigError(
                f"orchestrator progress_wait_s ({wait:g}) must be shorter than call_timeout_s "
                f"({self.call_timeout_s:g}), or every progress call would time out"
            )
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(
                f"orchestrator max_attempts must be a whole number of at least 1, got {self.max_attempts!r}"
            )


def completion_timeout(vm: PlacedVM, config: OrchestratorConfig) -> float:
    """How long ``vm``'s live migration may take, by its size."""
    return max(config.completion_timeout_floor_s, config.completion_timeout_per_gib_s * vm.needs.memory_mib / 1024)


@dataclass(frozen=True)
class Order:
    """One VM's move. ``tried`` lists every target of this order, the current one last; attempt
    ``n`` used ``tried[n - 1]``. ``address`` is the target's incoming slot once prepared."""

    id: str
    vm: PlacedVM
    source: str
    target: str
    state: OrderState
    attempt: int
    tried: tuple[str, ...]
    created_at: float
    updated_at: float
    deadline: float | None = None
    address: str | None = None
    reason: str = ""
    cancel: str = ""  # an operator asked to stop this move: who, and why
    fenced: bool = False  # the source's VM processes were stopped out of band

    @property
    def step_id(self) -> str:
        """The id the agents see: one per attempt, so a retry is not mistaken for a repeat."""
        return step_id(self.id, self.attempt)

    def to_json(self) -> dict[str, object]:
        body = asdict(self)
        body["state"] = self.state.value
        body["tried"] = list(self.tried)
        return body

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Order:
        """Raises StoreError for a body this code did not write."""
        try:
            vm = dict(body["vm"])
            needs = Resources(**vm.pop("needs"))
            fields = {k: v for k, v in body.items() if k != "vm"}
            fields["state"] = OrderState(fields["state"])
            fields["tried"] = tuple(fields["tried"])
            return cls(vm=PlacedVM(needs=needs, **vm), **fields)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"an order in the store cannot be read: {e!r}") from e


def step_id(order_id: str, attempt: int) -> str:
    return f"{order_id}.{attempt}"


# -- observations: what the agents said ---------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """Nothing new, only time: re-issue the current step (the agents take it idempotently)."""


@dataclass(frozen=True)
class Admitted:
    """Placement gave a PLANNED order a concurrency slot, on ``target``."""

    target: str


@dataclass(frozen=True)
class Prepared:
    address: str


@dataclass(frozen=True)
class Progress:
    view: MigrationView


@dataclass(frozen=True)
class Refused:
    """The source would not migrate (or could not be reached to): it is fenced."""

    reason: str


@dataclass(frozen=True)
class Failed:
    """The last action failed for a reason that a retry may cure."""

    reason: str


@dataclass(frozen=True)
class TargetLost:
    """The order's target is no longer a host to send a VM to, or to boot it on (it left
    TRUSTED): seen before a send, and before a cold restart."""

    reason: str


@dataclass(frozen=True)
class Fenced:
    pass


@dataclass(frozen=True)
class Restarted:
    pass


@dataclass(frozen=True)
class Where:
    """What the hosts of an order (source and every target tried) hold of its VM; ``None``: no answer."""

    places: tuple[tuple[str, VMWhere | None], ...]

    def at(self, host: str) -> VMWhere | None:
        return dict(self.places).get(host)


Observation = Tick | Admitted | Prepared | TargetLost | Progress | Refused | Failed | Fenced | Restarted | Where


# -- actions: what the orchestrator must do next ------------------------------------------------


@dataclass(frozen=True)
class Prepare:
    host: str
    step: str


@dataclass(frozen=True)
class StartMigration:
    """``migrate`` then one ``progress``."""

    source: str
    address: str
    step: str


@dataclass(frozen=True)
class Poll:
    source: str
    step: str


@dataclass(frozen=True)
class Cancel:
    """Best effort: errors are logged, and :class:`Where` settles what happened."""

    source: str
    step: str


@dataclass(frozen=True)
class AbortIncoming:
    """Best effort, like :class:`Cancel`."""

    host: str
    step: str


@dataclass(frozen=True)
class Confirm:
    """Ask ``where`` on the source and on every target tried; answers with :class:`Where`."""


@dataclass(frozen=True)
class Fence:
    host: str


@dataclass(frozen=True)
class StartFromDisk:
    host: str
    step: str


Action = Prepare | StartMigration | Poll | Cancel | AbortIncoming | Confirm | Fence | StartFromDisk


# -- the decision -------------------------------------------------------------------------------


def next_step(
    order: Order,
    obs: Observation,
    now: float,
    config: OrchestratorConfig,
    *,
    alternative: str | None = None,
    may_send: bool = True,
) -> tuple[Order, tuple[Action, ...]]:
    """The next version of ``order`` and what to do, given ``obs`` at ``now``.

    ``alternative`` is the next-best trusted target not yet tried (placement's answer), used when
    the current target fails. ``may_send``: a sending slot is free for this order if its target
    is prepared (a PREPARING order that is told ``Prepared``, or a READY one); without it the order
    waits in READY. An unchanged order comes back as the same object. Never raises.
    """
    s = order.state
    if not s.active:
        return order, ()
    if order.cancel and s in CANCELLABLE:
        return _cancelling(order, obs, now, config)
    if isinstance(obs, Where) and s is not OrderState.PLANNED:
        return _reconcile(order, obs, now, config, alternative)
    if s is OrderState.PLANNED:
        if isinstance(obs, Admitted):
            return _go(order, now, OrderState.PREPARING, target=obs.target, attempt=1, tried=(obs.target,)), (
                Prepare(obs.target, step_id(order.id, 1)),
            )
        if isinstance(obs, Failed):  # placement found no room when its turn came
            return _go(order, now, OrderState.FAILED, reason=f"no trusted capacity: {obs.reason}"), ()
        return order, ()
    if s is OrderState.PREPARING:
        if isinstance(obs, TargetLost):
            return _target_lost(order, obs.reason, now, config, alternative)
        if isinstance(obs, Prepared):
            if not may_send:
                return _go(order, now, OrderState.READY, address=obs.address), ()
            return _send(order, obs.address, now, config)
        if isinstance(obs, Failed | Refused):
            return _retry_or_give_up(order, f"{order.target} could not prepare: {obs.reason}", now, config, alternative)
        return order, (Prepare(order.target, order.step_id),)
    if s is OrderState.READY:
        assert order.address is not None, "READY is reached only with a prepared slot"
        if isinstance(obs, TargetLost):
            return _target_lost(order, obs.reason, now, config, alternative)
        return _send(order, order.address, now, config) if may_send else (order, ())
    if s is OrderState.MIGRATING:
        return _migrating(order, obs, now, config, alternative)
    if s is OrderState.RESTARTING and isinstance(obs, TargetLost):
        return _restart_elsewhere(order, obs.reason, now, alternative)
    if s is OrderState.FENCING:
        if isinstance(obs, Fenced):
            return _go(order, now, OrderState.RESTARTING, deadline=None, fenced=True), (Confirm(),)
        if isinstance(obs, Failed) and order.deadline is not None and now >= order.deadline:
            why = f"could not fence {order.source} ({obs.reason}); the VM stays on its source"
            return _go(order, now, OrderState.FAILED, reason=why), (AbortIncoming(order.target, order.step_id),)
        return order, (Fence(order.source),)
    # COMPLETING and RESTARTING act only on what `where` shows; anything else asks again.
    return order, (Confirm(),)


CANCELLABLE = frozenset({OrderState.PLANNED, OrderState.PREPARING, OrderState.READY, OrderState.MIGRATING})
"""Where an operator may still stop a move. Later the source has been fenced or the VM has landed:
going back would leave it nowhere."""


def _cancelling(
    order: Order, obs: Observation, now: float, config: OrchestratorConfig
) -> tuple[Order, tuple[Action, ...]]:
    """Stop the move and leave the VM on its source. Only what `where` shows decides: FAILED once
    the source runs the VM and no target holds it; adopted where a target already runs it. A
    cancel that cannot win (the VM left its source, or nothing answers for too long) is dropped
    and the move goes on as if never cancelled."""
    why = f"cancelled by {order.cancel}"
    if order.state is OrderState.PLANNED or (order.state in _NOT_SENT and order.attempt <= 1):
        # Nothing was sent yet: no copy can be anywhere but on the source.
        abort = (AbortIncoming(order.target, order.step_id),) if order.state in _NOT_SENT else ()
        return _go(order, now, OrderState.FAILED, reason=why), abort
    give_up = replace(order, cancel="")
    if now >= order.updated_at + config.fence_timeout_s:
        return next_step(give_up, obs, now, config, may_send=False)  # a READY one waits for its slot
    if isinstance(obs, Where):
        if any(obs.at(h) is VMWhere.RUNNING for h in order.tried):
            return _reconcile(give_up, obs, now, config, None)  # too late: the landed copy is the VM now
        source = obs.at(order.source)
        if source is VMWhere.RUNNING and all(obs.at(h) is VMWhere.ABSENT for h in order.tried):
            return _go(order, now, OrderState.FAILED, reason=why), ()
        if source is VMWhere.ABSENT and all(obs.at(h) is not None for h in order.tried):
            return _reconcile(give_up, obs, now, config, None)  # it left its source: only moving on helps
    slots = tuple(AbortIncoming(t, step_id(order.id, n)) for n, t in enumerate(order.tried, start=1))
    return order, (Cancel(order.source, order.step_id), *slots, Confirm())


_NOT_SENT = (OrderState.PREPARING, OrderState.READY)  # a first attempt here has sent nothing yet


def _send(order: Order, address: str, now: float, config: OrchestratorConfig) -> tuple[Order, tuple[Action, ...]]:
    deadline = now + completion_timeout(order.vm, config)
    new = _go(order, now, OrderState.MIGRATING, address=address, deadline=deadline)
    return new, (StartMigration(order.source, address, order.step_id),)


def _go(order: Order, now: float, state: OrderState, **changes: object) -> Order:
    assert state is order.state or (order.state, state) in TRANSITIONS, f"{order.state} → {state} is not allowed"
    return replace(order, state=state, updated_at=now, **changes)  # type: ignore[arg-type]


def _migrating(
    order: Order, obs: Observation, now: float, config: OrchestratorConfig, alternative: str | None
) -> tuple[Order, tuple[Action, ...]]:
    if isinstance(obs, Refused):
        return _fence(order, f"{order.source} refused to migrate: {obs.reason}", now, config)
    if isinstance(obs, Progress):
        status = obs.view.status
        if status is MigrationPhase.COMPLETED:
            return _go(order, now, OrderState.COMPLETING, deadline=None), (Confirm(),)
        if status is not MigrationPhase.ACTIVE:
            why = f"migration to {order.target} {status.value}" + (f": {obs.view.error}" if obs.view.error else "")
            return _retry_or_give_up(order, why, now, config, alternative)
    if order.deadline is not None and now >= order.deadline:
        why = f"migration to {order.target} did not complete within {completion_timeout(order.vm, config):g}s"
        return _retry_or_give_up(order, why, now, config, alternative)
    if isinstance(obs, Progress | Failed):
        return order, (Poll(order.source, order.step_id),)
    # A Tick: the start may never have reached the source (a crash after the write); it is idempotent.
    assert order.address is not None
    return order, (StartMigration(order.source, order.address, order.step_id),)


def _retry_or_give_up(
    order: Order, why: str, now: float, config: OrchestratorConfig, alternative: str | None
) -> tuple[Order, tuple[Action, ...]]:
    old = (Cancel(order.source, order.step_id), AbortIncoming(order.target, order.step_id))
    if order.attempt < config.max_attempts and alternative is not None and alternative not in order.tried:
        attempt = order.attempt + 1
        new = _go(
            order, now, OrderState.PREPARING, target=alternative, attempt=attempt,
            tried=(*order.tried, alternative), address=None, deadline=None, reason=why,
        )  # fmt: skip
        return new, (*old, Prepare(alternative, step_id(order.id, attempt)))
    if order.address is not None:
        return _fence(order, why, now, config)
    # Nothing was fenced and no slot is ready: the VM keeps running where it is.
    return _go(order, now, OrderState.FAILED, reason=f"no trusted capacity: {why}"), old


def _target_lost(
    order: Order, why: str, now: float, config: OrchestratorConfig, alternative: str | None
) -> tuple[Order, tuple[Action, ...]]:
    """Nothing was sent to this attempt's target, and nothing may be: prepare the next-best one, or
    give up with the VM still on its source (a fence is no answer: the source still runs it)."""
    retried = _retry_or_give_up(replace(order, address=None), why, now, config, alternative)
    if retried[0].state is OrderState.FAILED:
        return retried[0], (AbortIncoming(order.target, order.step_id),)
    return retried


def _restart_elsewhere(order: Order, why: str, now: float, alternative: str | None) -> tuple[Order, tuple[Action, ...]]:
    """A fenced VM's cold restart was due on a target that is no longer TRUSTED: restart it on the
    next-best trusted host instead (the hosts tried stay in ``where``, so a copy that did start on
    the old one is still found and adopted). With none, wait: the disk boots nowhere untrusted."""
    if alternative is None or alternative in order.tried:
        return order, (Confirm(),)
    attempt = order.attempt + 1
    new = _go(
        order, now, OrderState.RESTARTING, target=alternative, attempt=attempt,
        tried=(*order.tried, alternative), reason=why,
    )  # fmt: skip
    return new, (StartFromDisk(alternative, step_id(order.id, attempt)),)


def _fence(order: Order, why: str, now: float, config: OrchestratorConfig) -> tuple[Order, tuple[Action, ...]]:
    assert order.address is not None, "never fence without a target slot ready"
    new = _go(order, now, OrderState.FENCING, deadline=now + config.fence_timeout_s, reason=why)
    return new, (Cancel(order.source, order.step_id), Fence(order.source))


def _reconcile(
    order: Order, obs: Where, now: float, config: OrchestratorConfig, alternative: str | None
) -> tuple[Order, tuple[Action, ...]]:
    """Decide from ground truth: after a crash, after a completion, and before any restart."""
    s, source = order.state, obs.at(order.source)
    # The current target first, then earlier ones: a cancelled migration may have completed anyway.
    for host in (order.target, *reversed(order.tried[:-1])):
        if obs.at(host) is VMWhere.RUNNING:
            if source in (VMWhere.RUNNING, VMWhere.PAUSED):
                # Two copies: the untrusted one goes; the trusted copy is kept and adopted after.
                why = f"running on both {order.source} and {host}"
                new = _go(
                    order, now, OrderState.FENCING, target=host, deadline=now + config.fence_timeout_s, reason=why
                )
                return new, (Fence(order.source),)
            done = _go(order, now, OrderState.DONE, target=host, deadline=None)
            stale = tuple(AbortIncoming(t, step_id(order.id, i + 1)) for i, t in enumerate(order.tried) if t != host)
            return done, stale
    if s is OrderState.PREPARING:
        return order, (Prepare(order.target, order.step_id),)
    if s is OrderState.FENCING:
        return order, (Fence(order.source),)
    if s is OrderState.COMPLETING and obs.at(order.target) is VMWhere.INCOMING:
        # The source sent the last of the VM, and the target is still taking it in (QEMU stays
        # "inmigrate" until the device state is loaded): the VM is arriving, not lost, and a cold
        # restart now would throw away the copy that just crossed. Wait, within the deadline.
        if order.deadline is None:
            return _go(order, now, OrderState.COMPLETING, deadline=now + completion_timeout(order.vm, config)), (
                Confirm(),
            )
        if now < order.deadline:
            return order, (Confirm(),)
    # Once fenced, the source's silence is expected (an agent that ignores the RC-TCB): the fence,
    # not its word, is what shows the VM gone from it.
    if source is VMWhere.ABSENT or (order.fenced and source is None):
        if any(obs.at(h) is None for h in order.tried):
            return order, (Confirm(),)  # a target that did not answer may run it: never restart blind
        if not order.fenced:
            # The untrusted source says the VM is gone from it; its word is not proof. Fence it (a
            # no-op if true) before the VM is booted anywhere else.
            why = f"{order.source} says it no longer runs the VM; fenced before a cold restart"
            if s is OrderState.COMPLETING:
                # The migration completed and the target holds nothing: its QEMU took the VM in and
                # then exited (a guest that panicked on arrival; its logs are the target's to keep).
                why = (
                    f"the VM was lost on {order.target} after its migration completed (its QEMU exited); "
                    f"{order.source} fenced before a cold restart"
                )
            return _fence(order, why, now, config)
        # Nowhere running: only the disk is left. Restart it on the target (the one safe move).
        new = order if s is OrderState.RESTARTING else _go(order, now, OrderState.RESTARTING, deadline=None)
        return new, (StartFromDisk(order.target, order.step_id),)
    if s is OrderState.RESTARTING:
        return _go(order, now, OrderState.FENCING, deadline=now + config.fence_timeout_s), (Fence(order.source),)
    if s is OrderState.READY:
        if obs.at(order.target) is VMWhere.ABSENT:
            # The slot is gone (its QEMU died, or a cancel dropped it): prepare it again rather
            # than send into a dead address.
            return _go(order, now, OrderState.PREPARING, address=None), (Prepare(order.target, order.step_id),)
        return order, ()  # the source still holds the VM (or did not answer): it waits for its slot
    if s is OrderState.COMPLETING:
        why = f"{order.target} does not run the VM after the migration said it completed"
        return _retry_or_give_up(order, why, now, config, alternative)
    # MIGRATING, the source still holds the VM (or did not answer): carry on; start is idempotent.
    return _migrating(order, Tick(), now, config, alternative)

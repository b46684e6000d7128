"""The RC-TCB's orders, carried out on this host: live migrations in and out, and cold restarts.

:class:`OrderExecutor` is the host's side of :class:`~smig.rctcb.agents.AgentClient`, all of it
but ``fence`` (which goes round the agent, to the host's BMC). It drives the local driver through
Nova's phases, one side per host: ``prepare_incoming`` / ``finish_incoming`` / ``abort_incoming``
when this host receives, ``start_migration`` / ``migration_progress`` / ``cancel_migration`` /
``resume_source`` / ``finish_outgoing`` when it sends.

**Idempotent per order id.** Every call that changes something names the RC-TCB's order id (one
per attempt), and the order is written to the journal before the hypervisor is touched. A call
repeated with an order id the journal knows does not start a second process or migration: it
answers from the journal (``prepare_incoming`` gives the same address; ``progress`` of a finished
order says how it finished, never ``none``).

**Restart-safe.** The journal is one JSON file, ``<state_dir>/orders.json``, replaced atomically
(temp file, fsync, rename). Each order has a side, a VM, the incoming address and a stage::

    target:   prepared ──► arrived             (the VM came in and runs here)
                  └──────► aborted ──► prepared  (slot dropped; re-prepared if the order repeats)
    source:   migrating ──► completing ──► completed   (QEMU done → the source QEMU is stopped)
                  └──────► failed | cancelled          (the VM was resumed here)
    restart:  starting ──► started ──► starting   (again only if the VM stopped since)

Orders still ``prepared``, ``migrating`` or ``completing`` are followed by a background task each,
started when the order is given and again when a new executor opens the journal (QEMU carries on
with a migration while no agent watches). The same settling also runs inside ``progress``,
``where`` and every other call about that VM, so the order in which the RC-TCB asks never
matters. After a completed migration the source says ABSENT and the target RUNNING; after a
failed or cancelled one the VM runs on the source and the target's slot is gone: one running
copy, always.

The address a target hands out (and the source receives back through the RC-TCB) is compact
JSON: ``{"v":1,"order":ID,"uri":"tcp:HOST:PORT","tls":NAME|null,"pid":N,"instance":ID,
"accel":"tcg"}``. The source accepts only ``tcp:`` URIs: QEMU would run an ``exec:`` one as a
shell command.

Errors follow :mod:`smig.rctcb.agents`: VMNotFound, MigrationError (DestinationUnreachable,
TLSError, PortInUse), HypervisorError.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from smig.agent.journal import JOURNAL, TRANSITIONS, Journal, JournalOrder, Side, Stage
from smig.agent.migration_tls import migration_tls_dir
from smig.errors import (
    ConfigError,
    DestinationUnreachable,
    HypervisorError,
    MigrationError,
    QMPError,
    SmigError,
    VMExists,
    VMNotFound,
    VMStateError,
)
from smig.hypervisor.base import Capability, HypervisorDriver
from smig.hypervisor.qemu import QemuDriver
from smig.model import (
    Accel,
    IncomingVM,
    MigrationParams,
    MigrationStatus,
    PlacedVM,
    TLSConfig,
    Transport,
    VMSpec,
    VMState,
    valid_vm_name,
)
from smig.rctcb.agents import MigrationPhase, MigrationView, VMWhere

__all__ = [
    "JOURNAL",
    "TRANSITIONS",
    "ExecutorWaits",
    "OrderExecutor",
    "Side",
    "Stage",
    "migration_tls_dir",
    "restart_key",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PROGRESS_WAIT_S = 10.0  # the longest a `progress` call may wait for its migration to end
SLOT_POLL_S = 1.0  # how often a follower looks at an incoming slot (its VM arrived? its QEMU died?)


@dataclass(frozen=True)
class ExecutorWaits:
    """How long the executor gives its driver. The defaults suit a QEMU answering on its socket
    within milliseconds; a driver whose every question runs host tools (Xen's ``xl``, slower
    still in a nested dom0) needs them in seconds."""

    poll_interval_s: float = 0.2  # how often a follower settles an outgoing migration
    settle_wait_s: float = 0.3  # how long a call gives a slot to say it runs the VM
    abort_grace_s: float = 1.0  # how long an abort gives a slot taking in the last bytes
    slot_glance_s: float = 0.1  # how long a follower gives the slot's QEMU to say it runs the VM


# -- the address a target hands out -----------------------------------------------------------

_TCP_URI = re.compile(r"^tcp:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")


def _address(incoming: IncomingVM, order_id: str) -> str:
    body = {
        "v": 1, "order": order_id, "uri": incoming.uri, "tls": incoming.tls_hostname,
        "pid": incoming.pid, "instance": incoming.instance, "accel": incoming.accel.value,
    }  # fmt: skip
    return json.dumps(body, separators=(",", ":"))


def _destination(address: str, spec: VMSpec) -> IncomingVM:
    """The target's slot as the source needs it. Raises DestinationUnreachable for a bad address."""
    try:
        body = json.loads(address)
        uri, tls, pid, instance = body["uri"], body.get("tls"), body["pid"], body["instance"]
        if not (isinstance(uri, str) and _TCP_URI.match(uri)):
            raise ValueError(f"{uri!r} is not a tcp:HOST:PORT address")
        if not (tls is None or isinstance(tls, str)) or not isinstance(pid, int) or not isinstance(instance, str):
            raise ValueError("a field has the wrong type")
        return IncomingVM(spec, uri, pid, instance, Accel(body["accel"]), tls)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DestinationUnreachable(
            f"{address[:200]!r} is not an incoming address a target agent gave ({e}); "
            "the RC-TCB must pass on what prepare_incoming returned",
            vm=spec.name,
        ) from None


def _incoming_json(incoming: IncomingVM) -> dict[str, Any]:
    return {**dataclasses.asdict(incoming), "accel": incoming.accel.value}


def _incoming_of(order: JournalOrder) -> IncomingVM:
    assert order.incoming is not None
    body = order.incoming
    return IncomingVM(
        VMSpec(**body["spec"]), body["uri"], body["pid"], body["instance"], Accel(body["accel"]), body["tls_hostname"]
    )


def _spec_of(vm: PlacedVM) -> VMSpec:
    """The VMSpec an order carries. Raises HypervisorError when there is none or it is unreadable."""
    if not vm.spec:
        raise HypervisorError(
            f"the order for {vm.name} carries no VM spec (its host's agent never reported one to the RC-TCB), "
            "so this host cannot prepare for it",
            vm=vm.name,
        )
    try:
        body = json.loads(vm.spec)
        spec = VMSpec(**body)
        for f in dataclasses.fields(VMSpec):
            value, want = getattr(spec, f.name), str if f.name in ("name", "cpu_model") else int
            if not isinstance(value, want) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be {want.__name__}, not {value!r}")
    except (ValueError, TypeError) as e:
        raise HypervisorError(f"the spec of {vm.name} in the order is unreadable ({e}): {vm.spec[:200]!r}") from None
    if spec.name != vm.name:
        raise HypervisorError(f"the order for {vm.name} carries the spec of {spec.name}", vm=vm.name)
    return spec


_WHERE = {
    VMState.RUNNING: VMWhere.RUNNING,
    VMState.PAUSED: VMWhere.PAUSED,
    VMState.MIGRATED: VMWhere.PAUSED,  # postmigrate: `cont` would make a second copy
    VMState.UNKNOWN: VMWhere.PAUSED,  # a process that does not answer still holds the VM
    VMState.INCOMING: VMWhere.INCOMING,
}


class OrderExecutor:
    """Carries out the RC-TCB's orders through ``driver``; the journal lives in ``state_dir``.

    ``tls``: this host's migration credentials (:func:`migration_tls_dir`); given, every migration
    in and out runs over TLS, and a QEMU driver must have been built with the same credentials
    (``True``: over TLS with whatever credentials the driver was built with).
    ``bandwidth_mibps``, ``downtime_ms``: as :class:`~smig.model.MigrationParams` (None: the
    driver's default). ``waits``: :class:`ExecutorWaits`, fitted to the driver.
    Use it as an async context manager, or call :meth:`start` and :meth:`close`.

    Raises ConfigError at construction: a driver that lacks a capability this needs, credentials
    that differ from the driver's, an unreadable journal.
    """

    def __init__(
        self,
        driver: HypervisorDriver,
        state_dir: Path,
        *,
        tls: TLSConfig | bool | None = None,
        bandwidth_mibps: float | None = None,
        downtime_ms: int | None = None,
        waits: ExecutorWaits = ExecutorWaits(),
        progress_poll_s: float = 0.05,
        retention_s: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Cancelling is not needed: without it a cancel is refused and the migration runs to its
        # own end, which the RC-TCB's `where` then finds (Xen here: docs/XEN.md).
        need = {Capability.LIVE_MIGRATION, Capability.TCP_TRANSPORT}
        need |= {Capability.TLS_MIGRATION} if tls else set()
        need |= {Capability.BANDWIDTH_LIMIT} if bandwidth_mibps is not None else set()
        missing = need - driver.capabilities
        if missing:
            raise ConfigError(f"the hypervisor driver cannot do {', '.join(sorted(m.value for m in missing))}")
        own = driver.config.tls if isinstance(driver, QemuDriver) else True
        if tls and (own is None or tls not in (True, own)):
            raise ConfigError(
                f"migration over TLS needs the QEMU driver built with the same credentials: it has "
                f"{own}, the executor was given {tls}; set QemuConfig(tls=...)"
            )
        self._driver = driver
        self._params = MigrationParams(
            Transport.TCP,
            bandwidth_mibps=bandwidth_mibps,
            downtime_limit_ms=MigrationParams.downtime_limit_ms if downtime_ms is None else downtime_ms,
            tls=bool(tls),
        )
        self._waits = waits
        self._progress_poll_s = progress_poll_s
        self._journal = Journal(state_dir, retention_s, clock)
        self._locks: dict[str, asyncio.Lock] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._started = False

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the orders a previous executor left in flight (also done on the first call), and
        stop any destination QEMU no order knows: one a killed agent started but never journalled."""
        self._ensure_started()
        if isinstance(self._driver, QemuDriver):
            keep = frozenset(
                (o.vm, str(o.incoming["instance"]))
                for o in self._journal.orders.values()
                if o.side is Side.TARGET and o.incoming is not None and "instance" in o.incoming
            )
            await self._driver.stop_stray_incoming(keep)

    async def close(self) -> None:
        """Stop following; QEMU carries on, and a new executor over the same journal picks up."""
        tasks = list(self._followers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._followers.clear()
        self._started = False

    async def __aenter__(self) -> OrderExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            for order in list(self._journal.orders.values()):
                if order.stage.in_flight:
                    self._follow(order)

    def _lock(self, vm: str) -> asyncio.Lock:
        return self._locks.setdefault(vm, asyncio.Lock())

    def _of(self, vm: str, side: Side | None = None, *stages: Stage) -> list[JournalOrder]:
        return [
            o
            for o in self._journal.orders.values()
            if o.vm == vm and (side is None or o.side is side) and (not stages or o.stage in stages)
        ]

    def _known(self, order_id: str, side: Side, vm: str) -> JournalOrder | None:
        order = self._journal.orders.get(order_id)
        if order is not None and (order.side is not side or order.vm != vm):
            raise HypervisorError(
                f"order {order_id} is a {order.side.value} order for {order.vm} on this host; "
                f"it cannot also be a {side.value} order for {vm}",
                vm=vm,
            )
        return order

    # -- the orders ----------------------------------------------------------------------------

    async def prepare_incoming(self, vm: PlacedVM, order_id: str) -> str:
        """Start a QEMU waiting for ``vm``'s migration; the address the source must send to.

        Raises: HypervisorError (VMExists when the VM runs here; no or a bad spec in the order),
        PortInUse, TLSError, LaunchError."""
        self._ensure_started()
        spec = _spec_of(vm)
        async with self._lock(vm.name):
            await self._settle_all(vm.name)
            order = self._known(order_id, Side.TARGET, vm.name)
            if order is not None and order.stage in (Stage.PREPARED, Stage.ARRIVED):
                return order.address
            if await self._here(vm.name) in (VMWhere.RUNNING, VMWhere.PAUSED):
                raise VMExists(f"{vm.name} already runs on this host: it cannot be received here", vm=vm.name)
            for old in self._of(vm.name, Side.TARGET, Stage.PREPARED):  # an older order's slot is replaced
                if (await self._abort_slot(old)).stage is Stage.ARRIVED:
                    raise VMExists(f"{vm.name} arrived here by order {old.id} meanwhile", vm=vm.name)
            incoming = await self._call(self._driver.prepare_incoming(spec, self._params), vm.name)
            address = _address(incoming, order_id)
            changes: dict[str, Any] = {"address": address, "incoming": _incoming_json(incoming), "error": None}
            if order is None:
                new = JournalOrder(order_id, Side.TARGET, vm.name, Stage.PREPARED, **changes)
            else:
                new = order.to(Stage.PREPARED, **changes)
            try:
                new = await self._journal.put(new)
            except BaseException:
                await self._driver.abort_incoming(incoming)
                raise
            log.info("%s: waiting for its migration at %s (order %s)", vm.name, incoming.uri, order_id)
            self._follow(new)
            return address

    async def migrate(self, vm_name: str, target_address: str, order_id: str) -> None:
        """Start sending ``vm_name`` to ``target_address``; returns once QEMU has started.

        Raises: VMNotFound, MigrationError (already migrating for another order), DestinationUnreachable
        (a bad address), TLSError, HypervisorError."""
        self._ensure_started()
        async with self._lock(vm_name):
            if self._known(order_id, Side.SOURCE, vm_name) is not None:
                return  # started (or finished) already
            await self._settle_all(vm_name)
            busy = self._of(vm_name, Side.SOURCE, Stage.MIGRATING, Stage.COMPLETING)
            if busy:
                raise MigrationError(f"{vm_name} is already migrating for order {busy[0].id}", vm=vm_name)
            spec = await self._call(self._driver.spec(vm_name), vm_name)
            destination = _destination(target_address, spec)
            order = await self._journal.put(
                JournalOrder(order_id, Side.SOURCE, vm_name, Stage.MIGRATING, address=target_address)
            )
            try:
                await self._driver.start_migration(vm_name, destination, self._params)
            except SmigError as e:
                await self._journal.drop(order_id)  # QEMU refused: nothing started
                if isinstance(e, VMStateError) and await self._source_gone(vm_name):
                    raise VMNotFound(f"{vm_name} does not run on this host (its QEMU exited)", vm=vm_name) from e
                raise
            except BaseException:
                self._follow(order)  # cancelled half-way: whatever QEMU did, the follower finds out
                raise
            log.info("%s: migrating to %s (order %s)", vm_name, destination.uri, order_id)
            self._follow(order)

    async def progress(self, vm_name: str, order_id: str, wait_s: float = 0.0) -> MigrationView:
        """Where the outgoing migration of ``order_id`` stands (``none``: never given here). With
        ``wait_s``, QEMU is asked every ``progress_poll_s`` until the migration is no longer
        active or ``wait_s`` has passed: the RC-TCB sees the end when it comes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_s, MAX_PROGRESS_WAIT_S)
        while True:
            view = await self._progress_now(vm_name, order_id)
            if view.status is not MigrationPhase.ACTIVE or loop.time() >= deadline:
                return view
            # The lock is not held meanwhile: a cancel or `where` for this VM goes in between.
            await asyncio.sleep(min(self._progress_poll_s, max(0.0, deadline - loop.time())))

    async def _progress_now(self, vm_name: str, order_id: str) -> MigrationView:
        self._ensure_started()
        async with self._lock(vm_name):
            order = self._journal.orders.get(order_id)
            if order is None or order.side is not Side.SOURCE or order.vm != vm_name:
                return MigrationView(MigrationPhase.NONE)
            try:
                order = await self._settle(order)
            except SmigError:
                if order.stage is not Stage.COMPLETING:
                    raise
                # QEMU said completed; stopping the source is the follower's to finish.
            return _view(order)

    async def cancel(self, vm_name: str, order_id: str) -> None:
        """Cancel the outgoing migration of ``order_id``; the VM keeps running here (unless it
        completed first). Raises HypervisorError."""
        self._ensure_started()
        async with self._lock(vm_name):
            order = self._journal.orders.get(order_id)
            if order is None or order.side is not Side.SOURCE or order.vm != vm_name:
                return
            order = await self._settle(order)
            if order.stage is Stage.MIGRATING and Capability.CANCEL_MIGRATION not in self._driver.capabilities:
                raise HypervisorError(
                    f"this host's hypervisor cannot cancel a migration: {vm_name}'s runs to its end", vm=vm_name
                )
            if order.stage is Stage.MIGRATING:
                try:
                    await self._driver.cancel_migration(vm_name)
                except QMPError:
                    if not await self._source_gone(vm_name):
                        raise
                order = await self._settle(order)
            log.info("%s: order %s is %s after cancel", vm_name, order_id, order.stage.value)

    async def abort_incoming(self, vm_name: str, order_id: str) -> None:
        """Drop the incoming slot of ``order_id``; a VM that arrived through it is left running."""
        self._ensure_started()
        async with self._lock(vm_name):
            order = self._journal.orders.get(order_id)
            if order is not None and (order.side, order.vm, order.stage) == (Side.TARGET, vm_name, Stage.PREPARED):
                await self._abort_slot(order)

    async def where(self, vm_name: str) -> VMWhere:
        """What this host holds of ``vm_name`` now, after settling its orders. Raises HypervisorError."""
        self._ensure_started()
        if not valid_vm_name(vm_name):
            return VMWhere.ABSENT  # no VM of such a name can exist here
        async with self._lock(vm_name):
            await self._settle_all(vm_name)
            return await self._here(vm_name)

    async def start_from_disk(self, vm: PlacedVM, order_id: str) -> None:
        """Boot ``vm`` here from its spec (cold restart); returns once its guest runs. A VM that
        already runs here is left as it is. Raises HypervisorError (LaunchError, VMStateError)."""
        self._ensure_started()
        spec = _spec_of(vm)
        # The RC-TCB prepares the slot and then restarts into it under the same attempt's id: the
        # restart is journalled under its own key so the two never collide.
        order_id = restart_key(order_id)
        async with self._lock(vm.name):
            await self._settle_all(vm.name)
            order = self._known(order_id, Side.RESTART, vm.name)
            here = await self._here(vm.name)
            if here is VMWhere.PAUSED:
                raise VMStateError(
                    f"{vm.name} has a paused QEMU on this host; stop it before a cold restart, "
                    "which would make a second copy",
                    vm=vm.name,
                )
            for slot in self._of(vm.name, Side.TARGET, Stage.PREPARED):  # nothing will migrate into them now
                if (await self._abort_slot(slot)).stage is Stage.ARRIVED:
                    here = VMWhere.RUNNING
            if here is not VMWhere.RUNNING:
                starting = JournalOrder(order_id, Side.RESTART, vm.name, Stage.STARTING)
                starting = order.to(Stage.STARTING) if order else starting
                await self._journal.put(starting)
                try:
                    await self._call(self._driver.launch(spec), vm.name)
                    log.info("%s: started from its disk (order %s)", vm.name, order_id)
                except VMExists:
                    pass
                except BaseException:
                    await self._journal.drop(order_id)  # nothing runs: a repeat tries again
                    raise
                order = starting
            if order is None:
                order = JournalOrder(order_id, Side.RESTART, vm.name, Stage.STARTED)
            await self._journal.put(order.to(Stage.STARTED))

    # -- settling ------------------------------------------------------------------------------

    async def _call(self, coro: Awaitable[T], vm: str) -> T:
        """A driver call whose ConfigError (a spec or name it cannot use) is this host's failure."""
        try:
            return await coro
        except ConfigError as e:
            raise HypervisorError(str(e), vm=vm) from e

    def _follow(self, order: JournalOrder) -> None:
        task = self._followers.get(order.id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._follower(order.id, order.vm))
            self._followers[order.id] = task
            task.add_done_callback(self._follower_done)

    def _follower_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("an order follower stopped: %r", task.exception())

    async def _follower(self, order_id: str, vm: str) -> None:
        delay = self._waits.poll_interval_s
        while True:
            async with self._lock(vm):
                order = self._journal.orders.get(order_id)
                if order is None or not order.stage.in_flight:
                    return
                try:
                    # A slot waiting for its VM is looked at briefly and seldom: the destination
                    # QEMU takes the migration in on its main loop, which every QMP question
                    # interrupts, and the RC-TCB's `where` settles the slot itself when it asks.
                    target = order.side is Side.TARGET
                    order = await self._settle(order, slot_wait_s=self._waits.slot_glance_s if target else None)
                    delay = SLOT_POLL_S if target else self._waits.poll_interval_s
                except SmigError as e:
                    log.warning("%s: order %s: %s; trying again", vm, order_id, e)
                    delay = min(delay * 2, 5.0)
                if not order.stage.in_flight:
                    return
            await asyncio.sleep(delay)

    async def _settle_all(self, vm: str) -> None:
        for order in self._of(vm):
            if order.stage.in_flight:
                try:
                    await self._settle(order)
                except SmigError as e:  # what is left in flight is judged conservatively by the caller
                    log.warning("%s: order %s: %s", vm, order.id, e)

    async def _settle(self, order: JournalOrder, *, slot_wait_s: float | None = None) -> JournalOrder:
        """Move ``order`` on as far as the hypervisor shows it has gone; a slot's QEMU is given
        ``slot_wait_s`` (default ``settle_wait_s``) to say it runs the VM. Raises SmigError."""
        if order.side is Side.SOURCE and order.stage in (Stage.MIGRATING, Stage.COMPLETING):
            return await self._settle_source(order)
        if order.side is Side.TARGET and order.stage is Stage.PREPARED:
            return await self._settle_target(order, self._waits.settle_wait_s if slot_wait_s is None else slot_wait_s)
        return order

    async def _settle_source(self, order: JournalOrder) -> JournalOrder:
        name = order.vm
        if order.stage is Stage.MIGRATING:
            try:
                p = await self._driver.migration_progress(name)
            except VMNotFound:
                return await self._journal.put(order.to(Stage.FAILED, error=f"{name} was stopped here meanwhile"))
            except QMPError:
                if not await self._source_gone(name):
                    raise
                why = f"the QEMU of {name} on this host exited during the migration (fenced or crashed)"
                return await self._journal.put(order.to(Stage.FAILED, error=why))
            if p.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                try:
                    await self._driver.resume_source(name)
                except VMStateError as e:
                    log.warning("%s: %s", name, e)
                stage = Stage.FAILED if p.status is MigrationStatus.FAILED else Stage.CANCELLED
                why = p.error or ("cancelled on request" if stage is Stage.CANCELLED else "QEMU gave no reason")
                log.info("%s: migration of order %s %s (%s); it runs here", name, order.id, stage.value, why)
                return await self._journal.put(order.to(stage, error=why))
            if p.status is MigrationStatus.NONE:
                why = "this host never started the migration (its agent stopped first); the VM runs here"
                return await self._journal.put(order.to(Stage.FAILED, error=why))
            if p.status is not MigrationStatus.COMPLETED:
                return self._journal.touch(
                    replace(order, transferred_bytes=p.transferred_bytes, remaining_bytes=p.remaining_bytes)
                )
            # Write-ahead: once the source QEMU is stopped, nothing here could tell it had completed.
            order = await self._journal.put(
                order.to(Stage.COMPLETING, transferred_bytes=p.transferred_bytes, remaining_bytes=0)
            )
        try:
            spec = await self._driver.spec(name)
        except VMNotFound:
            return await self._journal.put(order.to(Stage.COMPLETED))  # finished before a restart
        try:
            stats = await self._driver.finish_outgoing(name, _destination(order.address, spec), self._params)
            log.info("%s: left (order %s, %d ms, %d ms down)", name, order.id, stats.total_ms, stats.downtime_ms)
        except (QMPError, VMStateError):
            if not await self._source_gone(name):
                raise
            with contextlib.suppress(VMNotFound):
                await self._driver.stop(name)  # only the dead source's record is left
        return await self._journal.put(order.to(Stage.COMPLETED))

    async def _source_gone(self, name: str) -> bool:
        try:
            return (await self._driver.status(name)).info.state is VMState.STOPPED
        except VMNotFound:
            return True

    async def _slot_alive(self, incoming: IncomingVM) -> bool:
        try:
            return await self._driver.incoming_alive(incoming)
        except SmigError as e:
            log.warning("%s: cannot tell whether its incoming slot lives (%s): taken as alive", incoming.spec.name, e)
            return True

    async def _settle_target(self, order: JournalOrder, wait_s: float) -> JournalOrder:
        """A slot whose QEMU runs the guest has arrived; one whose QEMU exited has failed."""
        incoming = _incoming_of(order)
        if await self._slot_alive(incoming):
            try:
                await asyncio.wait_for(self._driver.finish_incoming(incoming), wait_s)
            except TimeoutError:
                return order  # still waiting for (or receiving) the migration
            except MigrationError:
                if await self._slot_alive(incoming):
                    raise
            else:
                log.info("%s: arrived here (order %s)", order.vm, order.id)
                return await self._journal.put(order.to(Stage.ARRIVED))
        return await self._drop_slot(order, incoming, "its QEMU exited: the migration into it failed or was cancelled")

    async def _abort_slot(self, order: JournalOrder) -> JournalOrder:
        # A slot may be taking in the last bytes of a migration its source already calls complete:
        # killing it then would lose the VM. Give it a moment to start the guest.
        order = await self._settle_target(order, self._waits.abort_grace_s)
        if order.stage is Stage.PREPARED:
            order = await self._drop_slot(order, _incoming_of(order), "aborted on the RC-TCB's order")
        return order

    async def _drop_slot(self, order: JournalOrder, incoming: IncomingVM, why: str) -> JournalOrder:
        with contextlib.suppress(FileNotFoundError):  # its directory may be gone already
            await self._driver.abort_incoming(incoming)
        log.info("%s: incoming slot of order %s dropped: %s", order.vm, order.id, why)
        return await self._journal.put(order.to(Stage.ABORTED, error=why))

    async def _here(self, vm: str) -> VMWhere:
        """What this host holds of ``vm``, its orders settled as far as they go."""
        if self._of(vm, Side.SOURCE, Stage.MIGRATING):
            return VMWhere.RUNNING  # QEMU keeps the guest running while it sends it
        if self._of(vm, Side.SOURCE, Stage.COMPLETING):
            return VMWhere.PAUSED  # a stopped source not yet cleaned up
        try:
            where = _WHERE.get((await self._driver.status(vm)).info.state)
        except (VMNotFound, ConfigError):
            where = None
        if where is not None:
            return where
        return VMWhere.INCOMING if self._of(vm, Side.TARGET, Stage.PREPARED) else VMWhere.ABSENT


def _view(order: JournalOrder) -> MigrationView:
    phase = {
        Stage.MIGRATING: MigrationPhase.ACTIVE,
        Stage.COMPLETING: MigrationPhase.COMPLETED,
        Stage.COMPLETED: MigrationPhase.COMPLETED,
        Stage.FAILED: MigrationPhase.FAILED,
        Stage.CANCELLED: MigrationPhase.CANCELLED,
    }[order.stage]
    return MigrationView(phase, order.transferred_bytes, order.remaining_bytes, order.error)


def restart_key(order_id: str) -> str:
    """The journal's key for the cold restart of order ``order_id``."""
    return f"{order_id}+restart"

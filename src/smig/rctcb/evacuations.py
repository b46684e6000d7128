"""The service's evacuation loop: the policy's Evacuate effects in, migrations driven to the end.

The API publishes every effect of every decision; :meth:`Evacuations.on_effects` turns each
``Evacuate`` into orders (:meth:`Orchestrator.evacuate`, which writes them before anything moves),
and :meth:`Evacuations.run` advances the active orders one step per round through the hosts'
agents, for as long as the service runs. On start it first resumes what a previous run of the
service left in flight. Every committed step and every progress answer goes out on the event
stream as a ``migration.<state>`` or ``migration.progress`` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence

from smig.errors import SmigError
from smig.rctcb.orchestrator import Orchestrator
from smig.rctcb.policy import Evacuate

log = logging.getLogger(__name__)

__all__ = ["Evacuations"]

MAX_BURST = 5


class Evacuations:
    """Plans evacuations as effects arrive and drives them; one per service."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        send: Callable[[Sequence[tuple[str, str]]], None],
        *,
        poll_interval_s: float = 0.2,
    ) -> None:
        self.orchestrator = orchestrator
        self.poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._send = send
        orchestrator.listeners.append(self._tell)

    def _tell(self, kind: str, body: dict[str, object]) -> None:
        self._send([(kind, json.dumps(body, sort_keys=True))])

    def on_effects(self, effects: Sequence[object]) -> None:
        for effect in effects:
            if isinstance(effect, Evacuate):
                task = asyncio.get_running_loop().create_task(self._plan(effect))
                self._tasks.add(task)  # held until done: a task nobody references may be collected
                task.add_done_callback(self._tasks.discard)

    async def _plan(self, effect: Evacuate) -> None:
        try:
            await self.orchestrator.evacuate(effect.host, effect.reason)
        except SmigError as e:
            log.error("planning the evacuation of %s failed: %s", effect.host, e)
        except Exception:  # a bug: say so loudly, and keep the service driving the others
            log.exception("planning the evacuation of %s failed", effect.host)
        self._wake.set()

    async def run(self) -> None:
        """Resume what was in flight, then drive orders until cancelled."""
        while True:
            try:
                await self.orchestrator.resume()
                break
            except SmigError as e:
                log.error("resuming the evacuations in flight failed (retrying): %s", e)
                await asyncio.sleep(1.0)
        try:
            await self._drive()
        finally:
            await self.orchestrator.stop()

    async def _drive(self) -> None:
        burst = 0
        while True:
            delay = 1.0
            if self.orchestrator.active():
                delay = self.poll_interval_s
                try:
                    # The agents' calls run on by themselves; their answers wake the loop below.
                    await self.orchestrator.run_once(wait=False)
                except SmigError as e:
                    log.error("an evacuation round failed (retrying): %s", e)
                except Exception:
                    # A bug in one round must not end every evacuation for the life of the service.
                    log.exception("an evacuation round failed unexpectedly (retrying)")
            self._wake.clear()
            # An answer that moves an order on: take its next step now. A few rounds in a row at
            # most, so an order that keeps asking `where` cannot spin.
            answered = self.orchestrator.answered
            if burst < MAX_BURST:
                if not answered.is_set():
                    await _first(delay, self._wake, answered)
                burst = burst + 1 if answered.is_set() else 0
            else:
                await _first(delay, self._wake)
                burst = 0
            answered.clear()
            await asyncio.sleep(0)  # let the API's requests in between the rounds


async def _first(timeout_s: float, *events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set, or ``timeout_s`` has passed."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()

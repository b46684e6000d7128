"""The agent's monitors: measure the subjects the RC-TCB assigns this host, and deliver the reports.

One measuring loop runs per assigned subject (:class:`smig.aim.monitor.Monitor`, randomised
times). The assignment is read again every ``refresh_s`` and whenever the RC-TCB's event stream
says the ring changed, so a subject given to this host starts being measured within a second and
one taken away stops. A ``remeasure`` event for a subject this host measures (and is not excluded
from) measures it at once: that is how the quorum policy gets its second opinion quickly.

A subject is measured only against the manifest the RC-TCB approved for it: the subject's IVT row
names the manifest's digest, and this monitor holds one manifest. A subject whose row names
another is not measured (and the log says so); it goes UNKNOWN rather than being judged against
the wrong reference.

Reports go through an outbox in the order they were made. When the RC-TCB cannot be reached they
wait there and are sent when it is back; a report older than the RC-TCB would accept is dropped
instead, since it could only be refused as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from smig.agent.rctcb_client import RctcbClient, RctcbRefused, RctcbUnavailable
from smig.aim.monitor import Monitor, Observation, Subject
from smig.model import Verdict

log = logging.getLogger(__name__)

MAX_OUTBOX_AGE_S = 25.0  # the RC-TCB refuses reports older than its max_age_s (30 s by default)
MAX_SEND = 500


@dataclass
class MonitorStats:
    """What the monitors did, for status output and tests."""

    rounds: int = 0
    mismatches: int = 0
    sent: int = 0
    accepted: int = 0
    dropped: int = 0
    last_verdicts: dict[str, str] = field(default_factory=dict)


class MonitorRunner:
    """Runs this host's monitors against its assignment; see the module docstring."""

    def __init__(
        self,
        monitor: Monitor,
        client: RctcbClient,
        *,
        manifest_digest: str,
        pids_of: Callable[[str], list[int]],
        subject_of: Callable[[str], Subject] | None = None,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.monitor = monitor
        self.client = client
        self.manifest_digest = manifest_digest
        self.pids_of = pids_of
        self.subject_of = subject_of
        self._subjects: dict[str, Subject] = {}
        self.refresh_s = refresh_s
        self.clock = clock
        self.stats = MonitorStats()
        self._loops: dict[str, tuple[asyncio.Task[int], asyncio.Event]] = {}
        self._outbox: deque[tuple[float, str]] = deque()
        self._wake = asyncio.Event()
        self._refresh = asyncio.Event()
        self._refused: set[str] = set()

    @property
    def subjects(self) -> list[str]:
        return sorted(self._loops)

    def subject(self, host: str) -> Subject:
        if self.subject_of is not None:
            # Kept: a Xen subject holds its last verdict, so an unchanged hypervisor is not judged again.
            if host not in self._subjects:
                self._subjects[host] = self.subject_of(host)
            return self._subjects[host]

        def find() -> list[int]:
            try:
                return self.pids_of(host)
            except OSError:  # the subject's namespace is gone: nothing of it runs
                return []

        return Subject(host, find)

    # -- the loops -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: follow the assignment and the events, deliver reports."""
        tasks = [
            asyncio.create_task(self._follow_assignment(stop), name="assignment"),
            asyncio.create_task(self._follow_events(stop), name="events"),
            asyncio.create_task(self._deliver(stop), name="deliver"),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for loop_task, ev in self._loops.values():
                ev.set()
                loop_task.cancel()
            await asyncio.gather(*tasks, *(t for t, _ in self._loops.values()), return_exceptions=True)
            self._loops.clear()
            with contextlib.suppress(RctcbUnavailable, RctcbRefused):
                await self._send_once()  # what is measured is delivered, if the RC-TCB is there

    async def _follow_assignment(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync_assignment()
            except (RctcbUnavailable, RctcbRefused) as e:
                log.info("cannot read the assignment: %s", e)
            self._refresh.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), self.refresh_s)

    async def sync_assignment(self) -> None:
        """Start loops for newly assigned subjects, stop those no longer assigned."""
        wanted = set(await self.client.assignment())
        for gone in set(self._loops) - wanted:
            task, ev = self._loops.pop(gone)
            ev.set()
            log.info("no longer measuring %s", gone)
        for new in sorted(wanted - set(self._loops)):
            row = await self.client.row(new)
            if row.get("manifest") != self.manifest_digest:
                if new not in self._refused:
                    log.error(
                        "not measuring %s: the RC-TCB approved manifest %s for it, this monitor holds %s",
                        new,
                        str(row.get("manifest"))[:16],
                        self.manifest_digest[:16],
                    )
                    self._refused.add(new)
                continue
            self._refused.discard(new)
            ev = asyncio.Event()
            task = asyncio.create_task(self.monitor.run(self.subject(new), self._emit, stop=ev), name=f"measure-{new}")
            self._loops[new] = (task, ev)
            log.info("measuring %s", new)

    async def _follow_events(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                async for kind, data in self.client.events():
                    backoff = 0.5
                    if kind in ("effect.restitch", "trust.changed"):
                        self._refresh.set()
                    elif kind == "effect.remeasure":
                        await self._remeasure(str(data.get("subject", "")), data.get("exclude") or [])
            except (RctcbUnavailable, RctcbRefused) as e:
                log.info("event stream: %s", e)
            except Exception:  # an unreadable event or a failed re-measurement: follow on
                log.exception("following the RC-TCB's events failed; reconnecting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _remeasure(self, subject: str, exclude: list[str]) -> None:
        if subject not in self._loops or self.client.host in exclude:
            return
        log.info("re-measuring %s now, as the RC-TCB asked", subject)
        self._emit(await self.monitor.measure_now(self.subject(subject)))

    def _emit(self, obs: Observation) -> None:
        self.stats.rounds += 1
        self.stats.last_verdicts[obs.report.subject] = obs.report.verdict.value
        if obs.report.verdict is Verdict.MISMATCH:
            self.stats.mismatches += 1
            first = obs.report.mismatches[0] if obs.report.mismatches else None
            log.warning(
                "%s MISMATCH%s",
                obs.report.subject,
                f": {first.path} {first.offset:#x}+{first.length:#x} ({first.reason})" if first else "",
            )
        self._outbox.append((obs.report.ended_at, obs.signed.to_wire().decode()))
        self._wake.set()

    # -- delivery --------------------------------------------------------------------------------

    async def _deliver(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send_once()
                backoff = 0.2
            except RctcbUnavailable as e:
                log.info("reports wait in the outbox (%d): %s", len(self._outbox), e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()
            except RctcbRefused as e:
                log.warning("reports refused: %s", e)
            except Exception:  # keep the reports and try again: they are this host's evidence
                log.exception("delivering reports failed; %d wait in the outbox", len(self._outbox))
                await asyncio.sleep(backoff)
                self._wake.set()

    async def _send_once(self) -> None:
        now = self.clock()
        while self._outbox and now - self._outbox[0][0] > MAX_OUTBOX_AGE_S:
            self._outbox.popleft()
            self.stats.dropped += 1
        while self._outbox:
            batch = [wire for _, wire in list(self._outbox)[:MAX_SEND]]
            result = await self.client.submit(batch)
            for _ in batch:
                self._outbox.popleft()
            self.stats.sent += len(batch)
            self.stats.accepted += int(result.get("accepted", 0))

"""The monitor: measure one subject again and again at unpredictable times, and sign what it saw.

A monitor runs one loop per subject it is assigned. Measurements start at times drawn from the
subject's :class:`~smig.aim.schedule.Schedule` with an OS random source, start to start, so the
times between them follow the schedule's distribution whatever a measurement costs; when one
runs long the next starts at once. Each measurement runs in a worker thread at a lower CPU
priority, and the loop never lets measuring take more than ``max_cpu_share`` of one core on
average: the guests on the monitor's own host come first.

The subject's hypervisor processes are found anew every round (``find_pids``), so a process
started since the last round is measured in this one and one that exited is simply gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.measure import Measurement, Measurer
from smig.aim.report import SignedReport, sign_report
from smig.aim.schedule import Schedule, first_delay, next_delay
from smig.errors import ConfigError, SmigError
from smig.model import Mismatch, Report, Verdict

log = logging.getLogger(__name__)

MAX_MISMATCHES_REPORTED = 16
MEASURE_NICE = 10
LIE_PATH = "/usr/bin/qemu-system-x86_64"


@dataclass(frozen=True)
class Subject:
    """A host to measure: its id, how to find its hypervisor processes, where its files are.

    ``measure``, when given, is how the subject is measured instead (blocking, in the measuring
    thread): a nested Xen host's hypervisor is read from outside it, not through its processes
    (:func:`smig.aim.xen_measure.xen_subject`)."""

    id: str
    find_pids: Callable[[], list[int]]
    file_root: Callable[[list[int]], Path] = lambda pids: Path(f"/proc/{pids[0]}/root") if pids else Path("/")
    files: bool = True
    measure: Callable[[], Measurement] | None = None


@dataclass(frozen=True)
class Observation:
    """One round as the loop saw it: the signed report and the measurement behind it."""

    signed: SignedReport
    report: Report
    measurement: Measurement
    cpu_s: float


def _lower(tid: int) -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < MEASURE_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, MEASURE_NICE)
    except OSError:
        log.debug("cannot lower the priority of thread %d", tid)


def _lower_priority() -> None:
    # Per-thread niceness on Linux: the measuring thread yields to the guests, and the threads it
    # starts (the hashing and pagemap pools) inherit its niceness.
    _lower(threading.get_native_id())
    lower_native_threads()


def lower_native_threads() -> None:
    """Lower the threads of this process that Python did not start: BLAKE3's (rayon's) pool.

    That pool is started by whichever thread first hashed with several threads, perhaps one at
    normal priority (building a reference manifest, say), and it would then hash every later
    measurement at the guests' priority. In a monitor's process it only ever hashes.
    """
    ours = {t.native_id for t in threading.enumerate()}
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        if tid not in ours:
            _lower(tid)


class Monitor:
    """Measures its subjects and emits signed reports; one instance per monitoring host."""

    def __init__(
        self,
        monitor_id: str,
        key: Ed25519PrivateKey,
        measurer: Measurer,
        schedule: Schedule,
        *,
        max_cpu_share: float = 0.25,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < max_cpu_share <= 1:
            raise ConfigError(f"max_cpu_share must be in (0, 1], not {max_cpu_share}")
        self.id = monitor_id
        self._key = key
        self._measurer = measurer
        self.schedule = schedule
        self.max_cpu_share = max_cpu_share
        self._rng = rng or random.SystemRandom()
        self._clock = clock
        # Sequence numbers must rise across restarts too: start from the clock in microseconds.
        self._sequence = int(clock() * 1_000_000)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aim", initializer=_lower_priority)
        # The lab's lying monitor: subjects it reports a (false) mismatch about, whatever it measured.
        self.lies: frozenset[str] = frozenset()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._measurer.close()

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def measure_once(self, subject: Subject) -> Observation:
        """Measure ``subject`` now (blocking) and return the signed report."""
        cpu0 = time.thread_time() + self._measurer.worker_cpu_s
        started = self._clock()
        if subject.measure is not None:
            m = subject.measure()
        else:
            pids = subject.find_pids()
            m = self._measurer.measure(pids, files=subject.files, file_root=subject.file_root(pids))
        if subject.id in self.lies or "*" in self.lies:
            m = _lie(m)
        ended = self._clock()
        report = Report(
            subject=subject.id,
            monitor=self.id,
            sequence=self._next_sequence(),
            started_at=started,
            ended_at=max(ended, started),
            algorithm=self._measurer.manifest.algorithm,
            root=m.root,
            verdict=m.verdict,
            targets=m.targets,
            mismatches=m.mismatches[:MAX_MISMATCHES_REPORTED],
            measured_bytes=m.bytes,
        )
        signed = sign_report(report, self._key)
        lower_native_threads()  # BLAKE3 may have started its pool during this measurement
        return Observation(signed, report, m, time.thread_time() + self._measurer.worker_cpu_s - cpu0)

    async def measure_now(self, subject: Subject) -> Observation:
        """Measure ``subject`` at once (the RC-TCB asked for a re-measurement), in turn with the
        loops' rounds: one measuring thread serves them all."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.measure_once, subject)

    async def run(
        self,
        subject: Subject,
        emit: Callable[[Observation], Awaitable[None] | None],
        *,
        stop: asyncio.Event | None = None,
        rounds: int | None = None,
    ) -> int:
        """Measure ``subject`` until ``stop`` is set or ``rounds`` are done; returns the rounds run."""
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        done = 0
        next_start = loop.time() + first_delay(self.schedule, self._rng)
        while not stop.is_set() and (rounds is None or done < rounds):
            wait = next_start - loop.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    break
                except TimeoutError:
                    pass
            began = loop.time()
            try:
                obs = await loop.run_in_executor(self._pool, self.measure_once, subject)
            except SmigError as e:
                # Nothing measured, nothing reported: the RC-TCB sees the subject go stale, and
                # then UNKNOWN, rather than a verdict this monitor could not back.
                log.warning("%s: no measurement this round: %s", subject.id, e)
                done += 1
                next_start = max(next_start + next_delay(self.schedule, self._rng), loop.time())
                continue
            done += 1
            result = emit(obs)
            if result is not None:
                await result
            # Start to start, but never above the CPU share: a round that cost c seconds of CPU
            # is followed by at least c / share - c seconds without measuring.
            spent = loop.time() - began
            floor = began + obs.cpu_s / self.max_cpu_share
            next_start = max(next_start + next_delay(self.schedule, self._rng), floor, began + spent)
        return done


def _lie(m: Measurement) -> Measurement:
    """What a compromised monitor claims: a plausible change in the subject's QEMU binary."""
    invented = Mismatch(LIE_PATH, 0x1000, 1, "leaf digest differs", m.pids[0] if m.pids else 0)
    return dataclasses.replace(m, verdict=Verdict.MISMATCH, mismatches=(invented, *m.mismatches))

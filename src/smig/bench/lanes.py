"""The harness of the detection and transient benchmarks: subjects, their monitors, the regions judging them.

A :class:`Lane` is one subject (a bare QEMU process, :func:`subjects`), three real monitors that
measure it on their randomised schedules, and for each trial fresh regions (:class:`Judge`: one
policy and number of monitors k, a real :class:`~smig.rctcb.region.Region` over SQLite) to which
every signed report is routed. A trial starts the monitors' loops and stops them again; a report
counts only if its measurement began after the previous trial's restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smig.aim import reference
from smig.aim.keys import generate_key, public_key_pem
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.reference import Manifest
from smig.aim.schedule import Schedule
from smig.errors import ReportRejected
from smig.ivt.sqlite import SQLiteStore
from smig.lab import attacks
from smig.lab.bare import bare_qemu
from smig.model import Resources, TrustState, Verdict
from smig.rctcb.policy import PolicyConfig, PolicyKind, Remeasure, StateChanged
from smig.rctcb.region import Region, RegionConfig

SUBJECT = "subject"
MONITORS = ("m1", "m2", "m3")


@dataclass
class Judge:
    """One region of a trial: a policy and k, and what it saw."""

    policy: PolicyKind
    k: int
    live: bool
    region: Region
    monitors: tuple[str, ...]
    first_mismatch: float | None = None
    untrusted: float | None = None


class Lane:
    """A subject QEMU, its three monitors running their loops, and the regions judging a trial."""

    def __init__(self, name: str, pid: int, manifest: Manifest, root: Path, judged: Judged) -> None:
        self.name = name
        self.judged = judged
        # Found once: the search reads all of QEMU's code while holding the GIL, which would hold
        # back the monitors' loops until the very moment of the tamper (and bias every trial).
        self._mapping = attacks.code_mapping(pid)
        self._offset = attacks.inert_offset(pid, self._mapping, 1)
        self.pid = pid
        self.root = root
        self.keys = {m: generate_key() for m in MONITORS}
        self.subject = Subject(SUBJECT, find_pids=lambda: [pid], files=False)
        self.monitors = {m: Monitor(m, self.keys[m], Measurer(manifest, cow_check=False), Schedule()) for m in MONITORS}
        self.judges: list[Judge] = []
        self.all_decided = asyncio.Event()
        self.reported = asyncio.Event()
        self._stores = itertools.count()
        self.clean_since = time.time()
        self.measure_ms: list[float] = []
        self._last_start: dict[str, float] = {}
        self._tasks: list[asyncio.Task[int]] = []
        self._extra: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self.rejected: dict[str, int] = {}

    # -- the monitors' loops -----------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        self._stop = asyncio.Event()
        self._last_start.clear()
        for m, monitor in self.monitors.items():
            monitor.schedule = Schedule(interval_s)
            self._tasks.append(asyncio.create_task(monitor.run(self.subject, self._scheduled(m), stop=self._stop)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, *self._extra, return_exceptions=True)
        self._tasks.clear()

    def close(self) -> None:
        for monitor in self.monitors.values():
            monitor.close()

    def _scheduled(self, monitor: str) -> Any:
        def emit(obs: Observation) -> None:
            self._last_start[monitor] = obs.report.started_at
            self.measure_ms.append(obs.measurement.elapsed_ms)
            self._route(obs, None)
            self.reported.set()

        return emit

    async def measured_since(self, since: float, timeout_s: float) -> bool:
        """Wait until every monitor has reported a measurement that began after ``since``: then no
        measurement that began before it is still out. False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not all(self._last_start.get(m, 0.0) > since for m in MONITORS):
            self.reported.clear()
            try:
                await asyncio.wait_for(self.reported.wait(), deadline - time.monotonic())
            except TimeoutError:
                return False
        return True

    # -- judging -----------------------------------------------------------------------------

    def tamper(self) -> attacks.AttackRecord:
        """Flip one byte of QEMU's code, in its padding: two small writes, in this thread."""
        return attacks.patch(self.pid, offset=self._offset, mapping=self._mapping)

    def new_trial(self) -> None:
        self.judges = []
        self.all_decided = asyncio.Event()
        for policy, k, live in self.judged:
            store = SQLiteStore(self.root / f"{self.name}-{next(self._stores)}.db")
            config = RegionConfig(policy=PolicyConfig(kind=policy), monitors_per_host=k)
            region = Region(store, config)
            now = time.time()
            for host in (SUBJECT, *MONITORS):
                key = public_key_pem(self.keys[host] if host in self.keys else generate_key()).decode()
                region.enroll(host, agent_key=key, manifest="bench", capacity=Resources(8, 8192), now=now, vouched=True)
            self.judges.append(Judge(policy, k, live, region, region.assignment()[SUBJECT]))

    def end_trial(self) -> None:
        for judge in self.judges:
            judge.region.store.close()
        self.judges = []

    def _route(self, obs: Observation, asked_by: Judge | None) -> None:
        report = obs.report
        if report.started_at < self.clean_since:
            return  # it may have seen the previous trial's patch
        for judge in self.judges:
            if report.monitor not in judge.monitors or judge.untrusted is not None:
                continue
            if asked_by is not None and asked_by is not judge:
                continue  # a re-measurement one region asked for counts for that region alone
            now = time.time()
            try:
                _, decision = judge.region.ingest(obs.signed, now)
            except ReportRejected as e:
                self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
                continue
            if report.verdict is Verdict.MISMATCH and judge.first_mismatch is None:
                judge.first_mismatch = now
            for effect in decision.effects:
                if isinstance(effect, StateChanged) and effect.host == SUBJECT and effect.new is TrustState.UNTRUSTED:
                    judge.untrusted = now
                    if all(j.untrusted is not None for j in self.judges):
                        self.all_decided.set()
                elif isinstance(effect, Remeasure) and effect.subject == SUBJECT and judge.live:
                    for m in judge.monitors:
                        if m not in effect.exclude:
                            task = asyncio.get_running_loop().create_task(self._remeasure(m, judge))
                            self._extra.add(task)
                            task.add_done_callback(self._extra.discard)

    async def _remeasure(self, monitor: str, judge: Judge) -> None:
        obs = await self.monitors[monitor].measure_now(self.subject)
        self.measure_ms.append(obs.measurement.elapsed_ms)
        self._route(obs, judge)


Judged = tuple[tuple[PolicyKind, int, bool], ...]  # (policy, k, live) of each region of a trial


@contextlib.contextmanager
def lanes(judged: Mapping[str, Judged], name: str, say: Callable[[str], None]) -> Iterator[list[Lane]]:
    """A lane per entry of ``judged`` (lane name -> its regions), each on a bare QEMU of its own,
    all measured against the installed QEMU's reference; everything stopped and removed after."""
    # Every trial's regions announce their subject's fall; here that is the expected outcome.
    logging.getLogger("smig.rctcb.region").setLevel(logging.ERROR)
    say("building the reference manifest of the installed QEMU")
    manifest = reference.build(reference.installed_qemu_files())
    root = Path(tempfile.mkdtemp(prefix=f"smig-bench-{name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    made: list[Lane] = []
    try:
        with contextlib.ExitStack() as stack:
            for i, (lane_name, regions) in enumerate(judged.items()):
                pid = stack.enter_context(bare_qemu(marker_dir=root / f"qemu-{i}"))
                made.append(Lane(lane_name, pid, manifest, root, regions))
            yield made
    finally:
        for lane in made:
            lane.close()
        shutil.rmtree(root, ignore_errors=True)

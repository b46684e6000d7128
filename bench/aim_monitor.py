"""Part 4 of the AIM benchmark (``bench/aim.py``): the CPU share of a monitor.

:func:`bench_monitor` runs SMIG's ``Monitor`` over one bare QEMU process at mean intervals of 1 s
and 0.1 s, uncapped and under the default CPU cap; :func:`monitor_run` is one such run.
"""

from __future__ import annotations

import asyncio
import sys
import time

from aim_record import MonitorRun, Unexpected
from smig.aim.keys import generate_key
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.reference import Manifest
from smig.aim.schedule import Schedule
from smig.lab.bare import bare_qemu


async def monitor_run(
    manifest: Manifest, pid: int, interval_s: float, cap: float, seconds: float, odd: Unexpected
) -> MonitorRun:
    """Run a monitor over one QEMU process for ``seconds``. Its file digests are cached first:
    the figure is a monitor's steady state, not its first round over 60-odd MB of files."""
    measurer = Measurer(manifest)
    subject = Subject(id="bench-host", find_pids=lambda: [pid])
    measurer.measure([pid], files=subject.files, file_root=subject.file_root([pid]))
    monitor = Monitor("bench-monitor", generate_key(), measurer, Schedule(interval_s), max_cpu_share=cap)
    seen: list[Observation] = []
    stop = asyncio.Event()
    handle = asyncio.get_running_loop().call_later(seconds, stop.set)
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await monitor.run(subject, seen.append, stop=stop)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        handle.cancel()
        monitor.close()
    for o in seen:
        odd.check("monitor", o.measurement)
    starts = [o.report.started_at for o in seen]
    achieved = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else None
    return MonitorRun(
        interval_s,
        cap,
        wall,
        cpu,
        cpu / wall,
        achieved,
        starts,
        [o.cpu_s for o in seen],
        [o.measurement.elapsed_ms for o in seen],
    )


def bench_monitor(manifest: Manifest, seconds: float, repeats: int, odd: Unexpected) -> list[MonitorRun]:
    """Each (interval, cap) pair for ``seconds``, ``repeats`` times, pairs interleaved."""
    runs: list[MonitorRun] = []
    with bare_qemu() as pid:
        for _ in range(repeats):
            for interval in (1.0, 0.1):
                for cap in (1.0, 0.25):
                    print(f"… monitor: mean interval {interval} s, max CPU share {cap}", file=sys.stderr, flush=True)
                    runs.append(asyncio.run(monitor_run(manifest, pid, interval, cap, seconds, odd)))
    return runs

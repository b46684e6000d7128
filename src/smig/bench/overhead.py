"""Overhead on guests: how much AIM measuring a host slows the guests running on it.

The paper's own question. A guest (256 MiB, SMIG's guest image) runs one workload and reports its
progress on its serial port every 250 ms (``smig-guest work``, booted by :mod:`smig.bench.workload`):

- ``compute``: rounds of an integer mix, CPU only;
- ``disk``: 1 MiB blocks written and read back with O_DIRECT on a virtio-blk disk (a raw file in
  /dev/shm: the virtualised I/O path at its busiest, no real disk's writeback under it);
- ``net``: one TCP stream out through virtio-net and QEMU's user-mode network to a sink on
  127.0.0.1 (the guest's 10.0.2.2 is the host's loopback; no address outside the machine);
- ``idle``: a 10 ms timer; what counts is how late its wake-ups are.

Its QEMU process is the measured host: k real monitors (the RC-TCB's default, 2) measure it on
their randomised schedules, at SMIG's defaults (code and files, CPU share capped, lower priority),
in this process, on the same two cores the guest uses: the deployment's worst case, since a
monitor shares its own host with that host's guests. Phases of equal length alternate AIM off
with AIM on at a mean interval of 2 s, 1 s or 0.1 s (off, 2 s, off, 1 s, off, 0.1 s, off, ... in
an order rotated each repeat); each AIM phase is compared with the mean of the off phases on
either side of it, so drift on the machine (a disk's throughput sinking, say) cancels.

Two figures per phase:

- slowdown, what the guest sees: for compute, disk and net, the loss of throughput (units per
  second of the guest's clock, which follows the host's); for idle, the rise in the timer's mean
  wake-up lateness as a share of its 10 ms period. On this machine a TCG guest's throughput
  varies by about 10% from one second to the next with nothing else running, so its interval
  is wide;
- CPU lost, the mechanism: how much longer the guest's QEMU threads waited for a CPU
  (``/proc/PID/task/*/schedstat``, the scheduler's own nanoseconds), in % of one core. It does
  not count what sharing caches costs, but it is precise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smig.aim import reference
from smig.aim.keys import generate_key
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.reference import Manifest
from smig.aim.schedule import Schedule
from smig.bench.plots import pyplot, save
from smig.bench.stats import Progress, Summary, judge, judge_all, machine, mean_ci95
from smig.bench.workload import GUEST_MIB, UNITS, Serial, score, slowdown_pct, workload_guest
from smig.errors import BenchError
from smig.hypervisor import process
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import Accel, Verdict
from smig.paths import smig_cache
from smig.rctcb.region import RegionConfig

KINDS = ("idle", "compute", "disk", "net")
INTERVALS = (2.0, 1.0, 0.1)
GOALS = {1.0: 1.0, 0.1: 5.0}  # mean interval (s) -> largest slowdown (%) allowed, for every kind
MONITORS = RegionConfig().monitors_per_host
# warmup_s: past the boot's own after-effects (first translations, TCP's ramp) before the first phase
FULL = {"repeats": 10, "phase_s": 2.5, "warmup_s": 5.0}
QUICK = {"repeats": 2, "phase_s": 1.0, "warmup_s": 1.0}
POLL_S = 0.05


class _Monitors:
    """k real monitors measuring one QEMU process as its host, at one mean interval, while running."""

    def __init__(self, pid: int, manifest: Manifest) -> None:
        self.subject = Subject("host", lambda: [pid] if process.alive(pid) else [])
        self.monitors = [
            Monitor(f"m{i}", generate_key(), Measurer(manifest), Schedule(INTERVALS[0])) for i in range(MONITORS)
        ]
        self.elapsed_ms: list[float] = []
        self.cpu_s = 0.0
        self.verdicts: dict[str, int] = {}

    def _emit(self, obs: Observation) -> None:
        self.elapsed_ms.append(obs.measurement.elapsed_ms)
        self.cpu_s += obs.cpu_s
        verdict = obs.report.verdict.value
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1

    @contextlib.asynccontextmanager
    async def running(self, interval_s: float | None) -> AsyncIterator[None]:
        if interval_s is None:
            yield
            return
        stop = asyncio.Event()
        tasks = []
        for monitor in self.monitors:
            monitor.schedule = Schedule(interval_s)
            tasks.append(asyncio.create_task(monitor.run(self.subject, self._emit, stop=stop)))
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()


@dataclass(frozen=True)
class Phase:
    interval_s: float | None  # None: AIM off
    score: float
    wall_s: float
    measurements: int
    aim_cpu_s: float  # the monitors' CPU time for the measurements that ended in the phase
    wait_s: float  # how long the guest's QEMU threads waited for a CPU


def run_queue_wait_s(pid: int) -> float:
    """Seconds the threads of ``pid`` have waited on a run queue since they started (schedstat)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
    return total / 1e9


async def _phase(
    serial: Serial, monitors: _Monitors, pid: int, kind: str, interval_s: float | None, phase_s: float
) -> Phase:
    async with monitors.running(interval_s):
        start = serial.mark()
        wall0, count0, cpu0, wait0 = time.monotonic(), len(monitors.elapsed_ms), monitors.cpu_s, run_queue_wait_s(pid)
        end = wall0 + phase_s
        while time.monotonic() < end:
            await asyncio.sleep(POLL_S)
            serial.poll()
        window = serial.samples[start:]
        wall, wait = time.monotonic() - wall0, run_queue_wait_s(pid) - wait0
        measured, cpu = len(monitors.elapsed_ms) - count0, monitors.cpu_s - cpu0
    if len(window) < 2:
        raise BenchError(f"the {kind} guest reported fewer than two samples in a {phase_s:g} s phase")
    return Phase(interval_s, score(kind, window[0], window[-1]), wall, measured, cpu, wait)


def phase_order(repeats: int) -> list[float | None]:
    """Off between every two AIM phases and at both ends; the intervals' order rotated each repeat."""
    out: list[float | None] = []
    for r in range(repeats):
        for interval in INTERVALS[r % len(INTERVALS) :] + INTERVALS[: r % len(INTERVALS)]:
            out += [None, interval]
    return [*out, None]


async def _kind(
    kind: str, root: Path, accel: Accel, manifest: Manifest, setup: dict[str, float], say: Progress
) -> dict[str, Any]:
    repeats, phase_s = int(setup["repeats"]), setup["phase_s"]
    order = phase_order(repeats)
    async with workload_guest(kind, root, accel) as (pid, serial, sink):
        monitors = _Monitors(pid, manifest)
        try:
            await asyncio.sleep(setup["warmup_s"])
            phases: list[Phase] = []
            for i, interval in enumerate(order):
                if i % (2 * len(INTERVALS)) == 0 and i < len(order) - 1:
                    say(f"{kind}: repeat {i // (2 * len(INTERVALS)) + 1}/{repeats}")
                phases.append(await _phase(serial, monitors, pid, kind, interval, phase_s))
        finally:
            monitors.close()
        received = sink.received if sink else None
    return _kind_figures(kind, phases, monitors, received)


def _stats(values: list[float], digits: int) -> dict[str, Any]:
    ci = mean_ci95(values)
    return {
        **Summary.of(values).to_json(digits),
        "mean": None if ci is None else round(ci[0], digits),
        "ci95": None if ci is None else [round(ci[1], digits), round(ci[2], digits)],
    }


def _kind_figures(kind: str, phases: list[Phase], monitors: _Monitors, received: int | None) -> dict[str, Any]:
    slow: dict[float, list[float]] = {i: [] for i in INTERVALS}
    lost: dict[float, list[float]] = {i: [] for i in INTERVALS}
    for i, p in enumerate(phases):
        if p.interval_s is None:
            continue
        before, after = phases[i - 1], phases[i + 1]  # off, by construction of the order
        off_score = (before.score + after.score) / 2
        off_wait = (before.wait_s / before.wall_s + after.wait_s / after.wall_s) / 2
        slow[p.interval_s].append(slowdown_pct(kind, p.score, off_score))
        lost[p.interval_s].append((p.wait_s / p.wall_s - off_wait) * 100.0)
    offs = [p for p in phases if p.interval_s is None]
    rows = []
    for interval in (None, *INTERVALS):
        mine = [p for p in phases if p.interval_s == interval]
        wall = sum(p.wall_s for p in mine)
        row: dict[str, Any] = {
            "interval_s": interval,
            "score": Summary.of([p.score for p in mine]).to_json(1),
            "measurements_per_s": round(sum(p.measurements for p in mine) / wall, 2),
            "aim_cpu_pct": round(sum(p.aim_cpu_s for p in mine) / wall * 100.0, 2),
            "run_queue_wait_pct": round(sum(p.wait_s for p in mine) / wall * 100.0, 2),
        }
        if interval is not None:
            slowdown = _stats(slow[interval], 2)
            row["slowdown_pct"] = slowdown
            row["slowdown_mean_pct"] = slowdown["mean"]
            row["slowdown_ci95_pct"] = slowdown["ci95"]
            row["cpu_lost_pct"] = _stats(lost[interval], 2)
            goal = GOALS.get(interval)
            row["goal_pct"] = goal
            ci = None if slowdown["ci95"] is None else (slowdown["mean"], *slowdown["ci95"])
            row["meets_goal"] = None if goal is None else judge(ci, goal)
        rows.append(row)
    off_scores = [p.score for p in offs]
    # How much the guest's own score varies from one off phase to the next: the noise floor.
    noise = [abs(slowdown_pct(kind, b, a)) for a, b in itertools.pairwise(off_scores)]
    return {
        "kind": kind,
        "unit": "us late per tick" if kind == "idle" else UNITS[kind],
        "phases": rows,
        "noise_pct": round(statistics.median(noise), 2) if noise else None,
        "verdicts": dict(monitors.verdicts),
        "measure_ms": Summary.of(monitors.elapsed_ms).to_json(1),
        "sink_received_bytes": received,
    }


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Raises SmigError: a guest did not boot or stopped reporting (the guest is stopped)."""
    say = progress or (lambda _: None)
    setup = QUICK if quick else FULL
    # In memory: the disk guest's image then costs no real disk's writeback, which drifts.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None

    async def go() -> tuple[list[dict[str, Any]], str]:
        say("building the reference manifest of the installed QEMU")
        manifest = reference.build(reference.installed_qemu_files())
        with tempfile.TemporaryDirectory(prefix="smig-bench-overhead-", dir=shm) as tmp:
            root = Path(tmp)
            accel, why = await QemuDriver(QemuConfig(home=root / "driver", cache=smig_cache())).accelerator()
            kinds = []
            for kind in KINDS:
                say(f"{kind}: booting its guest")
                kinds.append(await _kind(kind, root, accel, manifest, setup, say))
        return kinds, f"{accel.value} ({why})"

    kinds, accel = asyncio.run(go())
    verdicts = [v for k in kinds for v in k["verdicts"]]
    checks = [row["meets_goal"] for k in kinds for row in k["phases"] if row.get("goal_pct") is not None]
    return {
        "name": "overhead",
        "repeats": int(setup["repeats"]),
        "phase_s": setup["phase_s"],
        "monitors": MONITORS,
        "guest_mib": GUEST_MIB,
        "accelerator": accel,
        "cpus": os.cpu_count() or 1,
        "results": kinds,
        "all_measurements_matched": all(v == Verdict.MATCH.value for v in verdicts),
        "meets_goal": judge_all(checks),
        "goal": "slowdown under 1% at a mean interval of 1 s and under 5% at 0.1 s, for every kind",
        "machine": machine(),
    }


def _goal_text(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "unresolved"}[met]


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "### Overhead on guests: what AIM measuring a host costs its guests",
        "",
        f"One {r['guest_mib']} MiB guest per workload, its QEMU measured by {r['monitors']} real monitors (SMIG's "
        f"defaults) on the same {r['cpus']} cores, under {r['accelerator']}. {r['repeats']} repeats of "
        f"{r['phase_s']:g} s phases, AIM off between every two AIM phases (mean interval 2 s, 1 s, 0.1 s); each AIM "
        "phase against the mean of the off phases beside it. Slowdown: compute, disk and net, lost throughput; "
        "idle, added timer lateness as a share of its 10 ms tick. CPU lost: how much longer the guest's QEMU "
        "threads waited for a CPU, in % of one core (schedstat). Noise: the median change from one off phase to the "
        "next. Figures: mean [95% interval]; the goal is met when the whole interval is under it, unresolved when "
        "the interval spans it.",
        "",
        "| workload | AIM off | noise | interval | measurements/s | AIM CPU, % of a core | CPU lost, % of a core "
        "| slowdown % | goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in r["results"]:
        off = k["phases"][0]
        noise = "-" if k["noise_pct"] is None else f"{k['noise_pct']:.1f}%"
        for row in k["phases"][1:]:
            goal = "-" if row["goal_pct"] is None else f"< {row['goal_pct']:g}%: {_goal_text(row['meets_goal'])}"
            lines.append(
                f"| {k['kind']} | {off['score']['median']:,.0f} {k['unit']} | {noise} | {row['interval_s']:g} s | "
                f"{row['measurements_per_s']:.1f} | {row['aim_cpu_pct']:.1f} | {_mean_ci(row['cpu_lost_pct'])} | "
                f"{_mean_ci(row['slowdown_pct'])} | {goal} |"
            )
    matched = "every one matched the reference" if r["all_measurements_matched"] else "**some did not match**"
    lines += ["", f"Goal: {r['goal']}: {_goal_text(r['meets_goal'])}. The monitors' measurements: {matched}."]
    return "\n".join(lines)


def _mean_ci(s: dict[str, Any]) -> str:
    if s["ci95"] is None:
        return f"{s['median']:+.2f}"
    return f"{s['mean']:+.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]"


def plot(r: dict[str, Any], path: Path) -> Path:
    """Slowdown bars per workload kind, one per mean interval, with 95% intervals and the goals."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(INTERVALS)
    for j, interval in enumerate(INTERVALS):
        xs: list[float] = []
        ys: list[float] = []
        err: list[list[float]] = [[], []]
        for i, k in enumerate(r["results"]):
            row = next(p for p in k["phases"] if p["interval_s"] == interval)
            mean, ci = row["slowdown_mean_pct"], row["slowdown_ci95_pct"]
            if mean is None:
                mean, ci = row["slowdown_pct"]["median"], [row["slowdown_pct"]["low"], row["slowdown_pct"]["high"]]
            xs.append(i + (j - (len(INTERVALS) - 1) / 2) * width)
            ys.append(mean)
            err[0].append(mean - ci[0])
            err[1].append(ci[1] - mean)
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"mean interval {interval:g} s")
    for interval, goal in GOALS.items():
        ax.axhline(goal, ls="--", lw=1, color="grey")
        ax.text(len(r["results"]) - 0.5, goal, f" goal at {interval:g} s", va="bottom", ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(r["results"])), [k["kind"] for k in r["results"]])
    ax.set_ylabel("slowdown (%), mean and 95% interval")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)

"""Detection latency: from a byte of QEMU's code patched to the first verified mismatch and to UNTRUSTED.

Real parts all along: bare QEMU processes (``-S``, the code mappings of a guest's QEMU) are the
subjects; each has three monitors (SMIG's :class:`~smig.aim.monitor.Monitor`, each with its own
measurer, key and randomised schedule) that measure it all the time; their signed reports go
through a real :class:`~smig.rctcb.region.Region` (signature, assignment, replay and freshness
checks, the trust policy, an SQLite IVT), one per policy and number of monitors ``k``. Only the
HTTP hop between agent and RC-TCB is left out (``smig bench ingest`` measures it).

A trial: start the monitors' loops (a monitor's first wait is drawn from its schedule's
equilibrium residual, :func:`smig.aim.schedule.first_delay`, so the moment they start is a
random moment of every schedule), flip one byte of QEMU's code through ``/proc/PID/mem``
(:func:`smig.lab.attacks.patch`), and time the first mismatch a region accepts and the moment its
subject turns UNTRUSTED; then restore the byte and stop the loops. Waiting a random time after
the previous trial instead would not do: that trial ended just after some monitor measured, so
its next measurement could not come soon. Each trial gets fresh regions; a report counts only if
its measurement began after the previous trial's restore. The copy-on-write check is off here,
so that one process can be patched and restored a hundred times: the full hash alone detects
(it sees any changed byte).

Two subjects are tampered, each with its own three monitors (side by side from a mean interval of
0.5 s; below that they take turns, as six monitors measuring every 0.1 s would saturate two cores):

- lane ``a``: ``immediate`` for k = 1, 2, 3, counting the monitors' scheduled reports only, and
  ``quorum`` for k = 2, live: its first mismatch makes the subject SUSPECT and the region's
  :class:`~smig.rctcb.policy.Remeasure` is carried out at once by the other assigned monitor;
- lane ``b``: ``quorum`` for k = 3, live in the same way.

``quorum`` with k = 1 cannot decide (a second, independent monitor is needed) and is not run.

The prediction beside each figure is the schedule's closed form
(:func:`smig.aim.schedule.detection_latency_quantile`: the least of k residual waits) plus the
median measurement time seen (twice for quorum: the second opinion is a second measurement).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smig.aim.schedule import Schedule, detection_latency_quantile
from smig.bench.lanes import MONITORS, Judged, Lane, lanes
from smig.bench.plots import pyplot, save
from smig.bench.stats import Progress, Summary, machine, ms_text, quantile, summary_text
from smig.lab import attacks
from smig.rctcb.policy import PolicyKind

FULL_INTERVALS = (0.1, 0.5, 1.0, 2.0)
QUICK_INTERVALS = (0.1, 1.0)
FULL_TRIALS = 100
QUICK_TRIALS = 10
PARALLEL_FROM_S = 0.5  # mean intervals from which the lanes run side by side
# (policy, k) judged in each lane; "live" regions have their re-measurements carried out.
LANES: dict[str, Judged] = {
    "a": (
        (PolicyKind.IMMEDIATE, 1, False),
        (PolicyKind.IMMEDIATE, 2, False),
        (PolicyKind.IMMEDIATE, 3, False),
        (PolicyKind.QUORUM, 2, True),
    ),
    "b": ((PolicyKind.QUORUM, 3, True),),
}
# Goals of the issue: p99 of tamper -> UNTRUSTED, in ms, by interval and policy.
GOALS_MS = {(1.0, PolicyKind.IMMEDIATE): 1200.0, (1.0, PolicyKind.QUORUM): 1500.0, (0.1, PolicyKind.IMMEDIATE): 250.0,
            (0.1, PolicyKind.QUORUM): 250.0}  # fmt: skip


@dataclass
class Trial:
    """One tamper: its time and, per (policy, k), the latencies in ms (None: not within the timeout)."""

    interval_s: float
    lane: str
    tampered_at: float
    first_mismatch_ms: dict[str, float | None] = field(default_factory=dict)
    untrusted_ms: dict[str, float | None] = field(default_factory=dict)


def _key(policy: PolicyKind, k: int) -> str:
    return f"{policy.value}/k={k}"


async def _trial(lane: Lane, interval_s: float) -> Trial:
    lane.new_trial()
    lane.start(interval_s)  # every monitor's first wait is a stationary residual: any moment is random
    try:
        t0 = time.time()
        record = lane.tamper()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.all_decided.wait(), 3 * Schedule(interval_s).max_interval_s + 2.0)
        finally:
            attacks.undo(record)
            lane.clean_since = time.time()
        trial = Trial(interval_s, lane.name, t0)
        for j in lane.judges:
            key = _key(j.policy, j.k)
            trial.first_mismatch_ms[key] = None if j.first_mismatch is None else (j.first_mismatch - t0) * 1000
            trial.untrusted_ms[key] = None if j.untrusted is None else (j.untrusted - t0) * 1000
        return trial
    finally:
        await lane.stop()
        lane.end_trial()


@dataclass
class _Seen:
    """What the monitors did at one mean interval, over all lanes."""

    measure_ms: list[float] = field(default_factory=list)


async def _run_lanes(
    lanes: list[Lane], intervals: tuple[float, ...], trials: int, say: Progress
) -> tuple[list[Trial], dict[float, _Seen]]:
    done: list[Trial] = []
    seen: dict[float, _Seen] = {}
    for interval in intervals:
        say(f"mean interval {interval:g} s: {trials} trials in each of {len(lanes)} lanes")
        # Side by side the lanes' six monitors share two cores; at short intervals that contention,
        # not the schedule, would set the pace, so there the lanes take turns.
        groups = [lanes] if interval >= PARALLEL_FROM_S else [[lane] for lane in lanes]
        seen[interval] = _Seen()
        for group in groups:
            done += await _run_group(group, interval, trials, seen[interval])
    return done, seen


async def _run_group(lanes: list[Lane], interval: float, trials: int, seen: _Seen) -> list[Trial]:
    async def go(lane: Lane) -> list[Trial]:
        return [await _trial(lane, interval) for _ in range(trials)]

    try:
        return [t for result in await asyncio.gather(*(go(lane) for lane in lanes)) for t in result]
    finally:
        for lane in lanes:
            seen.measure_ms += lane.measure_ms
            lane.measure_ms = []


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Raises SmigError: QEMU cannot start, or a trial's patch or restore failed."""
    say = progress or (lambda _: None)
    intervals = QUICK_INTERVALS if quick else FULL_INTERVALS
    trials = QUICK_TRIALS if quick else FULL_TRIALS
    with lanes(LANES, "detection", say) as made:
        results, seen = asyncio.run(_run_lanes(made, intervals, trials, say))
    return _figures(results, intervals, trials, seen, made)


def _figures(
    trials: list[Trial], intervals: tuple[float, ...], per_lane: int, seen_at: dict[float, _Seen], lanes: list[Lane]
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    monitors: list[dict[str, Any]] = []
    for interval in intervals:
        measure = Summary.of(seen_at[interval].measure_ms)
        monitors.append({"interval_s": interval, "measurement_ms": measure.to_json()})
        for lane, judged in LANES.items():
            mine = [t for t in trials if t.interval_s == interval and t.lane == lane]
            for policy, k, _live in judged:
                key = _key(policy, k)
                first = [t.first_mismatch_ms[key] for t in mine]
                untrusted = [t.untrusted_ms[key] for t in mine]
                seen = [x for x in untrusted if x is not None]
                schedule = Schedule(interval)
                measurements = 2 if policy is PolicyKind.QUORUM else 1
                predicted = {
                    q: 1000 * detection_latency_quantile(q, schedule, k) + measurements * measure.median
                    for q in (0.5, 0.99)
                }
                goal = GOALS_MS.get((interval, policy)) if k == 2 else None
                p99 = quantile(seen, 0.99) if seen else None
                rows.append(
                    {
                        "interval_s": interval,
                        "policy": policy.value,
                        "k": k,
                        "trials": len(mine),
                        "detected": len(seen),
                        "p50_ms": round(quantile(seen, 0.5), 1) if seen else None,
                        "p99_ms": round(p99, 1) if p99 is not None else None,
                        "max_ms": round(max(seen), 1) if seen else None,
                        "first_mismatch_p50_ms": _q(first, 0.5),
                        "first_mismatch_p99_ms": _q(first, 0.99),
                        "predicted_p50_ms": round(predicted[0.5], 1),
                        "predicted_p99_ms": round(predicted[0.99], 1),
                        "goal_p99_ms": goal,
                        "meets_goal": None
                        if goal is None
                        else (p99 is not None and len(seen) == len(mine) and p99 < goal),
                        "untrusted_ms": [None if x is None else round(x, 2) for x in untrusted],
                    }
                )
    return {
        "name": "detection",
        "intervals_s": list(intervals),
        "trials_per_interval": per_lane,
        "jitter": Schedule().jitter,
        "max_cpu_share": lanes[0].monitors[MONITORS[0]].max_cpu_share if lanes else None,
        "monitors": monitors,
        "results": rows,
        "rejected_reports": {r: n for lane in lanes for r, n in lane.rejected.items()},
        "goals": "at 1 s, p99 under 1.2 s (immediate) and 1.5 s (quorum); at 0.1 s, p99 under 0.25 s (k = 2)",
        "machine": machine(),
    }


def _q(values: list[float | None], q: float) -> float | None:
    seen = [x for x in values if x is not None]
    return round(quantile(seen, q), 1) if seen else None


def markdown(r: dict[str, Any]) -> str:
    """The figures as a section of docs/BENCHMARKS.md (the CLI prints the same)."""
    lines = [
        "### Detection latency: tamper to first verified mismatch to UNTRUSTED",
        "",
        f"{r['trials_per_interval']} trials per mean interval and lane; intervals jittered by "
        f"+-{r['jitter'] * 100:.0f}%; each monitor capped at {r['max_cpu_share']} of a core. Latencies in ms "
        "from the byte flipped. Predicted: the schedule's closed form plus the median measurement time "
        "(twice for quorum).",
        "",
        "| interval (s) | policy | k | detected | first mismatch p50 / p99 | UNTRUSTED p50 | UNTRUSTED p99 | "
        "predicted p50 / p99 | goal (p99) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        goal = (
            "-"
            if row["goal_p99_ms"] is None
            else f"< {row['goal_p99_ms']:.0f}: " + ("**met**" if row["meets_goal"] else "**not met**")
        )
        lines.append(
            f"| {row['interval_s']:g} | {row['policy']} | {row['k']} | {row['detected']}/{row['trials']} | "
            f"{ms_text(row['first_mismatch_p50_ms'])} / {ms_text(row['first_mismatch_p99_ms'])} | "
            f"{ms_text(row['p50_ms'])} | {ms_text(row['p99_ms'])} | "
            f"{ms_text(row['predicted_p50_ms'])} / {ms_text(row['predicted_p99_ms'])} | {goal} |"
        )
    lines += ["", "How long a measurement took (wall time, all monitors, scheduled and on request):", "",
              "| interval (s) | measurement (ms) |", "|---|---|"]  # fmt: skip
    for m in r["monitors"]:
        lines.append(f"| {m['interval_s']:g} | {summary_text(m['measurement_ms'], 1)} |")
    lines += [
        "",
        "A monitor that has just measured waits at least its measurement's CPU time divided by its CPU "
        "share before the next: that floor, not the schedule, is what the prediction leaves out at short "
        "intervals.",
    ]
    lines += ["", f"Goals: {r['goals']}."]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path:
    """CDFs of tamper -> UNTRUSTED per interval, measured (steps) against the schedule's prediction."""
    plt = pyplot()

    intervals = r["intervals_s"]
    fig, axes = plt.subplots(1, len(intervals), figsize=(4.2 * len(intervals), 3.6), squeeze=False)
    measure = {m["interval_s"]: m["measurement_ms"]["median"] for m in r["monitors"]}
    for ax, interval in zip(axes[0], intervals, strict=True):
        for row in (x for x in r["results"] if x["interval_s"] == interval):
            seen = sorted(v for v in row["untrusted_ms"] if v is not None)
            if not seen:
                continue
            label = f"{row['policy']} k={row['k']}"
            ax.step(seen, [(i + 1) / row["trials"] for i in range(len(seen))], where="post", label=label)
        schedule = Schedule(interval)
        qs = [i / 100 for i in range(1, 100)]
        predicted = [1000 * detection_latency_quantile(q, schedule, 2) + measure[interval] for q in qs]
        ax.plot(predicted, qs, "k--", linewidth=1, label="predicted, k=2 (immediate)")
        ax.set_title(f"mean interval {interval:g} s")
        ax.set_xlabel("tamper -> UNTRUSTED (ms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of trials")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path)

"""Transient attacks: how likely a change that undoes itself after ``d`` seconds is to be caught.

The set-up of ``smig bench detection`` (bare QEMU subjects, three real monitors each on their
randomised schedules, real regions judging their signed reports), with the ``immediate`` policy
for k = 1, 2, 3 in both lanes. A trial: start the monitors' loops (their first waits drawn from
the equilibrium residual, so that moment is a random one of every schedule), flip one byte of
QEMU's code, restore it ``d`` seconds later, then wait until every monitor has reported a measurement begun after the
restore (so none that could have seen the change is still out). Caught: a region accepted a
mismatch in that trial. Measured against :func:`smig.aim.schedule.detection_probability` for the
duration the byte really stayed changed (the thread that flips it adds a little), with a 95%
Wilson interval around each measured rate: a prediction outside it is flagged.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

from smig.aim.schedule import Schedule, detection_probability
from smig.bench.lanes import MONITORS, Judged, Lane, lanes
from smig.bench.plots import pyplot, save
from smig.bench.stats import Progress, Summary, machine
from smig.lab import attacks
from smig.rctcb.policy import PolicyKind

INTERVAL_S = 1.0
FULL_DURATIONS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5)
QUICK_DURATIONS = (0.1, 0.5)
FULL_TRIALS = 40  # per lane and duration; two lanes
QUICK_TRIALS = 8
JUDGED: Judged = ((PolicyKind.IMMEDIATE, 1, False), (PolicyKind.IMMEDIATE, 2, False), (PolicyKind.IMMEDIATE, 3, False))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


async def _trial(lane: Lane, duration_s: float) -> tuple[float, dict[int, bool]]:
    """One transient change; returns how long it really lasted and, per k, whether it was caught."""
    lane.new_trial()
    lane.start(INTERVAL_S)  # first waits are stationary residuals: the change starts at a random phase
    try:
        record = lane.tamper()
        try:
            await asyncio.sleep(max(0.0, duration_s - (time.time() - record.applied_at)))
        finally:
            attacks.undo(record)
            restored = time.time()
        lasted = restored - record.applied_at
        await lane.measured_since(restored, 3 * Schedule(INTERVAL_S).max_interval_s + 2.0)
        lane.clean_since = time.time()
        return lasted, {j.k: j.first_mismatch is not None for j in lane.judges}
    finally:
        await lane.stop()
        lane.end_trial()


async def _run(lanes: list[Lane], durations: tuple[float, ...], trials: int, say: Progress) -> dict[float, Any]:
    out: dict[float, Any] = {d: {"lasted": [], "caught": {k: 0 for _, k, _ in JUDGED}, "n": 0} for d in durations}
    for d in durations:
        say(f"changes lasting {d:g} s: {trials} trials in each of {len(lanes)} lanes")

        async def go(lane: Lane, d: float = d) -> list[tuple[float, dict[int, bool]]]:
            return [await _trial(lane, d) for _ in range(trials)]

        for results in await asyncio.gather(*(go(lane) for lane in lanes)):
            for lasted, caught in results:
                out[d]["lasted"].append(lasted)
                out[d]["n"] += 1
                for k, seen in caught.items():
                    out[d]["caught"][k] += seen
    return out


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    say = progress or (lambda _: None)
    durations = QUICK_DURATIONS if quick else FULL_DURATIONS
    trials = QUICK_TRIALS if quick else FULL_TRIALS
    with lanes({"a": JUDGED, "b": JUDGED}, "transient", say) as made:
        seen = asyncio.run(_run(made, durations, trials, say))
    schedule = Schedule(INTERVAL_S)
    rows = []
    for d in durations:
        lasted = Summary.of([x * 1000 for x in seen[d]["lasted"]])
        n = seen[d]["n"]
        for _, k, _ in JUDGED:
            caught = seen[d]["caught"][k]
            low, high = wilson(caught, n)
            predicted = detection_probability(lasted.median / 1000, schedule, k)
            rows.append(
                {
                    "duration_s": d,
                    "lasted_ms": lasted.to_json(),
                    "k": k,
                    "trials": n,
                    "caught": caught,
                    "probability": round(caught / n, 4) if n else None,
                    "ci95": [round(low, 4), round(high, 4)],
                    "predicted": round(predicted, 4),
                    "prediction_within_ci": low <= predicted <= high,
                }
            )
    return {
        "name": "transient",
        "interval_s": INTERVAL_S,
        "jitter": schedule.jitter,
        "durations_s": list(durations),
        "trials_per_duration": trials * len(made),
        "monitors": len(MONITORS),
        "results": rows,
        "agreement": sum(r["prediction_within_ci"] for r in rows) / len(rows) if rows else None,
        "goal": "the measured rate agrees with the schedule's prediction (inside the 95% interval)",
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "### Transient attacks: the chance a self-restoring change is caught",
        "",
        f"Mean interval {r['interval_s']:g} s (+-{r['jitter'] * 100:.0f}%), {r['trials_per_duration']} trials per "
        "duration, immediate policy. Caught: a region accepted a mismatch while or after the byte was changed. "
        "Predicted: the schedule's closed form for the duration the change really lasted.",
        "",
        "| change lasts (s) | really lasted (ms, median) | k | caught | rate (95% interval) | predicted | agrees |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        low, high = row["ci95"]
        lines.append(
            f"| {row['duration_s']:g} | {row['lasted_ms']['median']:.0f} | {row['k']} | "
            f"{row['caught']}/{row['trials']} | {row['probability']:.2f} ({low:.2f}-{high:.2f}) | "
            f"{row['predicted']:.2f} | {'yes' if row['prediction_within_ci'] else '**no**'} |"
        )
    share = r["agreement"]
    lines += ["", f"Goal: {r['goal']}: {share * 100:.0f}% of the rows agree (about 95% would by chance alone)."]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> Path:
    """Detection probability against the change's duration, measured (points, 95% bars) and predicted."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    schedule = Schedule(r["interval_s"])
    xs = [i / 100 * max(r["durations_s"]) * 1.1 for i in range(101)]
    for k in sorted({row["k"] for row in r["results"]}):
        rows = [row for row in r["results"] if row["k"] == k]
        line = ax.plot(xs, [detection_probability(x, schedule, k) for x in xs], label=f"predicted, k={k}")[0]
        ax.errorbar(
            [row["lasted_ms"]["median"] / 1000 for row in rows],
            [row["probability"] for row in rows],
            yerr=[
                [row["probability"] - row["ci95"][0] for row in rows],
                [row["ci95"][1] - row["probability"] for row in rows],
            ],
            fmt="o",
            color=line.get_color(),
            capsize=3,
            label=f"measured, k={k}",
        )
    ax.set_xlabel("how long the change lasted (s)")
    ax.set_ylabel("probability it was caught")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)

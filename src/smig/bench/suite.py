"""The evaluation as one command: run the benchmarks, keep their figures, write them into the docs.

:func:`run_suite` runs the benchmarks of ``smig bench NAME`` in order, writes each one's figures
to ``RESULTS/NAME.json`` (with the command and machine), its plot if it draws one, and its section
of ``docs/BENCHMARKS.md``. :func:`goals` reads every result file there (these and those of the
scripts in ``bench/``) and states, goal by goal, which are met and which are not.
"""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from smig.bench.docs import write_section
from smig.bench.stats import Progress, judge_all, machine, machine_line

SUITE = ("measure", "detection", "transient", "placement", "migration", "overhead", "response")
PLOTS = {
    "detection": "detection-cdf.png",
    "transient": "transient-probability.png",
    "overhead": "overhead-slowdown.png",
    "response": "response-breakdown.png",
}


def _module(name: str) -> Any:
    return importlib.import_module(f"smig.bench.{name}")


def run_suite(
    names: Sequence[str],
    *,
    quick: bool,
    results: Path,
    plots: Path,
    write: Path | None,
    progress: Progress,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order, each with its ``options`` (keyword arguments of its ``run``);
    returns their figures by name. A benchmark that fails stops the suite (its error propagates)
    after the ones before it were written."""
    command = shlex.join(["smig", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else "smig bench all"
    done: dict[str, dict[str, Any]] = {}
    results.mkdir(parents=True, exist_ok=True)
    for name in names:
        module = _module(name)
        progress(f"{name}: starting")
        before = machine()  # the load average the run started under, not the one it left
        extra = (options or {}).get(name, {})
        figures: dict[str, Any] = module.run(quick=quick, progress=lambda m, n=name: progress(f"{n}: {m}"), **extra)
        figures["machine"] = before
        figures["command"] = command
        figures["quick"] = quick
        (results / f"{name}.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        body = module.markdown(figures)
        if name in PLOTS and hasattr(module, "plot"):
            picture = module.plot(figures, plots / PLOTS[name])
            body += f"\n\n![{name}]({_relative(picture, write)})"
        if write is not None:
            header = f"Command: `{command}`  \nMachine: {machine_line(figures['machine'])}.  \n"
            header += f"Raw figures: `{_relative(results / f'{name}.json', write)}`.\n\n"
            write_section(write, f"suite-{name}", header + body + "\n")
        done[name] = figures
    return done


def _relative(path: Path, doc: Path | None) -> str:
    if doc is None:
        return str(path)
    try:
        return str(path.resolve().relative_to(doc.resolve().parent))
    except ValueError:
        try:
            return "../" + str(path.resolve().relative_to(doc.resolve().parent.parent))
        except ValueError:
            return str(path)


# -- which goals are met ---------------------------------------------------------------------------

Goal = tuple[str, str, bool | None]  # (goal, figure, met; None: not measured, or noise hides the answer)


def _load(results: Path, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def _measure(r: dict[str, Any]) -> list[Goal]:
    return [("AIM hashing at least 0.8x b3sum (all threads, net)", f"{r['ratio_vs_b3sum']}x", r["meets_goal"])]


def _detection(r: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    for row in r["results"]:
        if row["goal_p99_ms"] is not None:
            what = (
                f"tamper to UNTRUSTED at {row['interval_s']:g} s, {row['policy']} (k={row['k']}): "
                f"p99 under {row['goal_p99_ms'] / 1000:g} s"
            )
            out.append((what, f"p99 {row['p99_ms']} ms ({row['detected']}/{row['trials']} trials)", row["meets_goal"]))
    return out


def _transient(r: dict[str, Any]) -> list[Goal]:
    agree = sum(row["prediction_within_ci"] for row in r["results"])
    return [
        (
            "transient changes caught with the probability the schedule predicts",
            f"{agree}/{len(r['results'])} (duration, k) rows inside the 95% interval",
            agree >= 0.8 * len(r["results"]),
        )
    ]


def _response(r: dict[str, Any]) -> list[Goal]:
    worst = max((x["p99_ms"] for x in r["reaction"]), default=None)
    ratios = [x["ratio_vs_direct"] for x in r["runs"] if x["ratio_vs_direct"] is not None]
    return [
        (
            "UNTRUSTED to first migration command: p99 under 20 ms",
            f"worst p99 {worst} ms over {len(r['reaction'])} guest counts",
            r["meets_reaction_goal"],
        ),
        (
            "SMIG's evacuation within 1.1x of the same migrations done directly",
            f"ratios {ratios}" if ratios else "no complete run",
            r["meets_ratio_goal"],
        ),
    ]


def _slowdown(row: dict[str, Any]) -> str:
    ci = row["slowdown_ci95_pct"]
    if ci is None:
        return f"{row['slowdown_pct']['median']:+.1f}%"
    return f"{row['slowdown_mean_pct']:+.1f}% [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _overhead(r: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    for interval, goal in ((1.0, 1.0), (0.1, 5.0)):
        rows = [(k["kind"], next(p for p in k["phases"] if p["interval_s"] == interval)) for k in r["results"]]
        checks = [row["meets_goal"] for _, row in rows]
        figure = ", ".join(f"{kind} {_slowdown(row)}" for kind, row in rows)
        lost = [row["cpu_lost_pct"]["mean"] for _, row in rows if row.get("cpu_lost_pct", {}).get("mean") is not None]
        if lost:
            figure += f"; CPU the guests' threads lost: {min(lost):+.1f} to {max(lost):+.1f}% of a core"
        out.append(
            (f"overhead on guests at {interval:g} s: under {goal:g}% for every workload", figure, judge_all(checks))
        )
    return out


def _ingest(r: dict[str, Any]) -> list[Goal]:
    return [("RC-TCB ingest at least 10,000 verdicts/s", f"{r['verdicts_per_s']:,.0f}/s", r["meets_goal"])]


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[Goal]]] = {
    "measure": _measure,
    "detection": _detection,
    "transient": _transient,
    "overhead": _overhead,
    "response": _response,
    "ingest": _ingest,
}


def goals(results: Path) -> list[Goal]:
    """Every goal, with its figures from ``results`` (met: None where there are none, or where the
    figures' 95% interval spans the goal)."""
    out: list[Goal] = []
    for name, summarise in SUMMARIES.items():
        figures = _load(results, name)
        if figures is None:
            out.append((f"{name}: no figures in {results}", "-", None))
        else:
            out += summarise(figures)
    return out


def goals_markdown(rows: list[Goal]) -> str:
    def verdict(figure: str, met: bool | None) -> str:
        if met is None:
            return "not measured" if figure == "-" else "unresolved: the 95% interval spans the goal"
        return "**met**" if met else "**not met**"

    lines = ["## Goals: which are met", "", "| goal | figure | |", "|---|---|---|"]
    lines += [f"| {what} | {figure} | {verdict(figure, met)} |" for what, figure, met in rows]
    return "\n".join(lines) + "\n"

"""What every benchmark reports alike: summaries of repeated timings, and the machine they ran on."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` by linear interpolation between order statistics (NaN if empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


@dataclass(frozen=True)
class Summary:
    """A median and its spread: p10-p90 when there are at least ten values, else min-max."""

    n: int
    median: float
    low: float
    high: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        wide = len(values) >= 10
        return cls(
            n=len(values),
            median=quantile(values, 0.5),
            low=quantile(values, 0.1) if wide else min(values, default=math.nan),
            high=quantile(values, 0.9) if wide else max(values, default=math.nan),
            p99=quantile(values, 0.99),
        )

    @property
    def spread(self) -> str:
        return "p10-p90" if self.n >= 10 else "min-max"

    def text(self, digits: int = 1) -> str:
        """``median (low-high) n=N``, as the tables print it."""
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f}) n={self.n}"

    def to_json(self, digits: int = 3) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return None if math.isnan(x) else round(x, digits)

        return {"n": self.n, "median": r(self.median), "low": r(self.low), "high": r(self.high), "p99": r(self.p99),
                "spread": self.spread}  # fmt: skip


def summary_text(s: dict[str, Any], digits: int = 2) -> str:
    """A :meth:`Summary.to_json` as the tables print it: ``median (low-high) n=N`` ("-" if empty)."""
    if s["median"] is None:
        return "-"
    return f"{s['median']:.{digits}f} ({s['low']:.{digits}f}-{s['high']:.{digits}f}) n={s['n']}"


def ms_text(x: float | None) -> str:
    """Milliseconds as the tables print them: whole, with thousands separated ("-" if none)."""
    return "-" if x is None else f"{x:,.0f}"


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator and not math.isnan(numerator) else None


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "QEMU not found"
    return out.splitlines()[0] if out else "QEMU (no version)"


def machine() -> dict[str, Any]:
    """What a figure depends on: cores, CPU, kernel, QEMU, Python, load, and when."""
    return {
        "cpus": os.cpu_count() or 1,
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "qemu": _qemu_version(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['date']}; nproc {m['cpus']}, {m['cpu']}, Linux {m['kernel']}, {m['qemu']}, Python {m['python']}; "
        f"load average at the start {' '.join(map(str, m['load_average']))}"
    )


# Student's t at 97.5% by degrees of freedom (two-sided 95%); beyond the table, 2.0.
T95 = (
    12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23,
    2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10, 2.09, 2.09,
)  # fmt: skip


def mean_ci95(values: list[float]) -> tuple[float, float, float] | None:
    """The mean and its 95% interval (Student's t), or None for fewer than two values."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 2.0
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def judge(ci: tuple[float, float, float] | None, goal: float) -> bool | None:
    """Met if the whole interval is under the goal, not met if it is all above; None if it spans it."""
    if ci is None:
        return None
    if ci[2] < goal:
        return True
    return False if ci[1] >= goal else None


def judge_all(verdicts: Sequence[bool | None]) -> bool | None:
    """Many :func:`judge` verdicts as one: not met if any is not, met if all are (and there are
    some), otherwise None (noise hides at least one answer)."""
    if False in verdicts:
        return False
    return True if verdicts and all(verdicts) else None

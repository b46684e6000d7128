"""Live migration: total time and downtime against guest RAM, dirty rate, TLS and link speed.

Every move is the first of a freshly booted guest (an evacuation moves guests that never moved),
on loopback within one machine, through SMIG's QEMU driver and its migration phases. Three
settings per case, interleaved repeat by repeat so that drift on the machine hits them alike:

- ``smig``: SMIG's defaults (the driver's bandwidth choice: none under KVM, QEMU's 128 MiB/s cap
  under TCG, kept because faster TCG migrations corrupted busy guests; 300 ms downtime limit);
- ``uncapped``: the same migration with no bandwidth cap, the baseline: QEMU as fast as it goes;
- ``1gbit``: a modelled 1 Gbit/s link, as QEMU's ``max-bandwidth`` of 119.2 MiB/s (a rate, not a
  delay: this kernel has no netem).

Downtime twice: as QEMU reports it (source stopped to destination running), and as the guest
sees it: the longest gap between two heartbeat lines around the move, less one heartbeat period,
read from the guest's serial log every 5 ms. Beside the gap, how far the guest's own clock moved
across it (its uptime in the two lines, less one period): a guest clock that moved less than the
gap lost that time to a paused virtual clock, not to a missed tick.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smig.bench.stats import Progress, Summary, machine, ratio, summary_text
from smig.hypervisor import heartbeat
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import MigrationParams, MigrationStats, VMSpec
from smig.paths import smig_cache
from smig.pki import ensure_local_migration_tls

FULL_SIZES = (256, 1024, 2048)
QUICK_SIZES = (256,)
DIRTY_MBPS = (0, 10)  # faster writers are corrupted by QEMU 7.2's TCG migrations (docs/BENCHMARKS.md)
FULL_REPEATS = 2
QUICK_REPEATS = 1
GBIT_MIBPS = 1e9 / 8 / 2**20
SETTINGS: dict[str, float | None] = {"smig": None, "uncapped": 0.0, "1gbit": GBIT_MIBPS}
HEARTBEAT_MS = 100
SAMPLE_S = 0.005


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mbps: int
    tls: bool

    @property
    def label(self) -> str:
        load = f"dirty {self.dirty_mbps} MiB/s" if self.dirty_mbps else "idle"
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib >= 1024 else f"{self.memory_mib} MiB"
        return f"{size}, {load}, {'TLS' if self.tls else 'plain'}"


@dataclass(frozen=True)
class Move:
    total_ms: float
    qemu_downtime_ms: float
    guest_gap_ms: float | None  # longest heartbeat gap less one period
    guest_clock_ms: float | None  # how far the guest's clock moved across that gap, less one period
    throughput_mbit_s: float  # as QEMU reports it (megabits per second)


class _Beats:
    """The guest's heartbeat lines as they appear, in any of its instances' serial logs."""

    def __init__(self, home: Path, name: str) -> None:
        self._pattern = str(home / "vms" / name / "*" / "heartbeat.log")
        self.seen: list[tuple[float, int, int]] = []  # (host time, counter, guest uptime ms)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            for path in glob.glob(self._pattern):
                hb = heartbeat.read_last(Path(path))
                if hb is not None and (not self.seen or hb.counter > self.seen[-1][1]):
                    self.seen.append((time.time(), hb.counter, hb.guest_uptime_ms))
            await asyncio.sleep(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()

    def gap(self, start: float, end: float) -> tuple[float, float] | None:
        """(host gap, guest clock advance) in ms of the longest gap in [start - 1 s, end + 3 s]."""
        window = [b for b in self.seen if start - 1.0 <= b[0] <= end + 3.0]
        pairs = list(itertools.pairwise(window))
        if not pairs:
            return None
        a, b = max(pairs, key=lambda p: p[1][0] - p[0][0])
        return (b[0] - a[0]) * 1000 - HEARTBEAT_MS, float(b[2] - a[2] - HEARTBEAT_MS * (b[1] - a[1]))


async def _move(driver: QemuDriver, home: Path, case: Case, setting: str) -> Move:
    spec = VMSpec(
        name=f"bench-mig-{case.memory_mib}-{case.dirty_mbps}-{setting}",
        memory_mib=case.memory_mib,
        dirty_mbps=case.dirty_mbps,
        heartbeat_ms=HEARTBEAT_MS,
    )
    params = MigrationParams(tls=case.tls, bandwidth_mibps=SETTINGS[setting], timeout_s=300)
    await driver.launch(spec)
    beats = _Beats(home, spec.name)
    sampler = asyncio.create_task(beats.run())
    try:
        await driver.wait_heartbeat(spec.name, 15)
        await asyncio.sleep(0.5)  # a few beats before the move, so the gap has a "before"
        started = time.time()
        stats: MigrationStats = await live_migrate(driver, driver, spec.name, params)
        ended = time.time()
        await driver.wait_heartbeat(spec.name, 10, after=beats.seen[-1][1] if beats.seen else -1)
        await asyncio.sleep(0.3)
    finally:
        beats.stop()
        await sampler
        await driver.stop(spec.name)
    gap = beats.gap(started, ended)
    return Move(
        total_ms=stats.total_ms,
        qemu_downtime_ms=stats.downtime_ms,
        guest_gap_ms=None if gap is None else round(gap[0], 1),
        guest_clock_ms=None if gap is None else round(gap[1], 1),
        throughput_mbit_s=round(stats.throughput_mbps, 1),
    )


def _cases(quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    tls = (False,) if quick else (False, True)
    return [Case(m, d, t) for m in sizes for d in DIRTY_MBPS for t in tls]


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Raises SmigError: a guest did not boot or a migration failed (the guest is stopped)."""
    say = progress or (lambda _: None)
    repeats = QUICK_REPEATS if quick else FULL_REPEATS
    cases = _cases(quick)

    async def go() -> tuple[dict[tuple[Case, str], list[Move]], str]:
        out: dict[tuple[Case, str], list[Move]] = {(c, s): [] for c in cases for s in SETTINGS}
        with tempfile.TemporaryDirectory(prefix="smig-bench-mig-") as tmp:
            home = Path(tmp)
            driver = QemuDriver(QemuConfig(home=home, cache=smig_cache(), tls=ensure_local_migration_tls(home)))
            accel, why = await driver.accelerator()
            for case in cases:
                say(f"{case.label}: {repeats} x {len(SETTINGS)} moves")
                for _ in range(repeats):
                    for setting in SETTINGS:
                        out[(case, setting)].append(await _move(driver, home, case, setting))
        return out, f"{accel.value} ({why})"

    moves, accel = asyncio.run(go())
    rows = []
    for case in cases:
        row: dict[str, Any] = {
            "case": case.label,
            "memory_mib": case.memory_mib,
            "dirty_mbps": case.dirty_mbps,
            "tls": case.tls,
        }
        for setting in SETTINGS:
            mine = moves[(case, setting)]
            row[setting] = {
                "total_ms": Summary.of([m.total_ms for m in mine]).to_json(1),
                "qemu_downtime_ms": Summary.of([m.qemu_downtime_ms for m in mine]).to_json(1),
                "guest_gap_ms": Summary.of([m.guest_gap_ms for m in mine if m.guest_gap_ms is not None]).to_json(1),
                "guest_clock_ms": Summary.of([m.guest_clock_ms for m in mine if m.guest_clock_ms is not None]).to_json(
                    1
                ),
                "throughput_mbit_s": Summary.of([m.throughput_mbit_s for m in mine]).to_json(1),
            }
        row["ratio_smig_vs_uncapped"] = ratio(row["smig"]["total_ms"]["median"], row["uncapped"]["total_ms"]["median"])
        rows.append(row)
    return {
        "name": "migration",
        "repeats": repeats,
        "settings": {
            "smig": "SMIG's defaults",
            "uncapped": "no bandwidth cap (baseline)",
            "1gbit": f"max-bandwidth {GBIT_MIBPS:.1f} MiB/s (a modelled 1 Gbit/s link)",
        },
        "accelerator": accel,
        "heartbeat_ms": HEARTBEAT_MS,
        "results": rows,
        "goal": "none set: the price of SMIG's settings against QEMU uncapped, and both downtimes side by side",
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "### Live migration: total time and downtime, QEMU's and the guest's",
        "",
        f"Each figure: median (spread) over {r['repeats']} freshly booted guests' first move, in ms, on loopback. "
        "Settings: " + "; ".join(f"{k}: {r['settings'][k]}" for k in SETTINGS) + ". Guest gap: the longest pause "
        f"between two heartbeat lines (every {r['heartbeat_ms']} ms) less one period; guest clock: how far the "
        "guest's own uptime moved across that pause, less one period.",
        "",
        "| guest | setting | total | QEMU downtime | guest gap | guest clock across the gap | Mbit/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        for setting in SETTINGS:
            f = row[setting]
            lines.append(
                f"| {row['case']} | {setting} | {summary_text(f['total_ms'], 0)} | "
                f"{summary_text(f['qemu_downtime_ms'], 0)} | {summary_text(f['guest_gap_ms'], 0)} | "
                f"{summary_text(f['guest_clock_ms'], 0)} | {f['throughput_mbit_s']['median']:.0f} |"
            )
    extra = [
        row[s]["guest_gap_ms"]["median"] - row[s]["qemu_downtime_ms"]["median"]
        for row in r["results"]
        for s in SETTINGS
        if row[s]["guest_gap_ms"]["median"] is not None
    ]
    clock = [row[s]["guest_clock_ms"]["median"] for row in r["results"] for s in SETTINGS
             if row[s]["guest_clock_ms"]["median"] is not None]  # fmt: skip
    if extra and clock:
        lines += [
            "",
            f"Over the {len(extra)} (case, setting) rows the guest's gap exceeds QEMU's downtime by a median of "
            f"{statistics.median(extra):.0f} ms ({min(extra):.0f} to {max(extra):.0f}), and the guest's own clock "
            f"moves a median of {statistics.median(clock):.0f} ms beyond one period across the gap: the guest's "
            "virtual clock stops with the VM, so the guest cannot tell the pause from its own clock. The rest of "
            "what the host sees beyond QEMU's downtime is most likely the destination starting up until the guest "
            "writes its next line (not broken down yet).",
        ]
    lines += ["", "SMIG's total against uncapped (the baseline), per case: " + ", ".join(
        f"{row['case']} {row['ratio_smig_vs_uncapped']}" for row in r["results"]
    ) + "."]  # fmt: skip
    return "\n".join(lines)

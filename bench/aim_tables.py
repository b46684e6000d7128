"""The Markdown the AIM benchmark (``bench/aim.py``) prints and writes into docs/BENCHMARKS.md.

:func:`render` turns a run's :class:`~aim_record.Results` into its section: one table per part
(and one of where a measurement's time goes), each timing as median and spread (:func:`spread`),
ratios dividing medians taken in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from aim_record import (
    B3,
    B3_ONE,
    B3_START,
    LEAVES_B3,
    LEAVES_SHA,
    MAPS,
    MEASURE,
    MEASURE_ONE,
    READ_FILE,
    READ_MEM,
    READER_B3,
    READER_SHA,
    SHA_START,
    SHA_TOOL,
    SMAPS,
    START_OF,
    VM_READV,
    Results,
    Throughput,
)
from smig.aim.hashing import DEFAULT_THREADS
from smig.lab.bare import BARE_ARGS, DEFAULT_BINARY
from smig.model import HashAlgorithm

BARE_QEMU = (DEFAULT_BINARY, *BARE_ARGS)
MiB = 1 << 20


# -- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Median and p10-p90 with 10 samples or more, else median and min-max."""
    if len(values) >= 10:
        q = statistics.quantiles(values, n=10, method="inclusive")
        return Spread(statistics.median(values), q[0], q[-1], len(values))
    return Spread(statistics.median(values), min(values), max(values), len(values))


def _ms(values: Sequence[float], scale: float = 1.0) -> str:
    s = spread([v * scale for v in values])
    digits = 2 if s.median < 10 else 1
    return f"{s.median:.{digits}f} ({s.low:.{digits}f}-{s.high:.{digits}f}) n={s.n}"


def _rate(nbytes: int, seconds: Sequence[float]) -> str:
    s = spread(seconds)
    return f"{nbytes / MiB / s.median:.0f} ({nbytes / MiB / s.high:.0f}-{nbytes / MiB / s.low:.0f})"


def _ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(a) / statistics.median(b)


# -- the tables ------------------------------------------------------------------------------


def _single_table(r: Results) -> list[str]:
    base = next(c for c in r.single if c.algorithm == HashAlgorithm.BLAKE3.value and c.cow_check)
    mapped = statistics.median(x for c in r.single for x in c.mapped_mib_before_cold)
    disk = statistics.median(x for c in r.single for x in c.disk_mib_during_cold)
    warm = len(base.warm_ms) // max(1, len(base.cold_ms))
    out = [
        "### One QEMU process",
        "",
        f"A bare `{' '.join(BARE_QEMU)}`: no guest, but the same code mappings as a guest's QEMU, its TCG buffer "
        f"included (which SMIG does not hash). One measurement reads {base.bytes / MiB:.1f} MiB of its code. "
        "Cold: the first measurement of a freshly started process, just after QEMU's code files were dropped from "
        "the page cache (`posix_fadvise(DONTNEED)`, which keeps pages that any process maps). Before it, "
        f"{mapped:.1f} MiB of that code was in QEMU's page tables (the first read faults the rest in), and the "
        f"whole machine read {disk:.1f} MiB from disk during it (medians; `pgpgin`)"
        f"{': cold page tables, then, not a cold page cache' if disk < 1 else ''}. Warm: the {warm} rounds "
        f"after it, on each of {len(base.cold_ms)} fresh processes. Without the check means "
        "`cow_check=False, share_clean=False`, so `/proc/PID/pagemap` is not read at all.",
        "",
        "| setting | cold (ms) | warm (ms) | cold / warm | warm, ratio to BLAKE3 with check |",
        "|---|---|---|---|---|",
    ]
    for c in r.single:
        out.append(
            f"| {c.label} | {_ms(c.cold_ms)} | {_ms(c.warm_ms)} | {_ratio(c.cold_ms, c.warm_ms):.2f} | "
            f"{_ratio(c.warm_ms, base.warm_ms):.2f} |"
        )
    return out


def _host_table(r: Results) -> list[str]:
    h = r.host
    shared = next(c for c in h.cases if c.share_clean)
    out = [
        "### Three guests on one host",
        "",
        f"{h.guests} idle guests of {h.memory_mib} MiB booted by SMIG's QEMU driver (accelerator: {h.accel}), all "
        "measured in every round (BLAKE3, copy-on-write check on). Shared: a clean file-backed mapping is hashed "
        "once per round for every process that maps it (`share_clean=True`, the default); not shared: once per "
        "process. The two settings alternate round by round, after one round (shared) that "
        f"took {h.first_round_ms:.0f} ms: the first read faults the code pages into the processes' page tables.",
        "",
        "| clean mappings | MiB per round | per round (ms) | ratio to shared |",
        "|---|---|---|---|",
    ]
    tail = [
        "",
        f"What sharing cannot save, per guest process and round: parsing `/proc/PID/maps` {_ms(h.maps_ms)} ms, "
        f"parsing maps again and reading the `/proc/PID/pagemap` entries of its code {_ms(h.smaps_ms)} ms "
        "(the copy-on-write signal; "
        "it reads the code's entries only, so guest RAM does not add to it).",
    ]
    for c in h.cases:
        out.append(
            f"| {'shared (default)' if c.share_clean else 'not shared'} | {statistics.median(c.bytes) / MiB:.1f} | "
            f"{_ms(c.elapsed_ms)} | {_ratio(c.elapsed_ms, shared.elapsed_ms):.2f} |"
        )
    return out + tail


def _net(t: Throughput, what: str) -> list[float]:
    """Times of ``what`` less the median time its tool takes over /dev/null (its process start)."""
    start = statistics.median(t.seconds[START_OF[what]]) if what in START_OF else 0.0
    return [s - start for s in t.seconds[what]]


def _speedup(t: Throughput, what: str, than: str) -> float:
    return _ratio(_net(t, than), _net(t, what))


def _throughput_table(r: Results) -> list[str]:
    t = r.throughput
    out = [
        "### Hashing throughput: SMIG and b3sum over the same bytes",
        "",
        f"The code SMIG hashes in one bare QEMU process ({t.bytes / MiB:.1f} MiB: its executable mappings but "
        "`[vsyscall]` and the TCG buffer) dumped into one file in /dev/shm"
        f"{'' if t.same_digests else ' (b3sum and sha256sum did NOT agree with Python over it)'}; "
        f"every step timed once per pass, {len(t.seconds[B3])} passes. Commands are timed whole, process start "
        "included; 'net' subtracts the median time the same command takes over /dev/null. Ratios compare "
        "throughput with b3sum's net of its process start (higher is faster). Of the bytes a warm SMIG "
        f"measurement hashes, {t.in_place_bytes / MiB:.1f} MiB are hashed in place, in the page-cache frames the "
        "process maps (proved the same by their frame numbers), and the rest copied out of its memory.",
        "",
        "| what | time (ms) | MiB/s | MiB/s, net | ratio to b3sum (all threads) | ratio to b3sum (1 thread) |",
        "|---|---|---|---|---|---|",
    ]
    for what in (B3, B3_ONE, SHA_TOOL, B3_START, SHA_START, READER_B3, READER_SHA, READ_FILE, MEASURE, MEASURE_ONE):
        starts = what in (B3_START, SHA_START)
        rate = "-" if starts else _rate(t.bytes, t.seconds[what])
        net = _rate(t.bytes, _net(t, what)) if what in START_OF else "-"
        vs = "- | -"
        if not starts and what != READ_FILE:
            vs = f"{_speedup(t, what, B3):.2f} | {_speedup(t, what, B3_ONE):.2f}"
        out.append(f"| {what} | {_ms(t.seconds[what], 1000)} | {rate} | {net} | {vs} |")
    out += ["", _goal(t), ""]
    whole = statistics.median(t.seconds[MEASURE])
    parts = (MAPS, SMAPS, VM_READV, LEAVES_B3)
    out += [
        "### Where a measurement's time goes",
        "",
        "The warm BLAKE3 measurement of the table above, and its steps timed alone in the same passes over the "
        "same process, each on one thread. The measurement overlaps reading with hashing and hashes on "
        f"{DEFAULT_THREADS} thread(s), so its steps add up to more than it takes.",
        "",
        "| step | time (ms) | MiB/s | share of the measurement |",
        "|---|---|---|---|",
    ]
    for what in (MEASURE, *parts, READ_MEM, LEAVES_SHA):
        rate = _rate(t.bytes, t.seconds[what]) if what not in (MAPS, SMAPS) else "-"
        share = statistics.median(t.seconds[what]) / whole
        out.append(f"| {what} | {_ms(t.seconds[what], 1000)} | {rate} | {share:.0%} |")
    total = sum(statistics.median(t.seconds[p]) for p in parts)
    out.append(f"| sum of the four steps above it | {total * 1000:.2f} | - | {total / whole:.0%} |")
    return out


def _goal(t: Throughput) -> str:
    def met(x: float) -> str:
        return "met" if x >= 0.8 else "not met"

    reader = (_speedup(t, READER_B3, B3), _speedup(t, READER_B3, B3_ONE))
    measure = (_speedup(t, MEASURE, B3), _speedup(t, MEASURE, B3_ONE))
    wall = _ratio(t.seconds[B3], t.seconds[READER_B3]), _ratio(t.seconds[B3_ONE], t.seconds[READER_B3])
    wall_measure = _ratio(t.seconds[B3], t.seconds[MEASURE]), _ratio(t.seconds[B3_ONE], t.seconds[MEASURE])
    return (
        f"**Goal: SMIG's BLAKE3 at least 0.8x b3sum.** Against b3sum net of its process start: hashing the file "
        f"(SMIG's Reader) {reader[0]:.2f}x b3sum with all threads ({met(reader[0])}), {reader[1]:.2f}x b3sum with "
        f"one thread ({met(reader[1])}); measuring the process from its memory (what AIM does) {measure[0]:.2f}x "
        f"({met(measure[0])}) and {measure[1]:.2f}x ({met(measure[1])}). Against b3sum's whole command time, "
        f"process start included: the Reader {wall[0]:.2f}x and {wall[1]:.2f}x, the measurement "
        f"{wall_measure[0]:.2f}x ({met(wall_measure[0])}) and {wall_measure[1]:.2f}x ({met(wall_measure[1])}). "
        f"SMIG reads and hashes on {DEFAULT_THREADS} thread(s)."
    )


def _monitor_table(r: Results) -> list[str]:
    runs = r.monitor
    per = len(runs) // 4
    out = [
        "### CPU share of a monitor",
        "",
        "SMIG's Monitor measuring one bare QEMU process (BLAKE3, copy-on-write check, the manifest's files "
        f"checked against digests cached before the run), {r.monitor_seconds:.0f} s per run, {per} run(s) per "
        "setting, the settings interleaved; intervals jitter by +-50% around the mean. CPU share = this "
        "process's CPU time, all threads (`time.process_time`), / wall time. Interval achieved = mean time from "
        "one round's start to the next's. Measurement = wall time of a round's measurement (processes and "
        "files); CPU per round = the measuring thread's CPU time for the round (measurement, report, signature). "
        "Spreads of share and interval are over runs, of measurement and CPU over rounds.",
        "",
        "| mean interval (s) | max CPU share | rounds per run | interval achieved (s) | measurement (ms) "
        "| CPU per round (ms) | CPU share | share, ratio to uncapped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for interval in (1.0, 0.1):
        uncapped = [x.share for x in runs if x.mean_interval_s == interval and x.max_cpu_share == 1.0]
        for cap in (1.0, 0.25):
            these = [x for x in runs if x.mean_interval_s == interval and x.max_cpu_share == cap]
            got = [x.interval_s for x in these if x.interval_s is not None]
            rounds = [float(len(x.starts)) for x in these]
            cpu = [c for x in these for c in x.round_cpu_s]
            took = [t for x in these for t in x.round_ms]
            shares = [x.share for x in these]
            out.append(
                f"| {interval} | {cap}{' (uncapped)' if cap == 1.0 else ' (default)'} | "
                f"{statistics.median(rounds):.0f} ({min(rounds):.0f}-{max(rounds):.0f}) | "
                f"{_ms(got) if got else '-'} | {_ms(took) if took else '-'} | {_ms(cpu, 1000) if cpu else '-'} | "
                f"{_ms(shares, 100)} % | "
                f"{'-' if cap == 1.0 else f'{_ratio(shares, uncapped):.2f}'} |"
            )
    return out


def render(r: Results) -> str:
    m = r.machine
    elsewhere = ", ".join(f"{part} {cores:.2f}" for part, cores in r.busy_elsewhere.items())
    lines = [
        "## AIM: what measuring a hypervisor costs",
        "",
        f"Command: `{r.command}`  ",
        f"Date: {r.date}. Machine: nproc {m['nproc']}, {m['cpu']}, Linux {m['kernel']}, {m['qemu']}; {m['b3sum']}, "
        f"{m['sha256sum']}, blake3-py {m['blake3-py']}, Python {m['python']} hashlib on {m['hashlib']}. "
        f"Load average at the start: {m['load_average_at_start']}. The machine was shared: cores busy outside "
        f"this process while each part ran: {elsewhere}.  ",
        "Each timing: median (p10-p90) over n samples where n >= 10, else median (min-max); ratios divide medians "
        "taken in the same run. Raw figures: `bench/results/aim.json`.",
        "",
        *_single_table(r),
        "",
        *_host_table(r),
        "",
        *_throughput_table(r),
        "",
        *_monitor_table(r),
    ]
    if r.unexpected:
        lines += ["", "Unexpected in this run:", "", *(f"- {note}" for note in r.unexpected)]
    return "\n".join(lines) + "\n"

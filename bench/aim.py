"""AIM figures: what measuring a hypervisor costs, and how SMIG's hashing compares with b3sum.

Four parts, each taken in one run so that every ratio divides figures measured side by side:

1. one QEMU process (a bare ``qemu-system-x86_64 -S`` without a guest: the same code mappings as
   a guest's QEMU, TCG buffer included): time and bytes of one measurement, BLAKE3 and SHA-256,
   with and without the copy-on-write check, cold (first round on a fresh process, its code files
   dropped from the page cache) and warm;
2. a host of three real guests (idle, 256 MiB, booted by the QEMU driver in a temporary SMIG
   home), all three measured per round, with clean mappings hashed once per round or per process;
3. hashing throughput over the same bytes: the code one QEMU process maps, dumped to /dev/shm
   and hashed by ``b3sum`` (all threads, one thread), ``sha256sum`` and SMIG's ``Reader``; SMIG's
   measurement from process memory; and the steps of that measurement timed alone;
4. the CPU share of a monitor measuring one QEMU process at mean intervals of 1 s and 0.1 s,
   uncapped and under the default cap.

Prints the figures; writes them raw to ``--json`` (default ``bench/results/aim.json``);
``--write FILE`` replaces this benchmark's section of ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/aim.py [--quick] [--write docs/BENCHMARKS.md] [--json bench/results/aim.json]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path

import blake3

from docs_section import write_section
from smig.aim import procfs, reference
from smig.aim.hashing import DEFAULT_THREADS, LEAF_SIZE, READ_SIZE, Reader, plan_batches
from smig.aim.measure import Measurement, Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.reference import Manifest
from smig.aim.report import generate_key
from smig.aim.schedule import Schedule
from smig.errors import VMNotFound
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.lab.bare import BARE_ARGS, DEFAULT_BINARY, bare_qemu
from smig.model import HashAlgorithm, Verdict, VMInfo, VMSpec
from smig.paths import smig_cache

SECTION = "aim"
BARE_QEMU = (DEFAULT_BINARY, *BARE_ARGS)
MiB = 1 << 20
B3 = "b3sum FILE (default: all threads)"
B3_ONE = "b3sum --num-threads 1 FILE"
SHA_TOOL = "sha256sum FILE"
B3_START = "b3sum /dev/null (process start only)"
SHA_START = "sha256sum /dev/null (process start only)"
READER_B3 = "SMIG Reader, BLAKE3, over FILE"
READER_SHA = "SMIG Reader, SHA-256, over FILE"
READ_FILE = "read FILE, no hashing"
MEASURE = "SMIG measurement, BLAKE3, from process memory"
MAPS = "parse /proc/PID/maps"
SMAPS = "parse maps, then read the pagemap of the code (copy-on-write signal)"
MEASURE_ONE = "SMIG measurement as before: every byte copied, one hashing thread"
READ_MEM = "read /proc/PID/mem, no hashing (SMIG's fallback)"
VM_READV = "process_vm_readv in batches, no hashing (how SMIG copies what it cannot hash in place)"
LEAVES_B3 = "BLAKE3 of 64 KiB leaves, bytes already in memory"
LEAVES_SHA = "SHA-256 of 64 KiB leaves, bytes already in memory"
START_OF = {B3: B3_START, B3_ONE: B3_START, SHA_TOOL: SHA_START}


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


# -- a QEMU process without a guest ------------------------------------------------------------


def hashed_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, length) of what SMIG hashes in a QEMU process: its code but the unreadable
    ``[vsyscall]`` page and the TCG buffer of generated code (its only anonymous code here)."""
    return [
        (m.start, m.length)
        for m in procfs.executable_mappings(pid)
        if m.path != "[vsyscall]" and not (m.anonymous and not m.kernel_page)
    ]


class Unexpected:
    """Collects what should not happen in a run (a mismatch verdict, differing digests)."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def check(self, what: str, m: Measurement) -> Measurement:
        if m.verdict is not Verdict.MATCH:
            first = m.mismatches[0] if m.mismatches else None
            note = f"{what}: verdict {m.verdict} ({len(m.mismatches)} mismatches; first {first})"
            if note not in self.notes:
                self.notes.append(note)
                print(f"! {note}", file=sys.stderr, flush=True)
        return m


# -- 1. one QEMU process ---------------------------------------------------------------------


@dataclass(frozen=True)
class SingleCase:
    algorithm: str
    cow_check: bool
    bytes: int
    cold_ms: list[float]
    warm_ms: list[float]
    mapped_mib_before_cold: list[float]  # of the code to hash, how much QEMU's page tables held
    disk_mib_during_cold: list[float]  # read from block devices by the whole machine in the cold round

    @property
    def label(self) -> str:
        return f"{self.algorithm}, {'with' if self.cow_check else 'without'} copy-on-write check"


def drop_from_page_cache(files: Iterable[str]) -> None:
    """Ask the kernel to drop the files' cached pages; pages some process has mapped stay."""
    for path in files:
        with suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def mapped_code_mib(pid: int) -> float:
    """MiB of the process's file-backed code present in its page tables (``Rss:`` in smaps)."""
    kib, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = procfs.parse_maps(line)
        if head:
            current = head[0].executable and not head[0].anonymous and not head[0].kernel_page
        elif current and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib / 1024


def paged_in_mib() -> float:
    """What the whole machine has read from block devices since boot (``pgpgin``, KiB), in MiB."""
    line = next(x for x in Path("/proc/vmstat").read_text().splitlines() if x.startswith("pgpgin "))
    return int(line.split()[1]) / 1024


def _cow_pages(pid: int) -> int:
    """The copy-on-write signal alone: private pages among the process's file-backed code."""
    code = [m for m in procfs.read_maps(pid) if m.executable and m.path.startswith("/")]
    with procfs.PageMap(pid) as pagemap:
        return sum(len(pagemap.private_pages(m)) for m in code)


def bench_single(
    manifests: dict[HashAlgorithm, Manifest], repeats: int, warm: int, odd: Unexpected
) -> list[SingleCase]:
    """Per repeat and setting: a fresh QEMU, its code files dropped from the page cache, one cold
    round and ``warm`` warm ones. Settings rotate each repeat, so drift on the machine hits all alike.

    Without the check is ``cow_check=False, share_clean=False``: with one process sharing saves
    nothing, and only so is ``/proc/PID/pagemap`` not read at all.
    """
    settings = [(a, cow) for a in (HashAlgorithm.BLAKE3, HashAlgorithm.SHA256) for cow in (True, False)]
    code = sorted(manifests[HashAlgorithm.BLAKE3].modules)
    cold: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    hot: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    mapped: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    disk: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    nbytes: dict[tuple[HashAlgorithm, bool], int] = {}
    for r in range(repeats):
        for i in range(len(settings)):
            algorithm, cow = setting = settings[(i + r) % len(settings)]
            measurer = Measurer(manifests[algorithm], cow_check=cow, share_clean=cow)
            with bare_qemu() as pid:
                drop_from_page_cache(code)
                mapped[setting].append(mapped_code_mib(pid))
                before = paged_in_mib()
                m = odd.check("one QEMU process, cold", measurer.measure([pid]))
                disk[setting].append(paged_in_mib() - before)
                cold[setting].append(m.elapsed_ms)
                nbytes[setting] = m.bytes
                for _ in range(warm):
                    m = odd.check("one QEMU process, warm", measurer.measure([pid]))
                    hot[setting].append(m.elapsed_ms)
    return [
        SingleCase(a.value, cow, nbytes[(a, cow)], cold[(a, cow)], hot[(a, cow)], mapped[(a, cow)], disk[(a, cow)])
        for a, cow in settings
    ]


# -- 2. three guests on one host -------------------------------------------------------------


@dataclass(frozen=True)
class HostCase:
    share_clean: bool
    elapsed_ms: list[float]
    bytes: list[int]


@dataclass(frozen=True)
class HostResult:
    guests: int
    memory_mib: int
    accel: str
    first_round_ms: float  # shared; the first read faults the code pages into the page tables
    cases: list[HostCase]
    maps_ms: list[float]  # parsing one guest's /proc/PID/maps, alone
    smaps_ms: list[float]  # reading one guest's pagemap entries for its code, alone


async def _launch_all(driver: QemuDriver, specs: list[VMSpec]) -> list[VMInfo]:
    """Boot the guests side by side; every launch finishes (or cleans up) before this returns."""
    done = await asyncio.gather(*(driver.launch(s) for s in specs), return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return [d for d in done if isinstance(d, VMInfo)]


async def bench_host(manifest: Manifest, guests: int, rounds: int, odd: Unexpected) -> HostResult:
    """Boot ``guests`` idle guests and measure all their QEMU processes per round, sharing clean
    mappings across processes or not, the two settings interleaved round by round."""
    specs = [VMSpec(name=f"aim-bench-{i}", memory_mib=256, dirty_mbps=0) for i in range(guests)]
    with tempfile.TemporaryDirectory(prefix="smig-aim-bench-") as home:
        driver = QemuDriver(QemuConfig(home=Path(home), cache=smig_cache()))
        try:
            print(f"… booting {guests} guests", file=sys.stderr, flush=True)
            infos = await _launch_all(driver, specs)
            pids = [i.pid for i in infos]
            measurers = {share: Measurer(manifest, share_clean=share) for share in (True, False)}
            first = odd.check("three guests, first round", measurers[True].measure(pids)).elapsed_ms
            times: dict[bool, list[float]] = {True: [], False: []}
            sizes: dict[bool, list[int]] = {True: [], False: []}
            for r in range(rounds):
                for share in (True, False) if r % 2 == 0 else (False, True):
                    m = odd.check("three guests", measurers[share].measure(pids))
                    if len(m.pids) != guests:
                        odd.notes.append(f"three guests: only {len(m.pids)} measured in a round (gone: {m.gone})")
                    times[share].append(m.elapsed_ms)
                    sizes[share].append(m.bytes)
            cases = [HostCase(s, times[s], sizes[s]) for s in (True, False)]
            maps = [_timed(partial(procfs.read_maps, pid)) * 1000 for _ in range(rounds) for pid in pids]
            smaps = [_timed(partial(_cow_pages, pid)) * 1000 for _ in range(rounds) for pid in pids]
            return HostResult(guests, 256, infos[0].accel.value, first, cases, maps, smaps)
        finally:
            for spec in specs:
                try:
                    await driver.stop(spec.name)
                except VMNotFound:
                    pass  # never launched, or its launch cleaned up after itself
                except Exception as e:  # keep stopping the others
                    print(f"! could not stop {spec.name}: {e}", file=sys.stderr, flush=True)


# -- 3. hashing throughput over the same bytes -----------------------------------------------


@dataclass(frozen=True)
class Throughput:
    bytes: int
    seconds: dict[str, list[float]]  # what was timed -> one wall time per repeat
    same_digests: bool  # b3sum and sha256sum agree with Python's BLAKE3 and SHA-256 of the dump
    in_place_bytes: int  # of the warm measurement's bytes, hashed in the page-cache frames, not copied


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _read_ranges(fd: int, ranges: list[tuple[int, int]], buf: memoryview) -> None:
    """Read the ranges through one reused buffer, as SMIG's Reader does, and throw the bytes away."""
    for start, length in ranges:
        done = 0
        while done < length:
            want = min(len(buf), length - done)
            got = os.preadv(fd, [buf[:want]], start + done)
            if got <= 0:
                raise EOFError(f"short read at {start + done:#x}")
            done += got


def _vm_readv(pid: int, ranges: list[tuple[int, int]]) -> Callable[[], None]:
    """Read the ranges as SMIG does: batches of up to 4 MiB, one ``process_vm_readv`` each."""
    batches = plan_batches([n for _, n in ranges], LEAF_SIZE, READ_SIZE)
    pieces = [[(ranges[r][0] + off, n) for r, off, n in batch] for batch in batches]
    buf = memoryview(bytearray(READ_SIZE))

    def read() -> None:
        with procfs.ProcessMemory(pid) as memory:
            for batch in pieces:
                memory.read(buf, batch)
            if memory.fallbacks:
                raise OSError(f"process_vm_readv fell back to /proc/{pid}/mem {memory.fallbacks} time(s)")

    return read


def _leaves(algorithm: HashAlgorithm, data: memoryview) -> None:
    """Leaf digests as SMIG's Reader makes them, of bytes already in memory: hashing alone."""
    for i in range(0, len(data), LEAF_SIZE):
        if algorithm is HashAlgorithm.BLAKE3:
            blake3.blake3(data[i : i + LEAF_SIZE]).digest()
        else:
            hashlib.sha256(data[i : i + LEAF_SIZE]).digest()


def bench_throughput(manifests: dict[HashAlgorithm, Manifest], repeats: int, odd: Unexpected) -> Throughput:
    """Dump the code one QEMU process maps into one file in /dev/shm, then time every tool over it
    and SMIG over the process itself, round robin, ``repeats`` times after one untimed pass."""
    with bare_qemu() as pid:
        ranges = hashed_ranges(pid)
        fd, name = tempfile.mkstemp(prefix="smig-aim-bench-", suffix=".bin", dir="/dev/shm")
        try:
            with os.fdopen(fd, "wb") as out, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
                for start, length in ranges:
                    chunk = os.pread(mem.fileno(), length, start)
                    if len(chunk) != length:
                        raise EOFError(f"short read of QEMU's memory at {start:#x}")
                    out.write(chunk)
            data = memoryview(Path(name).read_bytes())
            same = (
                _run("b3sum", name).split()[0] == blake3.blake3(data).hexdigest()
                and _run("sha256sum", name).split()[0] == hashlib.sha256(data).hexdigest()
            )
            if not same:
                odd.notes.append("b3sum or sha256sum disagreed with Python's digest of the same file")
            readers = {a: Reader(a) for a in manifests}
            measurer = Measurer(manifests[HashAlgorithm.BLAKE3])
            serial = Measurer(manifests[HashAlgorithm.BLAKE3], threads=1, in_place=False)
            buf = memoryview(bytearray(READ_SIZE))

            def over_file(fn: Callable[[int], object]) -> Callable[[], object]:
                def go() -> object:
                    with open(name, "rb", buffering=0) as f:
                        return fn(f.fileno())

                return go

            def from_mem() -> None:
                with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                    _read_ranges(f.fileno(), ranges, buf)

            def quiet(*argv: str) -> Callable[[], object]:
                return lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

            steps: dict[str, Callable[[], object]] = {
                B3: quiet("b3sum", name),
                B3_ONE: quiet("b3sum", "--num-threads", "1", name),
                SHA_TOOL: quiet("sha256sum", name),
                B3_START: quiet("b3sum", "/dev/null"),
                SHA_START: quiet("sha256sum", "/dev/null"),
                READER_B3: over_file(readers[HashAlgorithm.BLAKE3].file_digest),
                READER_SHA: over_file(readers[HashAlgorithm.SHA256].file_digest),
                READ_FILE: over_file(lambda f: _read_ranges(f, [(0, len(data))], buf)),
                MEASURE: lambda: odd.check("throughput, measurement", measurer.measure([pid])),
                MEASURE_ONE: lambda: odd.check("throughput, measurement", serial.measure([pid])),
                MAPS: lambda: procfs.read_maps(pid),
                SMAPS: lambda: _cow_pages(pid),
                READ_MEM: from_mem,
                VM_READV: _vm_readv(pid, ranges),
                LEAVES_B3: lambda: _leaves(HashAlgorithm.BLAKE3, data),
                LEAVES_SHA: lambda: _leaves(HashAlgorithm.SHA256, data),
            }
            for fn in steps.values():
                fn()
            seconds: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(repeats):
                for what, fn in steps.items():
                    seconds[what].append(_timed(fn))
            final = measurer.measure([pid])
            measured = final.bytes
            if measured != len(data):
                odd.notes.append(f"SMIG measured {measured} bytes, the dump holds {len(data)}")
            for reader in readers.values():
                reader.close()
            measurer.close()
            serial.close()
            return Throughput(len(data), seconds, same, final.in_place_bytes)
        finally:
            os.unlink(name)


# -- 4. CPU share of a monitor ---------------------------------------------------------------


@dataclass(frozen=True)
class MonitorRun:
    mean_interval_s: float
    max_cpu_share: float
    wall_s: float
    cpu_s: float  # this process's CPU time over the run, all threads
    share: float  # cpu_s / wall_s
    interval_s: float | None  # mean time from one round's start to the next's, as achieved
    starts: list[float]  # when each round started (the report's started_at)
    round_cpu_s: list[float]  # CPU time of each round's measuring thread
    round_ms: list[float]  # wall time of each round's measurement


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


# -- the machine ---------------------------------------------------------------------------


def _busy_s() -> float:
    """CPU time the whole machine spent busy since boot (user, nice, system, irq, softirq), in s."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextmanager
def busy_elsewhere(record: dict[str, float], part: str) -> Iterator[None]:
    """Record how many cores the rest of the machine kept busy while ``part`` ran: every figure
    here shares the CPU with it."""
    busy, own, wall = _busy_s(), _own_s(), time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - wall
        record[part] = max(0.0, (_busy_s() - busy) - (_own_s() - own)) / elapsed


# -- the record ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Results:
    command: str
    date: str
    quick: bool
    machine: dict[str, str]
    single: list[SingleCase]
    host: HostResult
    throughput: Throughput
    monitor: list[MonitorRun]
    monitor_seconds: float
    busy_elsewhere: dict[str, float]  # part -> cores busy outside this process while it ran
    unexpected: list[str]


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {
        "nproc": _run("nproc").strip(),
        "cpu": model,
        "kernel": platform.release(),
        "qemu": _run("qemu-system-x86_64", "--version").splitlines()[0],
        "b3sum": _run("b3sum", "--version").strip(),
        "sha256sum": _run("sha256sum", "--version").splitlines()[0],
        "blake3-py": version("blake3"),
        "hashlib": ssl.OPENSSL_VERSION,
        "python": platform.python_version(),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 3 s monitor runs (about a minute)")
    ap.add_argument("--write", type=Path, help="replace this benchmark's section in this Markdown file")
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "aim.json", help="raw figures"
    )
    args = ap.parse_args()
    quick: bool = args.quick
    command = " ".join([".venv/bin/python bench/aim.py", *sys.argv[1:]])
    odd = Unexpected()
    info = machine()
    print("… building the reference manifests", file=sys.stderr, flush=True)
    files = reference.installed_qemu_files()
    manifests = {a: reference.build(files, algorithm=a) for a in (HashAlgorithm.BLAKE3, HashAlgorithm.SHA256)}
    busy: dict[str, float] = {}
    print("… one QEMU process", file=sys.stderr, flush=True)
    with busy_elsewhere(busy, "one QEMU process"):
        single = bench_single(manifests, 2 if quick else 5, 4 if quick else 10, odd)
    with busy_elsewhere(busy, "three guests (their own CPU included)"):
        host = asyncio.run(bench_host(manifests[HashAlgorithm.BLAKE3], 3, 5 if quick else 20, odd))
    print("… throughput", file=sys.stderr, flush=True)
    with busy_elsewhere(busy, "throughput"):
        throughput = bench_throughput(manifests, 10 if quick else 30, odd)
    seconds = 3.0 if quick else 10.0
    with busy_elsewhere(busy, "monitor"):
        monitor = bench_monitor(manifests[HashAlgorithm.BLAKE3], seconds, 1 if quick else 3, odd)
    results = Results(
        command=command,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        quick=quick,
        machine=info,
        single=single,
        host=host,
        throughput=throughput,
        monitor=monitor,
        monitor_seconds=seconds,
        busy_elsewhere=busy,
        unexpected=odd.notes,
    )
    body = render(results)
    print(body)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
    if args.write:
        write_section(args.write, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

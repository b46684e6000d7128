"""What an AIM benchmark run records (``bench/aim.py``): the figures of its four parts and the run.

The labels of what the throughput part times (keys of :attr:`Throughput.seconds`, rows of its
tables), one frozen dataclass per part (:class:`SingleCase`, :class:`HostResult`,
:class:`Throughput`, :class:`MonitorRun`), :class:`Results` for the whole run (written raw to
``--json``), and :class:`Unexpected`, which collects what should not happen in a run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from smig.aim.measure import Measurement
from smig.model import Verdict

# What the throughput part times: keys of Throughput.seconds, rows of its tables.
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


@dataclass(frozen=True)
class Throughput:
    bytes: int
    seconds: dict[str, list[float]]  # what was timed -> one wall time per repeat
    same_digests: bool  # b3sum and sha256sum agree with Python's BLAKE3 and SHA-256 of the dump
    in_place_bytes: int  # of the warm measurement's bytes, hashed in the page-cache frames, not copied


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

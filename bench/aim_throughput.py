"""Part 3 of the AIM benchmark (``bench/aim.py``): hashing throughput over the same bytes.

:func:`bench_throughput` dumps the code one QEMU process maps into /dev/shm and times ``b3sum``,
``sha256sum`` and SMIG's ``Reader`` over it, SMIG's measurement from the process's memory, and
the steps of that measurement alone (reading, parsing maps, the pagemap, hashing leaves).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import blake3

from aim_probes import cow_pages, stdout_of, timed
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
    VM_READV,
    Throughput,
    Unexpected,
)
from smig.aim import procfs
from smig.aim.hashing import LEAF_SIZE, READ_SIZE, Reader, plan_batches
from smig.aim.measure import Measurer
from smig.aim.reference import Manifest
from smig.bench.measure import hashed_ranges
from smig.lab.bare import bare_qemu
from smig.model import HashAlgorithm


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
                stdout_of("b3sum", name).split()[0] == blake3.blake3(data).hexdigest()
                and stdout_of("sha256sum", name).split()[0] == hashlib.sha256(data).hexdigest()
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
                SMAPS: lambda: cow_pages(pid),
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
                    seconds[what].append(timed(fn))
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

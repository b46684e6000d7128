"""The hashing pipeline: batches cut at leaf boundaries, parallel leaves equal to serial ones, and
another process's memory read whatever protections its code was given."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from smig.aim import procfs
from smig.aim.hashing import FileSource, Reader, plan_batches
from smig.aim.shadow import same_frames
from smig.errors import ProcessGone
from smig.model import HashAlgorithm

LEAF = 4096


def test_batches_cover_every_byte_once_and_cut_at_leaves() -> None:
    lengths = [3 * LEAF, 100, 10 * LEAF + 7, LEAF, 5 * LEAF]
    batches = plan_batches(lengths, LEAF, 4 * LEAF)
    assert all(sum(n for _, _, n in b) <= 4 * LEAF for b in batches)
    covered: dict[int, list[tuple[int, int]]] = {}
    for b in batches:
        for r, off, n in b:
            assert off % LEAF == 0
            covered.setdefault(r, []).append((off, n))
    for r, length in enumerate(lengths):
        spans = sorted(covered[r])
        assert spans[0][0] == 0
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(spans))
        assert spans[-1][0] + spans[-1][1] == length
    # Small ranges share a read: five ranges, not one batch each plus the splits.
    assert len(batches) == 6


def test_a_range_larger_than_a_batch_is_split_and_empty_input_is_empty() -> None:
    assert plan_batches([9 * LEAF], LEAF, 4 * LEAF) == [
        [(0, 0, 4 * LEAF)],
        [(0, 4 * LEAF, 4 * LEAF)],
        [(0, 8 * LEAF, LEAF)],
    ]
    assert plan_batches([], LEAF, 4 * LEAF) == []


def _expected(algorithm: HashAlgorithm, data: bytes, start: int, length: int) -> list[bytes]:
    pieces = [data[i : min(i + LEAF, start + length)] for i in range(start, start + length, LEAF)]
    if algorithm is HashAlgorithm.BLAKE3:
        return [blake3.blake3(p).digest() for p in pieces]
    return [hashlib.sha256(p).digest() for p in pieces]


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parallel_leaves_equal_serial_hashing(tmp_path: Path, algorithm: HashAlgorithm, threads: int) -> None:
    data = os.urandom(40 * LEAF + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    ranges = [(0, 3 * LEAF), (5 * LEAF, 9 * LEAF + 10), (20 * LEAF, 100), (21 * LEAF, 19 * LEAF + 123)]
    reader = Reader(algorithm, LEAF, 4 * LEAF, threads=threads)
    try:
        with path.open("rb", buffering=0) as f:
            got = reader.hash_ranges(FileSource(f.fileno()), ranges)
            whole = reader.leaves(f.fileno(), 0, len(data))
    finally:
        reader.close()
    assert got == [_expected(algorithm, data, s, n) for s, n in ranges]
    assert whole == _expected(algorithm, data, 0, len(data))
    assert reader.bytes_read == sum(n for _, n in ranges) + len(data)
    if threads > 1:
        assert reader.worker_cpu_s > 0, "the hashing threads' CPU time is counted for the monitor's budget"


def _flat(algorithm: HashAlgorithm, data: bytes) -> str:
    return blake3.blake3(data).hexdigest() if algorithm is HashAlgorithm.BLAKE3 else hashlib.sha256(data).hexdigest()


def _flat_digests(reader: Reader, views: list[memoryview]) -> list[str]:
    """Each view's flat digest, in order, through a flat pass fed largest first (as AIM feeds it)."""
    order = sorted(range(len(views)), key=lambda i: -len(views[i]))
    with reader.flat_pass(sum(map(len, views))) as flats:
        slots = {i: flats.add(views[i]) for i in order}
        digests = flats.finish()
    return [digests[slots[i]] for i in range(len(views))]


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
@pytest.mark.parametrize("threads", [1, 2])
def test_flat_digests_equal_one_serial_hash_of_each_input(algorithm: HashAlgorithm, threads: int) -> None:
    # Sizes on both sides of the point where BLAKE3 hashes on its own threads (1 MiB), and empty.
    pieces = [os.urandom(n) for n in (0, 1, 1000, LEAF, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17)]
    reader = Reader(algorithm, LEAF, 4 * LEAF, threads=threads)
    try:
        got = _flat_digests(reader, [memoryview(p) for p in pieces])
    finally:
        reader.close()
    assert got == [_flat(algorithm, p) for p in pieces]
    assert reader.bytes_read == sum(map(len, pieces))
    if threads > 1:
        assert reader.worker_cpu_s > 0, "the other threads' CPU (BLAKE3's own too) is charged to the budget"
    else:
        assert reader.worker_cpu_s == 0, "one thread: all the hashing is on the caller's own clock"


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
def test_a_copied_range_gets_its_flat_digest_in_the_same_pass(tmp_path: Path, algorithm: HashAlgorithm) -> None:
    data = os.urandom(40 * LEAF + 123)
    path = tmp_path / "blob"
    path.write_bytes(data)
    # A range spanning several read batches, one sharing a batch with another, one short tail.
    ranges = [(0, 9 * LEAF + 10), (10 * LEAF, 100), (11 * LEAF, 29 * LEAF + 123)]
    reader = Reader(algorithm, LEAF, 4 * LEAF, threads=2)
    try:
        with path.open("rb", buffering=0) as f, reader.batch(FileSource(f.fileno())) as batch:
            indexes = [batch.add_range(s, n) for s, n in ranges]
            leaves = batch.finish()
    finally:
        reader.close()
    assert [batch.flat_digest(i) for i in indexes] == [_flat(algorithm, data[s : s + n]) for s, n in ranges]
    assert leaves == [_expected(algorithm, data, s, n) for s, n in ranges]


def test_a_short_file_is_an_error_unless_padded(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    reader = Reader(HashAlgorithm.BLAKE3, LEAF, 4 * LEAF)
    try:
        with path.open("rb", buffering=0) as f:
            with pytest.raises(EOFError):
                reader.leaves(f.fileno(), 0, LEAF)
            padded = reader.leaves(f.fileno(), 0, LEAF, pad=True)
    finally:
        reader.close()
    assert padded == [blake3.blake3(b"x" * 100 + bytes(LEAF - 100)).digest()]


# A child that maps a page of known bytes, optionally takes away read permission (PROT_EXEC only,
# as an attacker hiding code from readers would), prints the address and waits.
_CHILD = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
m = mmap.mmap(-1, 2 * mmap.PAGESIZE)
m.write(bytes(range(256)) * (2 * mmap.PAGESIZE // 256))
address = ctypes.addressof(ctypes.c_char.from_buffer(m))
if sys.argv[1] == "exec-only" and libc.mprotect(address, 2 * mmap.PAGESIZE, mmap.PROT_EXEC) != 0:
    raise SystemExit("mprotect failed")
print(address, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def child(request: pytest.FixtureRequest) -> Iterator[tuple[int, int, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, request.param], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        yield proc.pid, int(proc.stdout.readline()), request.param
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


@pytest.mark.parametrize("child", ["readable", "exec-only"], indirect=True)
def test_process_memory_reads_code_whatever_its_protection(child: tuple[int, int, str]) -> None:
    pid, address, mode = child
    page = os.sysconf("SC_PAGE_SIZE")
    buf = bytearray(2 * page)
    with procfs.ProcessMemory(pid) as memory:
        perms = next(m.perms for m in procfs.read_maps(pid) if m.start == address)
        memory.read(memoryview(buf), [(address + page, page), (address, page)])
        fallbacks = memory.fallbacks
    pattern = bytes(range(256)) * (page // 256)
    assert bytes(buf) == pattern * 2
    # process_vm_readv cannot read an execute-only mapping; /proc/PID/mem must, or code is hidden.
    assert perms.startswith("--x" if mode == "exec-only" else "rw-"), perms
    assert fallbacks == (1 if mode == "exec-only" else 0)


@pytest.mark.parametrize("child", ["readable"], indirect=True)
def test_reading_an_unmapped_range_or_a_gone_process_is_not_data(child: tuple[int, int, str]) -> None:
    pid, _, _ = child
    with procfs.ProcessMemory(pid) as memory, pytest.raises((ProcessGone, EOFError)):
        memory.read(memoryview(bytearray(4096)), [(4096, 4096)])  # page 1 is never mapped
    assert procfs.start_time(pid) is not None
    with pytest.raises(ProcessGone):
        procfs.ProcessMemory(2**22 + 12345)
    assert procfs.start_time(2**22 + 12345) is None


_COW_CHILD = r"""
import ctypes, mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 4 * mmap.PAGESIZE, access=mmap.ACCESS_COPY)
_ = m[:]  # read every page in: shared with the page cache, nothing copied
m[2 * mmap.PAGESIZE + 5] = 0xCC  # one write: page 2 becomes the process's private copy
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.read()
"""


def test_pagemap_names_exactly_the_pages_written(tmp_path: Path) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    path = tmp_path / "code"
    path.write_bytes(os.urandom(4 * page))
    proc = subprocess.Popen(
        [sys.executable, "-c", _COW_CHILD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        address = int(proc.stdout.readline())
        mapping = next(m for m in procfs.read_maps(proc.pid) if m.start == address)
        with procfs.PageMap(proc.pid) as pagemap:
            private = pagemap.private_pages(mapping)
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    assert mapping.path == str(path)
    assert private == [2]


def _entries(*pfns: int, flags: int = 0xA0) -> bytes:
    return b"".join(((flags << 56) | pfn).to_bytes(8, "little") for pfn in pfns)


def test_same_frames_needs_every_page_present_in_the_same_file_frame() -> None:
    ours = _entries(0x1234, 0x5678, 0x1_0000_0001)
    assert same_frames(_entries(0x1234, 0x5678, 0x1_0000_0001), ours)
    assert not same_frames(_entries(0x1234, 0x5679, 0x1_0000_0001), ours), "one frame differs"
    assert not same_frames(_entries(0x1234, 0x5678), ours), "lengths differ"
    assert not same_frames(_entries(0x1234, 0x5678, 0x1_0000_0001, flags=0x80), ours), "private (anonymous) pages"
    assert not same_frames(_entries(0, 0, 0, flags=0x20), _entries(0, 0, 0, flags=0x20)), "not present"
    assert not same_frames(_entries(0, 0, 0), _entries(0, 0, 0)), "frame numbers hidden (no CAP_SYS_ADMIN)"
    assert not same_frames(b"", b"")
    # The soft-dirty bit (55) is no part of the frame number.
    soft_dirty = bytearray(_entries(0x1234, 0x5678, 0x1_0000_0001))
    soft_dirty[6] |= 0x80
    assert same_frames(bytes(soft_dirty), ours)


def test_picking_code_lines_first_parses_the_same_code_mappings() -> None:
    text = Path("/proc/self/maps").read_text() + (
        "7f0000000000-7f0000001000 --xp 00000000 00:00 0 \n"
        "7f0000002000-7f0000003000 rwxp 00001000 fd:01 42    /opt/x (deleted)\n"
        "not a maps line with rwx in it\n"
    )
    everything = procfs.parse_maps(text)
    code = procfs.parse_maps(text, executable_only=True)
    assert code == [m for m in everything if m.executable]
    assert [m.perms for m in code[-2:]] == ["--xp", "rwxp"] and code[-1].deleted and code[-1].path == "/opt/x"


def test_a_flat_pass_hashes_as_views_are_added_and_an_error_leaves_the_reader_usable() -> None:
    pieces = [os.urandom(n) for n in (5 << 20, 1 << 20, 7, 300_000)]
    reader = Reader(HashAlgorithm.BLAKE3, LEAF, 4 * LEAF, threads=2)
    try:
        with reader.flat_pass(0) as flats:  # total unknown: nothing goes through BLAKE3's own threads
            slots = [flats.add(memoryview(p)) for p in pieces]
            time.sleep(0.05)  # the other thread hashes meanwhile
            flats.expect(sum(map(len, pieces)))  # now the 5 MiB view is more than a fair share
            slots.append(flats.add(memoryview(pieces[0])))
            got = flats.finish()
        with pytest.raises(RuntimeError), reader.flat_pass(1 << 20) as failed:
            failed.add(memoryview(pieces[0]))
            raise RuntimeError("the caller failed while views were queued")
        with reader.flat_pass(0) as unfinished:  # left without finish(): its thread must not wait on
            unfinished.add(memoryview(pieces[2]))
        again = _flat_digests(reader, [memoryview(p) for p in pieces])
    finally:
        reader.close()
    expected = [_flat(HashAlgorithm.BLAKE3, p) for p in pieces]
    assert [got[i] for i in slots] == [*expected, expected[0]]
    assert again == expected

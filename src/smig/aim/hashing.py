"""The hashing AIM does: a flat digest per target, leaf digests over fixed-size pieces, a root per host.

A target's digest is the hash of its bytes as one input (:func:`flat_digest`: BLAKE3's own tree,
hashed on every core as ``b3sum`` does, or SHA-256), and a host's root is the hash of its sorted
(target, digest) pairs. Equal flat digests settle a target in one call. Only a target whose flat
digest differs from the reference is hashed again in leaves of ``LEAF_SIZE``: comparing those with
the reference's names the changed range to within one leaf, without the monitor ever holding the
reference bytes.

Bytes are read in batches of up to 4 MiB into two reused buffers, never into Python objects. Their
leaves go into one queue that the hashing threads and the caller all take from (BLAKE3 and SHA-256
release the GIL on 64 KiB inputs): the threads hash while the caller reads the next batch, and the
caller hashes too once it has nothing left to read.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

import blake3

from smig.model import HashAlgorithm

LEAF_SIZE = 64 << 10
READ_SIZE = 4 << 20
DEFAULT_THREADS = min(2, os.cpu_count() or 1)

Range = tuple[int, int]  # (start, length)
_T = TypeVar("_T")


def _leaf(algorithm: HashAlgorithm, data: memoryview | bytes) -> bytes:
    if algorithm is HashAlgorithm.BLAKE3:
        return blake3.blake3(data).digest()
    return hashlib.sha256(data).digest()


# Below this, BLAKE3 on one thread is faster than handing the input to its thread pool.
_MULTITHREAD_MIN = 1 << 20


def flat_hasher(algorithm: HashAlgorithm, *, parallel: bool = True) -> Hasher:
    """An incremental flat hash; ``parallel`` lets BLAKE3 hash large updates on its own threads."""
    if algorithm is HashAlgorithm.BLAKE3:
        return blake3.blake3(max_threads=blake3.blake3.AUTO if parallel else 1)
    return hashlib.sha256()


def flat_digest(algorithm: HashAlgorithm, data: memoryview | bytes, *, parallel: bool = True) -> str:
    """The digest of ``data`` as one input: what a target's digest is (see the module docstring).

    With ``parallel``, a large input is hashed on BLAKE3's own threads, which split its tree
    across every core (``b3sum`` does the same); SHA-256 has no parallel form."""
    if algorithm is HashAlgorithm.BLAKE3:
        threads = blake3.blake3.AUTO if parallel and len(data) >= _MULTITHREAD_MIN else 1
        return blake3.blake3(data, max_threads=threads).hexdigest()
    return hashlib.sha256(data).hexdigest()


class Hasher(Protocol):
    def update(self, data: memoryview | bytes, /) -> object: ...

    def hexdigest(self) -> str: ...


def combine(algorithm: HashAlgorithm, parts: Iterable[bytes]) -> bytes:
    """The digest of a sequence of digests (one inner node of the tree)."""
    h = blake3.blake3() if algorithm is HashAlgorithm.BLAKE3 else hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def root(algorithm: HashAlgorithm, digests: Iterable[tuple[str, str]]) -> str:
    """The host's root over ``(target, hex digest)`` pairs, independent of their order."""
    return combine(algorithm, (f"{t}\0{d}\n".encode() for t, d in sorted(digests))).hex()


class Source(Protocol):
    """Where bytes come from: fills ``view`` with the ``pieces``, back to back."""

    def read(self, view: memoryview, pieces: Sequence[Range]) -> None: ...


class FileSource:
    """A file (or ``/proc/PID/mem``) read with ``preadv``.

    ``pad`` zero-fills past the end of a file, as the kernel does for the tail of a mapped page.
    Without it a short read raises ``EOFError``.
    """

    def __init__(self, fd: int, *, pad: bool = False) -> None:
        self.fd = fd
        self.pad = pad

    def read(self, view: memoryview, pieces: Sequence[Range]) -> None:
        at = 0
        for start, length in pieces:
            got = 0
            while got < length:
                n = os.preadv(self.fd, [view[at + got : at + length]], start + got)
                if n == 0:
                    break
                got += n
            if got < length:
                if not self.pad:
                    raise EOFError(f"short read at {start + got:#x}")
                view[at + got : at + length] = bytes(length - got)
            at += length


# One piece of a batch: (range index, offset in the range, length); offsets are leaf-aligned.
_Piece = tuple[int, int, int]
# One leaf to hash: (its bytes, range index, leaf index).
_Job = tuple[memoryview, int, int]
_CHUNK_LEAVES = 8  # leaves a thread takes from the queue at a time: 512 KiB, small enough to share


def plan_batches(lengths: Sequence[int], leaf_size: int, batch_size: int) -> list[list[_Piece]]:
    """Cut ranges of ``lengths`` into batches of at most ``batch_size`` bytes, at leaf boundaries.

    A range may span batches and a batch may hold many ranges, so small mappings cost one read
    between them, not one each.
    """
    batches: list[list[_Piece]] = [[]]
    used = 0
    for index, length in enumerate(lengths):
        off = 0
        while off < length:
            rest = length - off
            take = rest if rest <= batch_size - used else (batch_size - used) // leaf_size * leaf_size
            if take == 0:
                batches.append([])
                used = 0
                continue
            batches[-1].append((index, off, take))
            used += take
            off += take
    return [b for b in batches if b]


class Reader:
    """Hashes ranges of a source into leaf digests, reading and hashing in parallel.

    One Reader serves one caller at a time. Its hashing threads are started by the first call, so
    they inherit that thread's scheduling priority (the monitor's measuring thread runs niced).
    """

    def __init__(
        self,
        algorithm: HashAlgorithm,
        leaf_size: int = LEAF_SIZE,
        read_size: int = READ_SIZE,
        *,
        threads: int = DEFAULT_THREADS,
    ) -> None:
        if read_size % leaf_size:
            raise ValueError("read_size must be a multiple of leaf_size")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.read_size = read_size
        self.threads = threads
        self._buffers = (bytearray(read_size), bytearray(read_size))
        self._pool: ThreadPoolExecutor | None = None
        self._queue: collections.deque[tuple[list[_Job], list[list[bytes]]]] = collections.deque()
        self._futures: list[Future[None]] = []
        self._draining = 0  # hashing threads at work on the queue
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.worker_cpu_s = 0.0  # CPU time spent in the hashing threads, for the monitor's budget

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def leaves(self, fd: int, start: int, length: int, *, pad: bool = False) -> list[bytes]:
        """Leaf digests of ``length`` bytes at ``start`` of file descriptor ``fd``."""
        return self.hash_ranges(FileSource(fd, pad=pad), [(start, length)])[0]

    def file_digest(self, fd: int) -> str:
        """The flat digest of a whole file."""
        size = os.fstat(fd).st_size
        with self.batch(FileSource(fd, pad=True)) as batch:
            index = batch.add_range(0, size, leaves=False)
            batch.finish()
        return batch.flat_digest(index)

    def hash_ranges(self, source: Source, ranges: Sequence[Range]) -> list[list[bytes]]:
        """The leaf digests of each range, in order. Errors of ``source.read`` propagate."""
        with self.batch(source) as batch:
            for start, length in ranges:
                batch.add_range(start, length)
            return batch.finish()

    def flat_pass(self, total: int) -> FlatPass:
        """A pass that hashes views as they are added (``total``: about how many bytes will be)."""
        return FlatPass(self, total)

    @contextlib.contextmanager
    def _charging_blake3_threads(self) -> Iterator[None]:
        """Charge the process's CPU time over the block, less the caller's, to :attr:`worker_cpu_s`:
        the time of BLAKE3's own threads, which no clock of ours sees (plus whatever else ran)."""
        process0, thread0 = time.process_time(), time.thread_time()
        try:
            yield
        finally:
            self.worker_cpu_s += max(0.0, (time.process_time() - process0) - (time.thread_time() - thread0))

    def batch(self, source: Source) -> HashBatch:
        """A pass that hashes views as they are added and ranges of ``source`` when it finishes."""
        return HashBatch(self, source)

    def _submit(self, fn: Callable[[], _T]) -> Future[_T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads - 1, thread_name_prefix="aim-hash")
        return self._pool.submit(fn)

    def _queue_jobs(self, jobs: list[_Job], out: list[list[bytes]]) -> None:
        if not jobs:
            return
        chunk = max(1, min(_CHUNK_LEAVES, len(jobs) // (2 * self.threads)))
        self._queue.extend((jobs[i : i + chunk], out) for i in range(0, len(jobs), chunk))
        if self.threads == 1:
            return
        with self._lock:
            idle = self.threads - 1 - self._draining
            self._draining += idle
        if idle:
            self._futures += [self._submit(lambda: self._drain(True)) for _ in range(idle)]

    def _finish(self) -> None:
        """Hash on this thread until the queue is empty, then wait for the hashing threads."""
        self._drain(False)
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def _abandon(self) -> None:
        """After an error: drop what is queued and let the threads stop before a buffer is reused."""
        self._queue.clear()
        wait(self._futures)
        self._futures = []

    def _drain(self, worker: bool) -> None:
        cpu0 = time.thread_time()
        algorithm = self.algorithm
        while True:
            try:
                jobs, out = self._queue.popleft()
            except IndexError:
                if not worker:
                    return
                # Leave only under the lock the producer checks, so no queued leaf is stranded.
                with self._lock:
                    if self._queue:
                        continue
                    self._draining -= 1
                    self.worker_cpu_s += time.thread_time() - cpu0  # the caller's is on its own clock
                    return
            for data, r, i in jobs:
                out[r][i] = _leaf(algorithm, data)


class FlatPass:
    """Flat digests of views, hashed as the caller adds them: the Reader's threads take them from
    a queue at once, while the caller goes on deciding what to add, and the caller hashes too from
    :meth:`finish` on. Each view is hashed whole on one thread (one call, which releases the GIL),
    so the caller's Python work and the hashing overlap instead of taking turns. Added largest
    first, the views end up shared out about evenly: a QEMU's code hashes as fast as BLAKE3's own
    threads hash one buffer of the same size, and a third faster than BLAKE3's threads taking the
    large views one at a time (measured: 5.1 against 8.8 ms for 20 MiB in 52 views on 2 cores).

    A view larger than a fair share of ``total`` (and 1 MiB; ``total`` 0 means unknown) is the
    exception: it goes through BLAKE3's own threads, on every core. Their time is on no clock of
    this Reader's, so the process's CPU time over that call is charged to
    :attr:`Reader.worker_cpu_s`, less the caller's own: anything else the process ran meanwhile
    is charged too, which errs toward measuring less often. Use it as a context manager: however
    the pass ends, its threads stop.
    """

    def __init__(self, reader: Reader, total: int) -> None:
        self._reader = reader
        self._parallel = reader.algorithm is HashAlgorithm.BLAKE3 and reader.threads > 1
        self._fair = total / reader.threads if total else float("inf")
        self._out: list[str] = []
        self._items: collections.deque[tuple[int, memoryview]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._futures: list[Future[float]] = []

    def __enter__(self) -> FlatPass:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        # The threads wait for more views until the pass is closed: close it however it ends
        # (after an error, dropping what is still queued).
        with self._cond:
            if kind is not None:
                self._items.clear()
            self._closed = True
            self._cond.notify_all()
        wait(self._futures)
        self._futures = []

    def expect(self, total: int) -> None:
        """Say (again) about how many bytes the pass will hash, if the first guess was off."""
        self._fair = total / self._reader.threads if total else float("inf")

    def add(self, view: memoryview) -> int:
        """Queue ``view``; returns its index in :meth:`finish`'s result."""
        index = len(self._out)
        self._out.append("")
        self._reader.bytes_read += len(view)
        if self._parallel and len(view) >= _MULTITHREAD_MIN and len(view) > self._fair:
            with self._reader._charging_blake3_threads():
                self._out[index] = flat_digest(self._reader.algorithm, view)
            return index
        with self._cond:
            self._items.append((index, view))
            self._cond.notify()
        if not self._futures and self._reader.threads > 1:
            self._futures = [self._reader._submit(self._work) for _ in range(self._reader.threads - 1)]
        return index

    def finish(self) -> list[str]:
        """Hash on this thread until the queue is empty, wait for the threads; every digest."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._hash_while(wait_for_more=False)
        futures, self._futures = self._futures, []
        for f in futures:
            self._reader.worker_cpu_s += f.result()
        return self._out

    def _work(self) -> float:
        cpu0 = time.thread_time()
        self._hash_while(wait_for_more=True)
        return time.thread_time() - cpu0

    def _hash_while(self, *, wait_for_more: bool) -> None:
        algorithm = self._reader.algorithm
        while True:
            with self._cond:
                while not self._items and wait_for_more and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                index, view = self._items.popleft()
            self._out[index] = flat_digest(algorithm, view, parallel=False)


class HashBatch:
    """One pass of a Reader: add views (hashed where they lie) and ranges (read from the source),
    then ``finish`` hashes them all and returns every leaf list in the order they were added.

    Nothing is hashed before ``finish``: while the caller runs Python code to decide what to add,
    a hashing thread would wait for the GIL after every leaf, so overlapping the two loses time.
    Use it as a context manager so an error leaves the Reader ready for the next pass.
    """

    def __init__(self, reader: Reader, source: Source) -> None:
        self._reader = reader
        self._source = source
        self._results: list[list[bytes]] = []
        self._ranges: list[tuple[int, int, int]] = []  # (result index, start, length)
        self._flat_only: set[int] = set()  # result indexes of ranges that get no leaves
        self._views_added = False
        self._flat: dict[int, Hasher] = {}  # result index -> the flat hash of a range, fed as it is read

    def __enter__(self) -> HashBatch:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None:
            self._reader._abandon()

    def _slot(self, length: int) -> int:
        self._results.append([b""] * (-(-length // self._reader.leaf_size)))
        return len(self._results) - 1

    def add_view(self, view: memoryview) -> int:
        """Hash ``view`` where it lies; returns its index in ``finish``'s result."""
        leaf = self._reader.leaf_size
        index = self._slot(len(view))
        self._views_added = True
        self._reader._queue_jobs(
            [(view[i : i + leaf], index, i // leaf) for i in range(0, len(view), leaf)], self._results
        )
        self._reader.bytes_read += len(view)
        return index

    def add_range(self, start: int, length: int, *, leaves: bool = True) -> int:
        """Read ``length`` bytes at ``start`` from the source at ``finish``; returns its index.

        Its flat digest is computed in the same pass (:meth:`flat_digest`); without ``leaves``
        only that, and its leaf list in ``finish``'s result stays empty."""
        index = self._slot(length if leaves else 0)
        self._ranges.append((index, start, length))
        self._flat[index] = flat_hasher(self._reader.algorithm, parallel=self._reader.threads > 1)
        if not leaves:
            self._flat_only.add(index)
        return index

    def flat_digest(self, index: int) -> str:
        """After :meth:`finish`: the flat digest of the range added as ``index``."""
        return self._flat[index].hexdigest()

    def finish(self) -> list[list[bytes]]:
        reader = self._reader
        leaf = reader.leaf_size
        batches = plan_batches([length for _, _, length in self._ranges], leaf, reader.read_size)
        # Flat hashes only, no leaves: the one CPU not on a clock of ours is BLAKE3's threads'.
        charge = not self._views_added and len(self._flat_only) == len(self._ranges) and reader.threads > 1
        with reader._charging_blake3_threads() if charge else contextlib.nullcontext():
            self._read_and_queue(batches)
        return self._results

    def _read_and_queue(self, batches: list[list[_Piece]]) -> None:
        reader = self._reader
        leaf = reader.leaf_size
        for k, batch in enumerate(batches):
            if k >= len(reader._buffers):
                reader._finish()  # every leaf queued so far is hashed: the buffer can be reused
            view = memoryview(reader._buffers[k % len(reader._buffers)])
            self._source.read(view, [(self._ranges[r][1] + off, n) for r, off, n in batch])
            jobs: list[_Job] = []
            at = 0
            for r, off, n in batch:
                index = self._ranges[r][0]
                self._flat[index].update(view[at : at + n])  # pieces of a range come in order
                for i in range(0, 0 if index in self._flat_only else n, leaf):
                    jobs.append((view[at + i : at + min(i + leaf, n)], index, (off + i) // leaf))
                at += n
                reader.bytes_read += n
            reader._queue_jobs(jobs, self._results)
        reader._finish()

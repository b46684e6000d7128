"""Measuring a host: hash the code of its hypervisor processes and its files, judge each against
the reference manifest, and say exactly what differs.

Per process, every executable mapping is judged:

- a file-backed mapping must be a segment the manifest knows, with its digest (when it does not
  match, its leaves are hashed and compared to name the range that differs);
- ``[vdso]`` must hash to a digest the manifest accepts for the kernel; ``[vsyscall]`` is an
  execute-only page the kernel emulates and cannot be read, so it is only checked for being where
  and what it always is;
- anonymous executable memory is a mismatch, with one exception: a process that loaded QEMU's
  TCG accelerator may hold one read-write-execute buffer of translated guest code, no larger than
  the manifest allows. Its content is generated at run time and has no reference; see the threat
  model in the README for what that leaves open.

Two signals are combined. The full hash sees any byte that differs from the file, however it got
there. The copy-on-write signal (private pages in ``/proc/PID/pagemap``, read for the code ranges
only) is nearly free and sees a code page that was written even if the bytes were put
back, but it is blind to a change made to the file's shared page cache.

A process that exits while it is measured is no mismatch: it is dropped from this round.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from smig.aim import procfs
from smig.aim.hashing import DEFAULT_THREADS, FlatPass, Reader, root
from smig.aim.procfs import PAGE, MemoryMapping
from smig.aim.reference import Manifest, SegmentRef
from smig.aim.shadow import Shadow
from smig.errors import ProcessGone
from smig.model import Mismatch, TargetDigest, Verdict

VSYSCALL = (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000)
_Identity = tuple[str, int, int, int]  # (device, inode, offset, length) of a file mapping
RETRY_PAUSES_S = (0.01, 0.05)  # between attempts at a live process whose code could not be read


@dataclass(frozen=True)
class Measurement:
    """One round over a host (or one process): the verdict and the evidence behind it."""

    verdict: Verdict
    root: str
    targets: tuple[TargetDigest, ...]
    mismatches: tuple[Mismatch, ...]
    bytes: int
    elapsed_ms: float
    pids: tuple[int, ...]
    gone: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()
    in_place_bytes: int = 0  # of ``bytes``, hashed in the page-cache frames themselves, not copied


@dataclass
class _Round:
    targets: list[TargetDigest] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _runs(indexes: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs of indexes as (first, count)."""
    out: list[tuple[int, int]] = []
    for i in sorted(indexes):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


class Measurer:
    """Measures processes and files against one manifest; keep one per monitor (it caches).

    ``cow_check`` adds the copy-on-write signal; ``share_clean`` lets a round hash a clean
    file-backed mapping (no private pages) once for every process that maps the same inode range,
    since all of them read the same page-cache pages. ``threads`` hash leaves in parallel.
    ``in_place`` hashes a clean code mapping from the monitor's own mapping of the same file when
    the frame numbers prove they are the same physical pages (see ``smig.aim.shadow``).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        cow_check: bool = True,
        share_clean: bool = True,
        threads: int = DEFAULT_THREADS,
        in_place: bool = True,
    ) -> None:
        self.manifest = manifest
        self.cow_check = cow_check
        self.share_clean = share_clean
        self._shadow = Shadow() if in_place else None
        self._wants_pagemap = cow_check or share_clean or in_place
        self._segments: dict[tuple[str, int, int], SegmentRef | None] = {}
        self._maps: dict[int, tuple[str, list[MemoryMapping]]] = {}
        # pid -> what was hashed in place last round, largest first: (start, identity, view)
        self._in_place_last: dict[int, list[tuple[int, _Identity, memoryview]]] = {}
        self._in_place_bytes = 0
        self._reader = Reader(manifest.algorithm, manifest.leaf_size, threads=threads)
        self._file_cache: dict[str, tuple[tuple[int, ...], str]] = {}

    @property
    def worker_cpu_s(self) -> float:
        """CPU time spent so far in the hashing threads (the caller's own time not included)."""
        return self._reader.worker_cpu_s

    def close(self) -> None:
        """Stop the hashing threads and drop the in-place mappings; the Measurer is done."""
        self._reader.close()
        self._in_place_last.clear()  # views into the shadow's mappings, unmapped below
        if self._shadow is not None:
            self._shadow.close()
            self._shadow = None

    # -- processes -------------------------------------------------------------------------

    def measure(self, pids: Iterable[int], *, files: bool = False, file_root: Path = Path("/")) -> Measurement:
        """Measure the processes ``pids`` and, with ``files``, the manifest's files under ``file_root``."""
        t0 = time.perf_counter()
        start_bytes = self._reader.bytes_read
        self._in_place_bytes = 0
        total = _Round()
        measured: list[int] = []
        gone: list[int] = []
        shared: dict[tuple[str, int, int, int], str] = {}
        pids = list(pids)
        self._maps = {pid: self._maps[pid] for pid in pids if pid in self._maps}  # forget processes gone
        self._in_place_last = {pid: self._in_place_last[pid] for pid in pids if pid in self._in_place_last}
        for pid in pids:
            one = self._measure_or_gone(pid, shared)
            if one is None:
                gone.append(pid)
                continue
            measured.append(pid)
            total.targets += one.targets
            total.mismatches += one.mismatches
            total.notes += one.notes
        if files:
            self._files_of_a_live_process(file_root, measured, total)
        return Measurement(
            verdict=Verdict.MISMATCH if total.mismatches else Verdict.MATCH,
            root=root(self.manifest.algorithm, ((t.target, t.digest) for t in total.targets)),
            targets=tuple(total.targets),
            mismatches=tuple(total.mismatches),
            bytes=self._reader.bytes_read - start_bytes,
            elapsed_ms=(time.perf_counter() - t0) * 1000,
            pids=tuple(measured),
            gone=tuple(gone),
            notes=tuple(dict.fromkeys(total.notes)),
            in_place_bytes=self._in_place_bytes,
        )

    def _measure_or_gone(self, pid: int, shared: dict[tuple[str, int, int, int], str]) -> _Round | None:
        """One process's round, or None if it exited meanwhile.

        A process that is still there after its code could not be read unmapped code as it was
        read. That happens by chance (the loader of a process just started, a module unloaded), so
        it is tried again after a pause; failing every time is a way to hide from the monitor, and
        is a mismatch.
        """
        started = procfs.start_time(pid)
        for pause in (*RETRY_PAUSES_S, None):
            one = _Round()
            try:
                self._measure_process(pid, one, shared)
                return one
            except ProcessGone:
                if started is None or procfs.start_time(pid) != started:
                    return None
            if pause is not None:
                time.sleep(pause)
        hidden = Mismatch("[process]", 0, 0, "code could not be read: unmapped each time it was measured", pid)
        return _Round(mismatches=[hidden])

    def _measure_process(self, pid: int, out: _Round, shared: dict[tuple[str, int, int, int], str]) -> None:
        last = self._in_place_last.get(pid, [])
        with self._reader.flat_pass(sum(len(v) for _, _, v in last)) as early:
            # What was hashed in place last round is hashed again at once, before this round
            # has read the process's maps and page tables: those reads take the time the
            # hashing would otherwise wait for. Each early digest counts only for a mapping that
            # is still the same range of the same file and is proved again, this round, to be
            # the same frames (see _start_in_place); the rest is hashed as usual.
            started = {start: (identity, early.add(view)) for start, identity, view in last}
            self._measure_maps(pid, out, shared, early, started)

    def _measure_maps(
        self,
        pid: int,
        out: _Round,
        shared: dict[tuple[str, int, int, int], str],
        flats: FlatPass,
        started: dict[int, tuple[_Identity, int]],
    ) -> None:
        maps = self._code_mappings(pid)
        if not started:
            flats.expect(sum(m.length for m in maps if not m.anonymous and not m.kernel_page))
        # QEMU allocates the TCG buffer before it loads the accelerator module, so a process just
        # starting may hold the buffer without the module: then it must at least not be using KVM.
        tcg_buffers = 1 if procfs.uses_tcg(maps) or not procfs.uses_kvm(pid) else 0
        # Decide what to hash: clean code in place, the rest copied in batches. Every mapping gets
        # its flat digest first; only a module's mapping whose digest differs from the reference's
        # is hashed again, in leaves, to name the range. Then judge, which needs every digest.
        todo: list[tuple[MemoryMapping, str, list[int], int, str]] = []  # (.., leaves' index or -1, digest)
        in_place: list[tuple[MemoryMapping, str, int, memoryview]] = []  # (.., index in flats, view)
        copied: list[tuple[MemoryMapping, str, list[int], int]] = []
        with contextlib.ExitStack() as stack:
            memory = stack.enter_context(procfs.ProcessMemory(pid))
            pagemap = stack.enter_context(procfs.PageMap(pid)) if self._wants_pagemap else None
            batch = stack.enter_context(self._reader.batch(memory))
            clean = self._start_in_place(pid, maps, pagemap, flats, shared, started)
            for m in maps:
                name = m.path or "[anon]"
                target = f"{pid}:{name}@{m.offset:#x}+{m.length:#x}"
                if m.path == "[vsyscall]":
                    if (m.start, m.end) != VSYSCALL or m.perms[0] == "r":
                        out.mismatches.append(Mismatch(name, m.start, m.length, "unexpected [vsyscall] page", pid))
                    continue
                if m.anonymous and not m.kernel_page:
                    if tcg_buffers and m.perms.startswith("rwx") and m.length <= self.manifest.tcg_buffer_max:
                        tcg_buffers -= 1
                        out.notes.append("TCG translated-code buffer present: generated code, not hashed")
                        continue
                    out.mismatches.append(
                        Mismatch("[anon]", m.start, m.length, "anonymous executable memory (address, not offset)", pid)
                    )
                private, known, queued = clean.get(m.start, ([], None, None))
                if known is not None:
                    out.targets.append(TargetDigest(target, known))
                elif queued is not None:
                    in_place.append((m, target, *queued))
                else:
                    copied.append((m, target, private, batch.add_range(m.start, m.length, leaves=False)))
            flat = flats.finish()
            try:
                batch.finish()
                digests: list[tuple[MemoryMapping, str, list[int], str, memoryview | None]] = [
                    (m, t, [], flat[i], view) for m, t, i, view in in_place
                ]
                digests += [(m, t, private, batch.flat_digest(i), None) for m, t, private, i in copied]
                # Leaves only where a module's digest differs (anonymous and kernel pages have no
                # segment): from the same view, or read again.
                again = stack.enter_context(self._reader.batch(memory))
                for m, target, private, digest, view in digests:
                    seg = self._segment(m)
                    index = -1
                    if seg is not None and digest != seg.digest:
                        index = again.add_view(view) if view is not None else again.add_range(m.start, m.length)
                    todo.append((m, target, private, index, digest))
                all_leaves = again.finish()
            except EOFError as e:
                # The process unmapped a range as we read it, or exited: either way not a mismatch.
                raise ProcessGone(pid, f"process {pid} exited or unmapped code while it was measured") from e
        for m, target, private, index, digest in todo:
            out.targets.append(TargetDigest(target, digest))
            if m.anonymous and not m.kernel_page:
                continue  # already a mismatch; its digest is evidence
            if m.kernel_page:
                if digest not in self.manifest.kernel_pages.get(m.path, ()):
                    out.mismatches.append(
                        Mismatch(m.path, 0, m.length, "kernel page differs from the reference kernel's", pid)
                    )
                continue
            ok = self._judge_module(pid, m, digest, all_leaves[index] if index >= 0 else [], out)
            if ok and not private:
                shared[(m.device, m.inode, m.offset, m.length)] = digest
            if self.cow_check:
                for first, count in _runs(private):
                    at, length = m.offset + first * PAGE, count * PAGE
                    out.mismatches.append(Mismatch(m.path, at, length, "code page written (copy-on-write)", pid))

    def _code_mappings(self, pid: int) -> list[MemoryMapping]:
        """The code mappings of ``pid``, parsed again only when the kernel's text of them changed
        (it is read every round, whole: the text is the evidence, the parse a cache of it)."""
        text = procfs.maps_text(pid)
        cached = self._maps.get(pid)
        if cached is not None and cached[0] == text:
            return cached[1]
        maps = procfs.parse_maps(text, executable_only=True)
        self._maps[pid] = (text, maps)
        return maps

    def _start_in_place(
        self,
        pid: int,
        maps: list[MemoryMapping],
        pagemap: procfs.PageMap | None,
        flats: FlatPass,
        shared: dict[tuple[str, int, int, int], str],
        started: dict[int, tuple[_Identity, int]],
    ) -> dict[int, tuple[list[int], str | None, tuple[int, memoryview] | None]]:
        """For each file-backed code mapping, by its start: its private (written) pages, and for a
        clean one either its digest already known this round (``shared``) or its view in our own
        mapping of the file, hashed in ``flats``: queued now, or taken from what was ``started``
        before the page tables were read if that was the same file range. Largest first: the
        hashing threads start on the big mappings while this thread reads the page tables of the
        rest."""
        out: dict[int, tuple[list[int], str | None, tuple[int, memoryview] | None]] = {}
        if pagemap is None:
            return out
        hashed: list[tuple[int, _Identity, memoryview]] = []
        for m in sorted((m for m in maps if not m.anonymous and not m.kernel_page), key=lambda m: -m.length):
            entries = pagemap.entries(m)
            private = procfs.private_pages(entries)
            identity = (m.device, m.inode, m.offset, m.length)
            known = None
            if self.share_clean and not private:
                known = shared.get(identity)
            view = None
            if known is None and self._shadow is not None and not private:
                view = self._shadow.view(pid, m, entries)
            queued = None
            if view is not None:
                self._in_place_bytes += len(view)
                early = started.get(m.start)
                queued = (early[1] if early is not None and early[0] == identity else flats.add(view), view)
                hashed.append((m.start, identity, view))
            out[m.start] = (private, known, queued)
        self._in_place_last[pid] = hashed
        return out

    def _segment(self, m: MemoryMapping) -> SegmentRef | None:
        """The reference segment ``m`` maps, if the manifest knows its module and it fits exactly
        (looked up once per (path, offset, length): the manifest does not change)."""
        key = (m.path, m.offset, m.length)
        if key not in self._segments:
            if len(self._segments) >= 4096:  # a subject inventing mappings must not grow it forever
                self._segments.clear()
            module = self.manifest.modules.get(m.path)
            seg = module.segment_at(m.offset) if module is not None else None
            self._segments[key] = seg if seg is not None and seg.length == m.length else None
        return self._segments[key]

    def _judge_module(self, pid: int, m: MemoryMapping, digest: str, leaves: list[bytes], out: _Round) -> bool:
        if m.path not in self.manifest.modules:
            out.mismatches.append(Mismatch(m.path, m.offset, m.length, "module not in the reference manifest", pid))
            return False
        seg = self._segment(m)
        if seg is None:
            out.mismatches.append(
                Mismatch(m.path, m.offset, m.length, "mapping does not match any reference segment", pid)
            )
            return False
        if digest == seg.digest:
            return True
        differ = [i for i, (a, b) in enumerate(zip(leaves, seg.leaves, strict=True)) if a.hex() != b]
        leaf = self.manifest.leaf_size
        for first, count in _runs(differ):
            length = min(count * leaf, m.length - first * leaf)
            out.mismatches.append(
                Mismatch(m.path, m.offset + first * leaf, length, "code differs from the reference", pid)
            )
        if not differ:
            reason = (
                "code differed from the reference when hashed whole, not when hashed again by leaves "
                "(a change undone meanwhile, or a manifest whose leaves disagree with its digest)"
            )
            out.mismatches.append(Mismatch(m.path, m.offset, m.length, reason, pid))
        return False

    # -- files on disk ---------------------------------------------------------------------

    def _files_of_a_live_process(self, file_root: Path, measured: list[int], out: _Round) -> None:
        """The files as the subject's processes see them (``/proc/PID/root``). A process that exits
        takes its view with it, and every file would look missing: then the files are measured
        again through another process measured in this round. Never through the monitor's own
        root instead: that is not what the subject sees. With no view left, the round says so."""
        roots = [file_root]
        if file_root.parent.parent == Path("/proc") and file_root.name == "root":
            roots += [Path(f"/proc/{pid}/root") for pid in measured if str(pid) != file_root.parent.name]
        for candidate in roots:
            attempt = _Round()
            if self._measure_files(candidate, attempt):
                out.targets += attempt.targets
                out.mismatches += attempt.mismatches
                return
        out.notes.append("files not measured this round: every process they were seen through exited")

    def _measure_files(self, file_root: Path, out: _Round) -> bool:
        """False if ``file_root`` itself vanished while it was read (its process exited)."""
        for path, expected in sorted(self.manifest.files.items()):
            full = file_root / path.lstrip("/")
            try:
                digest = self._file_digest(full)
            except FileNotFoundError:
                if not file_root.exists():
                    return False
                out.mismatches.append(Mismatch(path, 0, 0, "file is missing"))
                continue
            except OSError as e:
                out.mismatches.append(Mismatch(path, 0, 0, f"file cannot be read: {e.strerror or e}"))
                continue
            out.targets.append(TargetDigest(f"file:{path}", digest))
            if digest != expected:
                out.mismatches.append(
                    Mismatch(path, 0, os.stat(full).st_size, "file on disk differs from the reference")
                )
        return True

    def _file_digest(self, path: Path) -> str:
        # Rehash only when the file's identity or times change: the ctime cannot be set back
        # without changing the clock, so an edit in place cannot hide from this cache. A stat
        # answers an unchanged file without opening it (every file, every round, every subject).
        cached = self._file_cache.get(str(path))
        if cached is not None and cached[0] == _file_key(os.stat(path)):
            return cached[1]
        with open(path, "rb", buffering=0) as f:
            key = _file_key(os.fstat(f.fileno()))  # the digest is of the file opened, whatever the path names now
            digest = self._reader.file_digest(f.fileno())
        self._file_cache[str(path)] = (key, digest)
        return digest


def _file_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

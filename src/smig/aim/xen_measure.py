"""Measuring a nested Xen host's hypervisor from outside it (AIM for Xen).

One round: read a vCPU's CR3 from the outer QEMU's monitor, translate Xen's ``.text`` through
the page tables in the host's RAM, read it from the outer QEMU's memory, and judge it against
``xen-syms`` (:mod:`smig.aim.xen_judge`). Nothing the host says enters the verdict: the
registers are the emulator's, the bytes are read from its memory, the reference is a file of
the Xen package.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from smig.aim.hashing import root
from smig.aim.measure import Measurement
from smig.aim.monitor import Subject
from smig.aim.reference import Manifest
from smig.aim.reference import build as build_manifest
from smig.aim.xen_dom0 import Dom0Reference, ToolstackReading, measure_toolstack
from smig.aim.xen_judge import TEXT_TARGET, judge_text
from smig.aim.xen_memory import OuterQemu, PhysicalReader, XenMemoryError, find_ram, parse_cr3
from smig.aim.xen_syms import XenSyms
from smig.aim.xen_syms import load as load_syms
from smig.errors import ManifestError, QMPError
from smig.hypervisor import qmp
from smig.model import HashAlgorithm, Mismatch, TargetDigest, Verdict

TRANSLATE_ATTEMPTS = 5
RETRY_S = 0.05
DOM0_MISSES = 5  # rounds in a row dom0 may go unread before that is itself a mismatch
DOM0_TARGET = "dom0:toolstack"
REQUIRED_TOOL = "xenstored"  # no Xen host manages guests without it


@dataclass(frozen=True)
class XenMeasurement:
    verdict: Verdict
    targets: tuple[TargetDigest, ...]
    mismatches: tuple[Mismatch, ...]
    bytes: int
    elapsed_ms: float
    text_phys: int  # where Xen's code was found, guest-physical


async def read_cr3(qmp_socket: Path) -> int:
    """A vCPU's CR3, from the outer QEMU's monitor. Raises XenMemoryError."""
    try:
        async with qmp.session(qmp_socket, timeout_s=5) as s:
            text = await s.execute("human-monitor-command", **{"command-line": "info registers"})
    except QMPError as e:
        raise XenMemoryError(f"cannot read the nested host's registers: {e}") from e
    return parse_cr3(str(text))


async def measure_xen(
    pid: int,
    memory_mib: int,
    qmp_socket: Path,
    syms: XenSyms,
    cache: XenMeasurer | None = None,
    dom0: Dom0Reference | None = None,
) -> XenMeasurement:
    """Measure the Xen of the nested host whose outer QEMU is ``pid``, and with ``dom0`` its
    toolstack's code too (:mod:`smig.aim.xen_dom0`).

    A host whose code cannot be read or translated, ``TRANSLATE_ATTEMPTS`` times in a row, is a
    mismatch, not an error: hiding from the monitor must not look like a pass. (One failed walk is
    not: the page tables a CR3 named may be freed before they are walked.) The same holds for
    dom0 over ``DOM0_MISSES`` rounds, since dom0 runs only now and then. Raises XenMemoryError
    only when the outer QEMU itself is gone (the host is down, which the caller judges by other
    means).
    """
    t0 = time.perf_counter()
    ram = find_ram(pid, memory_mib)
    text = syms.text
    failure: XenMemoryError | None = None
    with PhysicalReader(ram) as reader:
        # The CR3 read is of one instant; the walk comes after it. A dom0 process that exits in
        # between frees the page tables CR3 named, and the walk then reads whatever reuses them.
        # So a walk counts only if a second CR3, read after it, finds the code at the same place.
        for _ in range(TRANSLATE_ATTEMPTS):
            try:
                cr3 = await read_cr3(qmp_socket)
                phys = reader.translate(cr3, text.addr)
                now = reader.read_virtual(cr3, text.addr, text.size)
                if reader.translate(await read_cr3(qmp_socket), text.addr) == phys:
                    failure = None
                    break
                failure = XenMemoryError("its address translated to two places in two readings")
            except XenMemoryError as e:
                failure = e
            await asyncio.sleep(RETRY_S)
        if failure is not None:
            hidden = Mismatch(TEXT_TARGET, 0, text.size, f"Xen's code cannot be read at its address: {failure}")
            elapsed = (time.perf_counter() - t0) * 1000
            return XenMeasurement(Verdict.MISMATCH, (), (hidden,), 0, elapsed, -1)
        toolstack = await _toolstack(reader, dom0, qmp_socket, cache) if dom0 is not None else ToolstackReading((), ())
    digest = TargetDigest(f"xen:{syms.build_id}:.text@{text.addr:#x}+{text.size:#x}", blake3.blake3(now).hexdigest())
    known = cache.judged(digest.digest) if cache is not None else None
    mismatches = known if known is not None else tuple(judge_text(syms, now))
    if cache is not None:
        cache.remember(digest.digest, mismatches)
    mismatches += toolstack.mismatches
    tools = tuple(TargetDigest(target, blake3.blake3(code).hexdigest()) for target, code in toolstack.targets)
    return XenMeasurement(
        verdict=Verdict.MISMATCH if mismatches else Verdict.MATCH,
        targets=(digest, *tools),
        mismatches=mismatches,
        bytes=len(now) + sum(len(code) for _t, code in toolstack.targets),
        elapsed_ms=(time.perf_counter() - t0) * 1000,
        text_phys=phys,
    )


async def _toolstack(
    reader: PhysicalReader, dom0: Dom0Reference, qmp_socket: Path, cache: XenMeasurer | None
) -> ToolstackReading:
    """dom0's toolstack this round; unread rounds are counted in ``cache`` (without one, a single
    unread round is a mismatch)."""
    try:
        hint = cache.dom0_cr3 if cache is not None else None
        found = await measure_toolstack(reader, dom0, lambda: read_cr3(qmp_socket), hint)
    except XenMemoryError as e:
        misses = cache.dom0_missed() if cache is not None else DOM0_MISSES
        if misses < DOM0_MISSES:
            return ToolstackReading((), ())
        return ToolstackReading((), (Mismatch(DOM0_TARGET, 0, 0, f"dom0's processes cannot be read: {e}"),))
    if cache is not None:
        cache.dom0_read(found.cr3)
    required = [t.path for t in dom0.tools if Path(t.path).name == REQUIRED_TOOL]
    if required and required[0] not in found.running:
        gone = Mismatch(DOM0_TARGET, 0, 0, f"no {REQUIRED_TOOL} runs from its package's file in dom0")
        return ToolstackReading(found.targets, (*found.mismatches, gone))
    return found


class XenMeasurer:
    """Measures one nested Xen host round after round, for a monitor's loop.

    Judging takes most of a round, and Xen's code does not change between healthy rounds: when
    the bytes read hash to the digest of the last round, its verdict stands (the bytes are still
    read and hashed every round, so any change is judged at once).
    """

    def __init__(self, outer: OuterQemu, syms: XenSyms, dom0: Dom0Reference | None = None) -> None:
        self.outer = outer
        self.syms = syms
        self.dom0 = dom0
        self._last: tuple[str, tuple[Mismatch, ...]] | None = None
        self._dom0_misses = 0
        self.dom0_cr3: int | None = None  # the dom0 page table the last round read through

    def measure(self) -> Measurement:
        """One round as a :class:`Measurement`, so it is reported, signed and verified as any other.

        Blocking: it runs its own event loop for the monitor read (call it from a worker thread)."""
        m = asyncio.run(
            measure_xen(self.outer.pid, self.outer.memory_mib, self.outer.qmp_socket, self.syms, self, self.dom0)
        )
        return Measurement(
            verdict=m.verdict,
            root=root(HashAlgorithm.BLAKE3, ((t.target, t.digest) for t in m.targets)),
            targets=m.targets,
            mismatches=m.mismatches,
            bytes=m.bytes,
            elapsed_ms=m.elapsed_ms,
            pids=(self.outer.pid,),
        )

    def judged(self, digest: str) -> tuple[Mismatch, ...] | None:
        return self._last[1] if self._last is not None and self._last[0] == digest else None

    def remember(self, digest: str, mismatches: tuple[Mismatch, ...]) -> None:
        self._last = (digest, mismatches)

    def dom0_missed(self) -> int:
        """Counts a round that could not read dom0; returns how many in a row."""
        self._dom0_misses += 1
        return self._dom0_misses

    def dom0_read(self, cr3: int | None) -> None:
        self._dom0_misses = 0
        self.dom0_cr3 = cr3


def xen_subject(subject_id: str, outer_pid: int, syms: XenSyms, dom0: Dom0Reference | None = None) -> Subject:
    """A monitor's subject that is a nested Xen host, measured from its outer QEMU.

    Raises XenMemoryError: ``outer_pid`` is not a nested host's outer QEMU."""
    measurer = XenMeasurer(OuterQemu.of(outer_pid), syms, dom0)
    return Subject(subject_id, find_pids=lambda: [outer_pid], files=False, measure=measurer.measure)


def approved_xen_syms(manifest: Manifest, path: Path) -> XenSyms:
    """``xen-syms`` at ``path``, only if the approved manifest lists that very file: a monitor
    judges a Xen host only against the reference the RC-TCB approved for it.

    Raises ManifestError: the manifest does not list it, its bytes differ, or it does not parse."""
    return load_syms(approved(manifest, path))


def approved_dom0(manifest: Manifest, kernel: Path, tools: Iterable[tuple[str, Path]]) -> Dom0Reference:
    """dom0's reference, only from files the approved manifest lists. Raises ManifestError."""
    return Dom0Reference.load(approved(manifest, kernel), [(path, approved(manifest, local)) for path, local in tools])


def approved(manifest: Manifest, path: Path) -> Path:
    """``path`` resolved, if the approved manifest lists that very file with these bytes.

    Raises ManifestError: it does not."""
    resolved = path.resolve()
    want = manifest.files.get(str(resolved))
    if want is None:
        raise ManifestError(f"the approved reference manifest does not list {resolved}: build it with that file")
    have = build_manifest([resolved], algorithm=manifest.algorithm, leaf_size=manifest.leaf_size).files[str(resolved)]
    if have != want:
        raise ManifestError(f"{resolved} is not the file the approved reference manifest lists (its digest differs)")
    return resolved


def xen_subject_found(
    subject_id: str, find_pids: Callable[[], list[int]], syms: XenSyms, dom0: Dom0Reference | None = None
) -> Subject:
    """A nested Xen host as a monitor's subject, its outer QEMU found again each round (the host
    may be restarted, or be fenced). A round that finds none, or cannot read it, raises
    XenMemoryError: no report is better than a verdict on nothing."""
    measurers: dict[int, XenMeasurer] = {}

    def find() -> list[int]:
        return [pid for pid in find_pids() if _is_outer(pid)]

    def measure() -> Measurement:
        pids = find()
        if len(pids) != 1:
            raise XenMemoryError(f"{subject_id} has {len(pids)} outer QEMU processes, not one: nothing to measure")
        if pids[0] not in measurers:
            measurers.clear()
            measurers[pids[0]] = XenMeasurer(OuterQemu.of(pids[0]), syms, dom0)
        return measurers[pids[0]].measure()

    return Subject(subject_id, find_pids=find, files=False, measure=measure)


def _is_outer(pid: int) -> bool:
    try:
        OuterQemu.of(pid)
    except XenMemoryError:
        return False
    return True

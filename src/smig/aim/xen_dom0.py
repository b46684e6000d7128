"""Measuring dom0's toolstack (``xl``, ``xenstored``, ...) from outside the nested Xen host.

dom0 is a PV guest: its page tables hold machine addresses, which are the outer QEMU's
guest-physical addresses, so the monitor walks them with the same reader it walks Xen's by. It
finds dom0's processes the way the kernel itself does, from ``init_task`` along the task list,
with the symbol and the field offsets read from the dom0 kernel's package file
(:mod:`smig.aim.linux_image`), and for each toolstack process reads the main executable's code,
``mm->start_code`` to ``mm->end_code``, through that process's own page table. Every page of it
that is in memory must equal the file's bytes (position-independent code is not relocated in
place); a page not yet faulted in is not there to be run.

A CR3 read from the outer QEMU names whatever ran last: Xen's idle tables, a guest's, or dom0's.
Only a dom0 kernel table maps dom0's kernel, and a dom0 table is recognised by its kernel's
export table reading back byte for byte as in the file (a guest's kernel, even one mapped at the
same address, is another build). On 64-bit PV the kernel's table of a process maps its user
half too, so ``mm->pgd`` walks user addresses.

What this does not cover: the toolstack's shared libraries (``libxenctrl``, ``libxenstore``...),
which would take walking each process's VMA tree; a tool run from a file of another name.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from smig.aim.linux_image import KernelLayout
from smig.aim.linux_image import layout as kernel_layout
from smig.aim.xen_memory import PAGE, PhysicalReader, XenMemoryError
from smig.errors import ManifestError
from smig.model import Mismatch

MAX_TASKS = 32768  # a task list longer than this is a loop, not dom0's processes
CR3_ATTEMPTS = 40
CR3_RETRY_S = 0.02
NAME_MAX = 64  # of an executable's file name read; the tools' names are far shorter
CONFIRM_S = 0.2
_ELF_HEAD = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD, _PF_X = 1, 1


@dataclass(frozen=True)
class Tool:
    """A toolstack program as its package installed it: the reference for its code."""

    path: str  # where dom0 runs it from, as the report names it
    vaddr: int  # its executable segment's link address, file offset and size
    offset: int
    size: int
    data: bytes  # the file

    @classmethod
    def load(cls, local: Path, dom0_path: str) -> Tool:
        """Raises ManifestError: not an ELF64 file with one executable segment."""
        try:
            data = local.read_bytes()
        except OSError as e:
            raise ManifestError(f"cannot read {local}: {e.strerror or e}") from e
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ManifestError(f"{local} is not a 64-bit ELF file")
        *_, phoff, _sh, _fl, _eh, phentsize, phnum, _a, _b, _c = _ELF_HEAD.unpack_from(data)
        code = [
            (vaddr, offset, filesz)
            for p_type, flags, offset, vaddr, _pa, filesz, _mem, _al in (
                _PHDR.unpack_from(data, phoff + i * phentsize) for i in range(phnum)
            )
            if p_type == _PT_LOAD and flags & _PF_X
        ]
        if len(code) != 1:
            raise ManifestError(f"{local} has {len(code)} executable segments, not one")
        vaddr, offset, size = code[0]
        return cls(dom0_path, vaddr, offset, size, data)


@dataclass(frozen=True)
class Dom0Reference:
    """What dom0's toolstack is judged against: its kernel's layout and the tools' files."""

    kernel: KernelLayout
    tools: tuple[Tool, ...]

    @classmethod
    def load(cls, kernel: Path, tools: Iterable[tuple[str, Path]]) -> Dom0Reference:
        """``kernel``: dom0's vmlinuz; ``tools``: (path in dom0, local copy) of each tool, as the
        image (``XenHostImage.dom0_tools``) and a monitor's configuration name them.

        Raises ManifestError: a file is missing or not what it should be."""
        return cls(kernel_layout(kernel), tuple(Tool.load(local, path) for path, local in tools))


@dataclass(frozen=True)
class Dom0Process:
    pid: int
    exe: str  # the name of the file it exec'd
    pgd: int  # guest-physical address of its page table's top level
    start_code: int
    end_code: int


async def dom0_cr3(
    reader: PhysicalReader, k: KernelLayout, read_cr3: Callable[[], Awaitable[int]], hint: int | None = None
) -> int:
    """A CR3 that is one of dom0's kernel page tables: ``hint`` (the last one found) if it still
    is one, else the first the vCPU shows. Raises XenMemoryError: none seen.

    Any dom0 process's kernel table maps the kernel, so one found stays good while it holds the
    kernel's bytes; a freed one reused for anything else fails the same check."""
    if hint is not None:
        with contextlib.suppress(XenMemoryError):
            if reader.read_virtual(hint, k.probe_addr, len(k.probe)) == k.probe:
                return hint
    for _ in range(CR3_ATTEMPTS):
        cr3 = await read_cr3()
        try:
            if reader.read_virtual(cr3, k.probe_addr, len(k.probe)) == k.probe:
                return cr3
        except XenMemoryError:
            pass
        await asyncio.sleep(CR3_RETRY_S)
    raise XenMemoryError(f"no dom0 kernel page table in {CR3_ATTEMPTS} readings of the vCPU's CR3")


def processes(reader: PhysicalReader, cr3: int, k: KernelLayout) -> list[Dom0Process]:
    """dom0's user processes, along the kernel's task list. Raises XenMemoryError: the list
    does not read or does not close."""

    def u64(va: int) -> int:
        return int(struct.unpack("<Q", reader.read_virtual(cr3, va, 8))[0])

    head = k.init_task + k.task_tasks
    out: list[Dom0Process] = []
    at = u64(head)
    for _ in range(MAX_TASKS):
        if at == head:
            return out
        task = at - k.task_tasks
        mm = u64(task + k.task_mm)
        exe_file = u64(mm + k.mm_exe_file) if mm else 0
        if exe_file:  # kernel threads have no mm; a process mid-exec, no file yet
            name_at = u64(u64(exe_file + k.file_dentry) + k.dentry_name)
            exe = reader.read_virtual(cr3, name_at, NAME_MAX).split(b"\0")[0].decode(errors="replace")
            pid = int(struct.unpack("<i", reader.read_virtual(cr3, task + k.task_pid, 4))[0])
            start, end = u64(mm + k.mm_start_code), u64(mm + k.mm_end_code)
            if start or end:  # both 0: exec has named the file but not mapped its code yet
                pgd = reader.translate(cr3, u64(mm + k.mm_pgd))
                out.append(Dom0Process(pid, exe, pgd, start, end))
        at = u64(at)
    raise XenMemoryError(f"dom0's task list does not close within {MAX_TASKS} tasks")


def judge_process(reader: PhysicalReader, proc: Dom0Process, tool: Tool) -> tuple[bytes, list[Mismatch]]:
    """(the code read, mismatches) for one process against its tool's file."""
    if proc.end_code - proc.start_code != tool.size:
        reason = f"its code is {proc.end_code - proc.start_code:#x} bytes, the file's {tool.size:#x}"
        return b"", [Mismatch(f"dom0:{tool.path}", tool.offset, tool.size, reason, pid=proc.pid)]
    bias = proc.start_code - tool.vaddr
    read, bad = bytearray(), []
    va = proc.start_code
    while va < proc.end_code:
        end = min((va // PAGE + 1) * PAGE, proc.end_code)
        try:
            phys = reader.translate(proc.pgd, va)
        except XenMemoryError:
            va = end  # not faulted in: nothing there to run
            continue
        now = reader.read(phys, end - va)
        file_at = tool.offset + va - bias - tool.vaddr
        want = tool.data[file_at : file_at + len(now)]
        read += now
        if now != want:
            differ = [i for i in range(len(now)) if now[i] != want[i]]
            bad.append(
                Mismatch(
                    f"dom0:{tool.path}",
                    file_at + differ[0],
                    differ[-1] - differ[0] + 1,
                    f"{Path(tool.path).name} (pid {proc.pid}) runs code that differs from the package's file",
                    pid=proc.pid,
                )
            )
        va = end
    return bytes(read), bad


@dataclass(frozen=True)
class ToolstackReading:
    targets: tuple[tuple[str, bytes], ...]  # (target, the code read) per toolstack process
    mismatches: tuple[Mismatch, ...]
    running: frozenset[str] = frozenset()  # the tools (paths in dom0) found running
    cr3: int | None = None  # the dom0 page table it was read through


def read_toolstack(reader: PhysicalReader, cr3: int, ref: Dom0Reference) -> ToolstackReading:
    """One pass over dom0's toolstack processes. Raises XenMemoryError: the task list cannot be read."""
    by_name = {Path(t.path).name: t for t in ref.tools}
    targets, bad, running = [], [], set()
    for proc in processes(reader, cr3, ref.kernel):
        tool = by_name.get(proc.exe)
        if tool is None:
            continue
        code, found = judge_process(reader, proc, tool)
        running.add(tool.path)
        size = proc.end_code - proc.start_code
        targets.append((f"dom0:{tool.path}[{proc.pid}]@{proc.start_code:#x}+{size:#x}", code))
        bad += found
    return ToolstackReading(tuple(targets), tuple(bad), frozenset(running), cr3)


async def measure_toolstack(
    reader: PhysicalReader, ref: Dom0Reference, read_cr3: Callable[[], Awaitable[int]], hint: int | None = None
) -> ToolstackReading:
    """dom0's toolstack, judged; a mismatch counts only if a second pass finds the very same one.
    A process exits or execs at any time, and the pages a first pass walked may by then belong to
    something else: only what holds still is reported. ``hint``: see :func:`dom0_cr3`.

    Raises XenMemoryError: no dom0 page table seen, or its task list does not read."""
    first = read_toolstack(reader, await dom0_cr3(reader, ref.kernel, read_cr3, hint), ref)
    if not first.mismatches:
        return first
    await asyncio.sleep(CONFIRM_S)
    second = read_toolstack(reader, await dom0_cr3(reader, ref.kernel, read_cr3, first.cr3), ref)
    confirmed = tuple(m for m in first.mismatches if m in second.mismatches)
    return ToolstackReading(second.targets, confirmed, second.running, second.cr3)

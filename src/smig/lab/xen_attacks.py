"""The attacks on a nested Xen host, from outside it: flip bytes of Xen's code in the outer QEMU's
memory, at a named function of Xen's, where the CPU executes them (``xen-code``); or of a dom0
toolstack process's code, ``xenstored`` by default (``xen-toolstack``).

The target is translated exactly as a monitor translates it (CR3 from the outer QEMU's monitor,
the page tables in the host's RAM), so the attack hits the live code, not a stale copy. The
record keeps the guest-physical address and the original bytes, so undoing needs no walk.
By default the patch lands inside ``do_kexec_op`` (at +0x8), a hypercall a lab host never makes, so the
patched Xen keeps running.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from smig.aim import xen_syms
from smig.aim.xen_dom0 import Dom0Reference, Tool, dom0_cr3, processes
from smig.aim.xen_judge import TEXT_TARGET
from smig.aim.xen_measure import read_cr3
from smig.aim.xen_memory import PAGE, OuterQemu, PhysicalReader, XenMemoryError, find_ram
from smig.errors import AttackError, SmigError
from smig.lab.attacks import AttackRecord, _start_time, _write

KIND = "xen-code"
TOOLSTACK_KIND = "xen-toolstack"
KINDS = (KIND, TOOLSTACK_KIND)
DEFAULT_TOOL = "xenstored"
DEFAULT_FUNCTION = "do_kexec_op"
DEFAULT_OFFSET = 0x8


async def xen_code(
    pid: int, syms_path: Path, *, function: str = DEFAULT_FUNCTION, offset: int = DEFAULT_OFFSET, length: int = 1
) -> AttackRecord:
    """Flip ``length`` bytes of Xen's code at ``function+offset`` in the nested host whose outer
    QEMU is ``pid``.

    Raises AttackError: not a nested Xen host's QEMU, no such function, or the write failed.
    """
    try:
        outer = OuterQemu.of(pid)
    except XenMemoryError as e:
        raise AttackError(str(e)) from e
    try:
        syms = xen_syms.load(syms_path)
    except Exception as e:
        raise AttackError(f"cannot read Xen's symbols {syms_path}: {e}") from e
    starts = {name: (addr, size) for addr, size, name in syms.functions}
    if function not in starts:
        raise AttackError(f"Xen has no function {function!r}")
    addr, size = starts[function]
    if not 0 <= offset <= size - length:
        raise AttackError(f"offset {offset:#x} is outside {function} ({size:#x} bytes)")
    va = addr + offset
    try:
        ram = find_ram(pid, outer.memory_mib)
        cr3 = await read_cr3(outer.qmp_socket)
        with PhysicalReader(ram) as reader:
            phys = reader.translate(cr3, va)
            original = reader.read(phys, length)
            where = f"{function}+{offset:#x}"
            return _flip(KIND, pid, ram.start + phys, original, TEXT_TARGET, va - syms.text.addr, where)
    except XenMemoryError as e:
        raise AttackError(str(e)) from e


async def toolstack_code(
    pid: int, ref: Dom0Reference, *, tool: str = DEFAULT_TOOL, offset: int | None = None
) -> AttackRecord:
    """Flip one byte of the code of dom0's ``tool`` process (the first one running) in the nested
    host whose outer QEMU is ``pid``. ``offset`` is into the tool's executable segment; by default
    its last byte, the ``ret`` of ``_fini``, which only an exiting process runs, so the patched
    tool keeps working. The page must be in memory (a page never run is not there to patch).

    Raises AttackError: not a nested Xen host's QEMU, no such tool running, or the write failed.
    """
    known = {Path(t.path).name: t for t in ref.tools}
    if tool not in known:
        raise AttackError(f"no reference for {tool!r}; the toolstack measured is {', '.join(sorted(known))}")
    target: Tool = known[tool]
    at = target.size - 1 if offset is None else offset
    if not 0 <= at < target.size:
        raise AttackError(f"offset {at:#x} is outside {tool}'s code ({target.size:#x} bytes)")
    try:
        outer = OuterQemu.of(pid)
        ram = find_ram(pid, outer.memory_mib)
        with PhysicalReader(ram) as reader:
            cr3 = await dom0_cr3(reader, ref.kernel, lambda: read_cr3(outer.qmp_socket))
            running = [p for p in processes(reader, cr3, ref.kernel) if p.exe == tool]
            if not running:
                raise AttackError(f"no {tool} process runs in that host's dom0")
            proc = running[0]
            va = proc.start_code + at
            try:
                phys = reader.translate(proc.pgd, va)
            except XenMemoryError as e:
                raise AttackError(f"{tool}'s code at {at:#x} is not in memory (page {va // PAGE * PAGE:#x})") from e
            original = reader.read(phys, 1)
            where = f"{tool} (pid {proc.pid} in dom0)+{at:#x}"
            path = f"dom0:{target.path}"
            return _flip(TOOLSTACK_KIND, pid, ram.start + phys, original, path, target.offset + at, where)
    except SmigError as e:
        if isinstance(e, AttackError):
            raise
        raise AttackError(str(e)) from e


def _flip(kind: str, pid: int, address: int, original: bytes, path: str, offset: int, where: str) -> AttackRecord:
    """Write ``original`` inverted at ``address`` in QEMU ``pid``'s memory; the record undoes it."""
    _write(pid, address, bytes(b ^ 0xFF for b in original))
    return AttackRecord(
        id=f"{kind}-{secrets.token_hex(4)}",
        kind=kind,
        pid=pid,
        path=path,
        offset=offset,
        length=len(original),
        applied_at=time.time(),
        detail={"function": where, "address": address, "original": original.hex(), "start_time": _start_time(pid)},
    )


def undo(record: AttackRecord) -> str:
    """Put Xen's original bytes back (nothing to do if the nested host has stopped since)."""
    try:
        same = _start_time(record.pid) == int(record.detail["start_time"])
    except AttackError:
        same = False
    if not same:
        return f"the nested host's QEMU {record.pid} is gone; nothing to undo"
    _write(record.pid, int(record.detail["address"]), bytes.fromhex(record.detail["original"]))
    what = "Xen's code" if record.kind == KIND else "dom0 toolstack code"
    return f"restored {record.length} byte(s) of {what} at {record.detail['function']} in QEMU {record.pid}"

"""Reading a nested Xen host's memory from outside: its outer QEMU's guest RAM, and the virtual
addresses Xen runs at, translated through the vCPU's own page tables.

The monitor does not ask the host where Xen is. It reads a vCPU's CR3 from the outer QEMU's
monitor (the emulated CPU's register, not anything the host says) and walks the 4-level page
tables in the host's RAM the way the CPU does, so what it hashes is what the CPU executes at
Xen's addresses, wherever Xen relocated itself at boot and however many stale copies of Xen's
image lie elsewhere in RAM.

RAM is the outer QEMU's one anonymous mapping of the host's size; with less than 2 GiB, q35
puts all of it below the PCI hole, so guest-physical address = offset in that mapping.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from smig.aim import procfs
from smig.errors import SmigError

PAGE = 4096
_ADDR = 0x000F_FFFF_FFFF_F000
_PRESENT, _LARGE = 0x1, 0x80
_CR3_RE = re.compile(r"\bCR3=([0-9a-fA-F]+)")
LOW_RAM_LIMIT = 2 << 30  # q35 keeps RAM below this contiguous from address 0
OUTER_QEMU_PREFIX = "smig-xen-"  # the -name of every nested host's outer QEMU SMIG starts


class XenMemoryError(SmigError):
    """The nested host's memory cannot be read, or Xen's addresses do not translate."""


@dataclass(frozen=True)
class GuestRam:
    """The outer QEMU's mapping of the nested host's RAM."""

    pid: int
    start: int  # its address in the outer QEMU process
    size: int


@dataclass(frozen=True)
class OuterQemu:
    """What a monitor needs of a nested host's outer QEMU, read from its command line (SMIG
    started it; the nested host has no say in it)."""

    pid: int
    memory_mib: int
    qmp_socket: Path

    @classmethod
    def of(cls, pid: int) -> OuterQemu:
        """Raises XenMemoryError: not the outer QEMU of a nested Xen host."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError as e:
            raise XenMemoryError(f"no process with PID {pid}") from e
        args = dict(itertools.pairwise(argv))
        name, memory, qmp_arg = args.get("-name", ""), args.get("-m", ""), args.get("-qmp", "")
        if not name.startswith(OUTER_QEMU_PREFIX) or not memory.isdigit() or not qmp_arg.startswith("unix:"):
            raise XenMemoryError(f"process {pid} is not the outer QEMU of a nested Xen host SMIG started")
        return cls(pid, int(memory), Path(qmp_arg.removeprefix("unix:").split(",")[0]))


def find_ram(pid: int, memory_mib: int) -> GuestRam:
    """The anonymous read-write mapping of exactly the host's RAM size in the outer QEMU.

    Raises XenMemoryError: none, or several (then which one is RAM is ambiguous)."""
    size = memory_mib << 20
    if size > LOW_RAM_LIMIT:
        raise XenMemoryError(f"hosts of {memory_mib} MiB are not supported: RAM above 2 GiB is split by q35")
    try:
        maps = procfs.read_maps(pid)
    except OSError as e:
        raise XenMemoryError(f"cannot read the outer QEMU's maps (pid {pid}): {e}") from e
    found = [m for m in maps if m.length == size and m.anonymous and m.perms.startswith("rw")]
    if len(found) != 1:
        raise XenMemoryError(f"found {len(found)} mappings of {memory_mib} MiB in the outer QEMU (pid {pid}), not one")
    return GuestRam(pid, found[0].start, size)


def parse_cr3(info_registers: str) -> int:
    """CR3 from HMP ``info registers``. Raises XenMemoryError: none in the text."""
    found = _CR3_RE.search(info_registers)
    if found is None:
        raise XenMemoryError("the outer QEMU's registers show no CR3")
    return int(found.group(1), 16)


class PhysicalReader:
    """Reads the nested host's guest-physical memory through ``/proc/PID/mem`` of the outer QEMU."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        try:
            self._f = open(f"/proc/{ram.pid}/mem", "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise XenMemoryError(f"cannot open the outer QEMU's memory (pid {ram.pid}): {e}") from e

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> PhysicalReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def read(self, phys: int, length: int) -> bytes:
        if phys < 0 or phys + length > self.ram.size:
            raise XenMemoryError(f"guest-physical {phys:#x}+{length:#x} is outside the host's RAM")
        data = os.pread(self._f.fileno(), length, self.ram.start + phys)
        if len(data) != length:
            raise XenMemoryError(f"short read of guest-physical {phys:#x}")
        return data

    def u64(self, phys: int) -> int:
        return int(struct.unpack("<Q", self.read(phys, 8))[0])

    def translate(self, cr3: int, va: int) -> int:
        """The guest-physical address the CPU reaches at ``va`` (4-level paging, large pages)."""
        return self._walk(cr3, va)[0]

    def _walk(self, cr3: int, va: int) -> tuple[int, int]:
        """(guest-physical address of ``va``, bytes left in its page: 4 KiB, 2 MiB or 1 GiB)."""
        table = cr3 & _ADDR
        for level, shift in enumerate((39, 30, 21, 12)):
            entry = self.u64(table + ((va >> shift) & 511) * 8)
            if not entry & _PRESENT:
                raise XenMemoryError(f"{va:#x} is not mapped (level {4 - level} entry {entry:#x})")
            if shift in (30, 21) and entry & _LARGE:
                size = 1 << shift
                return (entry & _ADDR & ~(size - 1)) + (va & (size - 1)), size - (va & (size - 1))
            table = entry & _ADDR
        return table + (va & (PAGE - 1)), PAGE - (va & (PAGE - 1))

    def read_virtual(self, cr3: int, va: int, length: int) -> bytes:
        """``length`` bytes at ``va``, through the page tables: one read per page mapped, so Xen's
        code, mapped by 2 MiB pages, takes a handful of reads."""
        out = bytearray()
        at = va
        while at < va + length:
            phys, left = self._walk(cr3, at)
            take = min(left, va + length - at)
            out += self.read(phys, take)
            at += take
        return bytes(out)

    def write_virtual(self, cr3: int, va: int, data: bytes) -> None:
        """Write ``data`` at ``va`` (the lab's attack on Xen's code, from outside)."""
        with open(f"/proc/{self.ram.pid}/mem", "r+b", buffering=0) as f:
            at = 0
            while at < len(data):
                phys, left = self._walk(cr3, va + at)
                take = min(left, len(data) - at)
                f.seek(self.ram.start + phys)
                f.write(data[at : at + take])
                at += take

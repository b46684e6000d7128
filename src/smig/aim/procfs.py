"""What the kernel says about a process: its memory mappings, its network namespace, its memory.

A monitor finds and reads its subject's processes through ``/proc`` itself, never from a list
the subject hands over: in the lab a host is a network namespace, so its hypervisor processes are
the ``qemu-system-*`` processes whose ``/proc/PID/ns/net`` is that namespace. On one machine this
stands for the out-of-band access a real neighbour has (BMC, DMA, a TPM-anchored agent).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from smig.errors import ProcessGone

PAGE = os.sysconf("SC_PAGE_SIZE")
HYPERVISOR_PREFIXES = ("qemu-system-",)
KERNEL_PAGES = ("[vdso]", "[vsyscall]", "[vvar]")
_DELETED = " (deleted)"
_LINE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>[-rwxps]{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+)\s+(?P<inode>\d+)\s*(?P<path>.*)$"
)


@dataclass(frozen=True)
class MemoryMapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    offset: int
    device: str
    inode: int
    path: str  # "" for anonymous memory; "[vdso]" and friends for kernel pages
    deleted: bool = False  # the file was unlinked or replaced after it was mapped

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def anonymous(self) -> bool:
        return self.path == "" or (self.inode == 0 and not self.path.startswith("/"))

    @property
    def kernel_page(self) -> bool:
        return self.path in KERNEL_PAGES


def parse_maps(text: str) -> list[MemoryMapping]:
    """Parse the text of ``/proc/PID/maps``; lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        path = m["path"].strip()
        deleted = path.endswith(_DELETED)
        if deleted:
            path = path[: -len(_DELETED)]
        out.append(
            MemoryMapping(
                start=int(m["start"], 16),
                end=int(m["end"], 16),
                perms=m["perms"],
                offset=int(m["offset"], 16),
                device=m["dev"],
                inode=int(m["inode"]),
                path=path,
                deleted=deleted,
            )
        )
    return out


def read_maps(pid: int) -> list[MemoryMapping]:
    """The mappings of ``pid``.

    Raises:
        ProcessGone: the process does not exist (any more).
    """
    try:
        return parse_maps(Path(f"/proc/{pid}/maps").read_text())
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


def executable_mappings(pid: int) -> list[MemoryMapping]:
    return [m for m in read_maps(pid) if m.executable]


def anonymous_kib(pid: int) -> dict[int, int]:
    """Start address → ``Anonymous:`` KiB for every executable mapping, from ``/proc/PID/smaps``.

    A file-backed code page that was written (through ``/proc/PID/mem``, ptrace, or after an
    ``mprotect``) is copied on write and counted here; clean code pages never are.

    Raises:
        ProcessGone: the process does not exist (any more).
    """
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    out: dict[int, int] = {}
    current: int | None = None
    for line in text.splitlines():
        head = _LINE.match(line)
        if head is not None:
            current = int(head["start"], 16) if head["perms"][2] == "x" else None
        elif current is not None and line.startswith("Anonymous:"):
            out[current] = int(line.split()[1])
    return out


def private_pages(pid: int, mapping: MemoryMapping) -> list[int]:
    """Page indexes (from the mapping's start) that are present but no longer file pages.

    Reads ``/proc/PID/pagemap``: bit 63 is "present", bit 61 "file page or shared anonymous".
    A present page without bit 61 in a file mapping is a private copy, i.e. it was written.
    """
    pages = mapping.length // PAGE
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as f:
            data = os.pread(f.fileno(), pages * 8, (mapping.start // PAGE) * 8)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    out = []
    for i in range(len(data) // 8):
        entry = int.from_bytes(data[i * 8 : i * 8 + 8], "little")
        if entry >> 63 & 1 and not entry >> 61 & 1:
            out.append(i)
    return out


def process_name(pid: int) -> str:
    """The base name of the executable the kernel says ``pid`` runs ("" for kernel threads)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(_DELETED)
    except FileNotFoundError:
        return ""
    except (ProcessLookupError, PermissionError, OSError):
        return ""


def netns_inode(path: str | Path) -> int:
    """The inode that identifies a network namespace (``/run/netns/NAME`` or ``/proc/PID/ns/net``)."""
    return os.stat(path).st_ino


def hypervisor_pids(netns: str | Path | None = None, prefixes: tuple[str, ...] = HYPERVISOR_PREFIXES) -> list[int]:
    """PIDs of the hypervisor processes, optionally only those in network namespace ``netns``."""
    want = netns_inode(netns) if netns is not None else None
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not process_name(pid).startswith(prefixes):
            continue
        if want is not None:
            try:
                if netns_inode(f"/proc/{pid}/ns/net") != want:
                    continue
            except OSError:
                continue
        out.append(pid)
    return sorted(out)


def uses_tcg(maps: list[MemoryMapping]) -> bool:
    """Whether the process loaded QEMU's TCG accelerator module (judged from its own mappings)."""
    return any(os.path.basename(m.path).startswith("accel-tcg-") for m in maps if m.executable)

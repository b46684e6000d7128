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


class PageMap:
    """``/proc/PID/pagemap``: which pages of a mapping are private copies, i.e. were written.

    Bit 63 of an entry is "present", bit 62 "swapped", bit 61 "file page or shared anonymous".
    In a private file mapping, a present page without bit 61, or any swapped page (file pages are
    dropped, never swapped), is a copy made on write. Reading only the code's entries costs a few
    hundred KiB at most, whatever the size of the guest's RAM in the same process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessGone(pid) from e

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> PageMap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def private_pages(self, mapping: MemoryMapping) -> list[int]:
        """Page indexes (from the mapping's start) that are private copies."""
        pages = mapping.length // PAGE
        try:
            data = os.pread(self._fd, pages * 8, (mapping.start // PAGE) * 8)
        except OSError as e:
            raise ProcessGone(self.pid) from e
        entries = memoryview(data).cast("Q")
        return [i for i, e in enumerate(entries) if (e >> 63 & 1 and not e >> 61 & 1) or e >> 62 & 1]


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


def uses_kvm(pid: int) -> bool:
    """Whether the process holds ``/dev/kvm`` open (a KVM guest's QEMU always does)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/kvm":
                return True
        except OSError:
            continue
    return False

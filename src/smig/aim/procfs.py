"""What the kernel says about a process: its memory mappings, its network namespace, its memory.

A monitor finds and reads its subject's processes through ``/proc`` itself, never from a list
the subject hands over: in the lab a host is a network namespace, so its hypervisor processes are
the ``qemu-system-*`` processes whose ``/proc/PID/ns/net`` is that namespace. On one machine this
stands for the out-of-band access a real neighbour has (BMC, DMA, a TPM-anchored agent).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Sequence
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


_EXECUTABLE_LINE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ [-r][-w]x.*$", re.MULTILINE)


def parse_maps(text: str, *, executable_only: bool = False) -> list[MemoryMapping]:
    """Parse the text of ``/proc/PID/maps``; lines that do not parse are skipped.

    ``executable_only`` picks the code lines out with one regular-expression scan before parsing
    them, which is most of the cost: a QEMU process has a few hundred mappings and about fifty are
    code.
    """
    out = []
    lines = _EXECUTABLE_LINE.findall(text) if executable_only else text.splitlines()
    for line in lines:
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


def maps_text(pid: int) -> str:
    """The text of ``/proc/PID/maps``. Raises ProcessGone."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(pid) from e


def read_maps(pid: int, *, executable_only: bool = False) -> list[MemoryMapping]:
    """The mappings of ``pid``.

    Raises:
        ProcessGone: the process does not exist (any more).
    """
    return parse_maps(maps_text(pid), executable_only=executable_only)


def executable_mappings(pid: int) -> list[MemoryMapping]:
    return read_maps(pid, executable_only=True)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_vm_readv = _libc.process_vm_readv
_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_vm_readv.restype = ctypes.c_ssize_t
IOV_MAX = os.sysconf("SC_IOV_MAX")


class ProcessMemory:
    """Another process's memory, read with ``process_vm_readv``: one system call for many ranges,
    straight into the caller's buffer, about 1.6x faster than ``/proc/PID/mem`` here.

    ``process_vm_readv`` honours page protections, so a mapping made execute-only (``--x``) fails
    with EFAULT. Such a batch is read again through ``/proc/PID/mem``, which the kernel lets a
    tracer-privileged reader see whatever the protections: hiding code by taking away its read
    permission hides nothing. A range that cannot be read either way was unmapped or the process
    exited: ``EOFError`` or ``ProcessGone``.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise ProcessGone(pid) from e
        self.fallbacks = 0

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def read(self, view: memoryview, pieces: Sequence[tuple[int, int]]) -> None:
        total = sum(n for _, n in pieces)
        if total > len(view):
            raise ValueError("the pieces do not fit the buffer")
        if pieces and len(pieces) <= IOV_MAX and self._vm_readv(view, pieces, total) == total:
            return
        self.fallbacks += 1
        at = 0
        for start, length in pieces:
            got = 0
            while got < length:
                try:
                    n = os.preadv(self.fd, [view[at + got : at + length]], start + got)
                except OSError as e:
                    if e.errno in (errno.EIO, errno.ESRCH, errno.ENOENT, errno.EFAULT):
                        raise ProcessGone(self.pid) from e
                    raise
                if n == 0:
                    raise EOFError(f"process {self.pid}: short read at {start + got:#x}")
                got += n
            at += length

    def _vm_readv(self, view: memoryview, pieces: Sequence[tuple[int, int]], total: int) -> int:
        local = _IOVec(ctypes.addressof(ctypes.c_char.from_buffer(view)), total)
        remote = (_IOVec * len(pieces))(*(_IOVec(start, length) for start, length in pieces))
        n = _vm_readv(self.pid, ctypes.byref(local), 1, remote, len(pieces), 0)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.ESRCH:
                raise ProcessGone(self.pid)
            return -1  # EFAULT (unmapped or unreadable), EPERM...: let /proc/PID/mem decide
        return int(n)


# Top byte of a pagemap entry: 0x80 present, 0x40 swapped, 0x20 file page or shared anonymous.
_PRIVATE_FLAGS = bytes(1 if (b & 0xA0) == 0x80 or b & 0x40 else 0 for b in range(256))


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

    def entries(self, mapping: MemoryMapping) -> bytes:
        """The raw 64-bit entries of the mapping's pages."""
        try:
            return os.pread(self._fd, mapping.length // PAGE * 8, (mapping.start // PAGE) * 8)
        except OSError as e:
            raise ProcessGone(self.pid) from e

    def private_pages(self, mapping: MemoryMapping) -> list[int]:
        """Page indexes (from the mapping's start) that are private copies."""
        return private_pages(self.entries(mapping))


def private_pages(entries: bytes) -> list[int]:
    """Indexes of the pagemap ``entries`` that are private copies."""
    # The flags live in each little-endian entry's top byte; classify all the top bytes at C
    # speed and look only at the (usually no) private ones.
    marks = entries[7::8].translate(_PRIVATE_FLAGS)
    out = []
    i = marks.find(1)
    while i >= 0:
        out.append(i)
        i = marks.find(1, i + 1)
    return out


PF_EXITING = 0x4  # the kernel is tearing the process down (include/linux/sched.h)


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot: with the PID it names one process for good.

    None if there is no such process, or it is exiting: its memory may already be gone while it
    is not yet a zombie, and a zombie has none.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X") or int(fields[6]) & PF_EXITING:
        return None
    return int(fields[19])


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


def hypervisor_pids(
    netns: str | Path | None = None,
    prefixes: tuple[str, ...] = HYPERVISOR_PREFIXES,
    *,
    cmdline_contains: str | None = None,
) -> list[int]:
    """PIDs of the hypervisor processes, optionally only those in network namespace ``netns`` and
    those with ``cmdline_contains`` in an argument (a host's directory, where hosts share one
    network namespace)."""
    want = netns_inode(netns) if netns is not None else None
    needle = cmdline_contains.encode() if cmdline_contains is not None else None
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not process_name(pid).startswith(prefixes):
            continue
        try:
            if want is not None and netns_inode(f"/proc/{pid}/ns/net") != want:
                continue
            if needle is not None and not any(
                needle in arg for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ):
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

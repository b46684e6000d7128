"""The monitor's own read-only mappings of the files its subjects execute, to hash their code in
place instead of copying it out.

A clean page of a file mapping is a frame of the file's page cache, the same frame for every
process that maps it. As root the monitor sees frame numbers in ``/proc/PID/pagemap``; when every
page of a subject's code mapping sits in exactly the frame that backs the monitor's own mapping
of the same file range, hashing the monitor's mapping *is* hashing the subject's memory, byte for
byte, with no copy. Anything else (a page not present, a private copy, a frame number hidden
because the monitor lacks ``CAP_SYS_ADMIN``, a file that cannot be opened) falls back to copying
the subject's memory, so this only ever changes the cost, never what is hashed.

The file is opened through ``/proc/PID/map_files/START-END``: the inode the subject really maps,
even if the path was since replaced or deleted; its device and inode are checked against ``maps``.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

from smig.aim.procfs import PAGE, MemoryMapping

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
MAP_POPULATE = 0x8000
_PFN_BYTES = 6  # frame numbers are bits 0-54: six whole bytes, and seven bits of the seventh
_LOW7 = bytes(b & 0x7F for b in range(256))
# Top byte of an entry: present (0x80), not swapped (0x40), a file page (0x20).
_PRESENT_FILE = bytes(1 if b & 0xE0 == 0xA0 else 0 for b in range(256))


def _device(mapping: MemoryMapping) -> int:
    return _device_number(mapping.device)


@functools.lru_cache(maxsize=64)
def _device_number(device: str) -> int:
    """``"fd:01"`` as maps shows it, as ``st_dev`` numbers it (a machine has only a few)."""
    major, minor = (int(x, 16) for x in device.split(":"))
    return os.makedev(major, minor)


def same_frames(theirs: bytes, ours: bytes) -> bool:
    """Whether two runs of pagemap entries are the same present file pages, frame for frame."""
    if len(theirs) != len(ours) or not theirs:
        return False
    for entries in (theirs, ours):
        if entries[7::8].translate(_PRESENT_FILE).count(0):
            return False
    if theirs[6::8].translate(_LOW7) != ours[6::8].translate(_LOW7):
        return False
    if any(theirs[i::8] != ours[i::8] for i in range(_PFN_BYTES)):
        return False
    # Without CAP_SYS_ADMIN the kernel shows every frame number as zero: equal, and meaningless.
    return any(theirs[i::8].count(0) != len(theirs) // 8 for i in range(_PFN_BYTES + 1))


class _File:
    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size  # the mapped length: the file's size rounded up to whole pages


class Shadow:
    """The monitor's mappings, one per file (device, inode), kept across rounds.

    Keeping them means their pages stay in the monitor's page tables: after the first round,
    reading our own pagemap entries costs a few hundred microseconds and nothing faults.
    """

    def __init__(self, *, max_files: int = 256) -> None:
        self._files: dict[tuple[int, int], _File | None] = {}
        self._max_files = max_files
        # (device, inode, offset) -> the subject's entries last proved to be our frames
        self._proved: dict[tuple[int, int, int], bytes] = {}
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)

    def close(self) -> None:
        for f in self._files.values():
            if f is not None:
                _munmap(f.address, f.size)
        self._files.clear()
        self._proved.clear()
        os.close(self._pagemap)

    def view(self, pid: int, mapping: MemoryMapping, theirs: bytes) -> memoryview | None:
        """Our mapping of the bytes ``mapping`` shows, if ``theirs`` (the subject's pagemap entries
        for it) are exactly our frames; otherwise None, and the caller copies."""
        f = self._file(pid, mapping)
        if f is None or mapping.offset % PAGE or mapping.offset + mapping.length > f.size:
            return None
        start = f.address + mapping.offset
        proof = (_device(mapping), mapping.inode, mapping.offset)
        # Unchanged entries name the same frames as when they were proved ours: the kernel cannot
        # move or drop a frame from our mapping without changing every mapping of it, theirs too.
        if self._proved.get(proof) != theirs:
            ours = os.pread(self._pagemap, len(theirs), start // PAGE * 8)
            if not same_frames(theirs, ours):
                self._proved.pop(proof, None)
                return None
            self._proved[proof] = theirs
        return memoryview((ctypes.c_char * mapping.length).from_address(start)).cast("B")

    def _file(self, pid: int, mapping: MemoryMapping) -> _File | None:
        key = (_device(mapping), mapping.inode)
        if key in self._files:
            return self._files[key]
        if len(self._files) >= self._max_files:
            return None
        self._files[key] = found = self._open(pid, mapping, key)
        return found

    @staticmethod
    def _open(pid: int, mapping: MemoryMapping, key: tuple[int, int]) -> _File | None:
        try:
            fd = os.open(f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}", os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != key or st.st_size == 0:
                return None
            size = -(-st.st_size // PAGE) * PAGE
            address = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED | MAP_POPULATE, fd, 0)
            if address is None or address == _MAP_FAILED:
                return None
            return _File(address, size)
        finally:
            os.close(fd)

"""A writer for the ``newc`` cpio format, the one the Linux kernel unpacks as an initramfs.

Written here rather than shelling out to ``cpio`` so that the archive is byte-for-byte
reproducible (fixed inode numbers, owners and times) and needs no tool on the host.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Appends entries to a newc archive; call :meth:`close` to write the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._written = 0

    def _pad(self) -> None:
        pad = (-self._written) % 4
        if pad:
            self._write(b"\0" * pad)

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._write(encoded)
        self._pad()
        self._write(data)
        self._pad()

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry(_TRAILER, 0)

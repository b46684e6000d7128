"""The hashing AIM does: leaf digests over fixed-size pieces, a digest per target, a root per host.

A target's digest is the hash of its leaf digests, and a host's root is the hash of its sorted
(target, digest) pairs: a Merkle tree two levels deep. Comparing leaves with the reference names
the changed range to within one leaf, without the monitor ever holding the reference bytes.

Memory is read in large sequential ``preadv`` calls into one reused buffer, so measuring hundreds
of MB never copies them into Python objects.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import blake3

from smig.model import HashAlgorithm

LEAF_SIZE = 64 << 10
READ_SIZE = 4 << 20


def _leaf(algorithm: HashAlgorithm, data: memoryview | bytes) -> bytes:
    if algorithm is HashAlgorithm.BLAKE3:
        return blake3.blake3(data).digest()
    return hashlib.sha256(data).digest()


def combine(algorithm: HashAlgorithm, parts: Iterable[bytes]) -> bytes:
    """The digest of a sequence of digests (one inner node of the tree)."""
    h = blake3.blake3() if algorithm is HashAlgorithm.BLAKE3 else hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def root(algorithm: HashAlgorithm, digests: Iterable[tuple[str, str]]) -> str:
    """The host's root over ``(target, hex digest)`` pairs, independent of their order."""
    return combine(algorithm, (f"{t}\0{d}\n".encode() for t, d in sorted(digests))).hex()


class Reader:
    """Hashes ranges of a file descriptor (a file, or ``/proc/PID/mem``) with one reused buffer."""

    def __init__(self, algorithm: HashAlgorithm, leaf_size: int = LEAF_SIZE, read_size: int = READ_SIZE) -> None:
        if read_size % leaf_size:
            raise ValueError("read_size must be a multiple of leaf_size")
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self._buf = bytearray(read_size)
        self.bytes_read = 0

    def leaves(self, fd: int, start: int, length: int, *, pad: bool = False) -> list[bytes]:
        """Leaf digests of ``length`` bytes at ``start``.

        ``pad`` zero-fills past the end of a file, as the kernel does for the tail of a mapped
        page. Without it a short read raises ``EOFError`` (a process's memory never reads short
        unless the mapping went away).
        """
        view = memoryview(self._buf)
        out = []
        done = 0
        while done < length:
            want = min(len(self._buf), length - done)
            got = 0
            while got < want:
                n = os.preadv(fd, [view[got:want]], start + done + got)
                if n == 0:
                    break
                got += n
            if got < want:
                if not pad:
                    raise EOFError(f"short read at {start + done + got:#x}")
                view[got:want] = bytes(want - got)
            for i in range(0, want, self.leaf_size):
                out.append(_leaf(self.algorithm, view[i : min(i + self.leaf_size, want)]))
            done += want
            self.bytes_read += want
        return out

    def file_digest(self, fd: int) -> str:
        """The digest of a whole file: the combination of its leaves."""
        size = os.fstat(fd).st_size
        return combine(self.algorithm, self.leaves(fd, 0, size, pad=True)).hex()

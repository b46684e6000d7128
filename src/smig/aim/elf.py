"""Where a file's code lands in memory: the executable segments of an ELF file.

The loader maps each ``PT_LOAD`` segment page-aligned, so an executable mapping in
``/proc/PID/maps`` covers the file from the segment's offset rounded down to a page, for the
segment's size in memory rounded out to pages. Position-independent code is not relocated in
place, so those bytes in memory equal the file's bytes: the reference for a mapping is computed
from the file alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from smig.errors import ManifestError

PT_LOAD = 1
PF_X = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")


@dataclass(frozen=True)
class Section:
    """A section of an ELF file: its name, load address, file offset and size."""

    name: str
    addr: int
    offset: int
    size: int


def sections(data: bytes, what: str) -> dict[str, Section]:
    """The sections of a little-endian ELF64 file held in ``data``, by name.

    Raises ManifestError: ``what`` (named in the message) is not such a file with sections."""
    ident, _t, _m, _v, _e, _phoff, shoff, _f, _eh, _phs, _phn, shentsize, shnum, shstrndx = _EHDR.unpack_from(data)
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or shnum == 0:
        raise ManifestError(f"{what} is not a little-endian 64-bit ELF file with sections")
    raw = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    names = data[raw[shstrndx][4] : raw[shstrndx][4] + raw[shstrndx][5]]
    out = {}
    for name_off, _type, _flags, addr, offset, size, *_ in raw:
        name = names[name_off : names.index(b"\0", name_off)].decode(errors="replace")
        out[name] = Section(name, addr, offset, size)
    return out


@dataclass(frozen=True)
class Segment:
    """An executable segment as it will be mapped: file ``offset`` and mapped ``length``."""

    offset: int
    length: int


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def executable_segments(path: Path, page: int = 4096) -> list[Segment]:
    """The executable mappings the loader will make of ``path``.

    Raises:
        ManifestError: not a little-endian ELF64 file, or truncated.
    """
    try:
        with path.open("rb") as f:
            head = f.read(_EHDR.size)
            if len(head) < _EHDR.size or head[:4] != b"\x7fELF":
                raise ManifestError(f"{path} is not an ELF file")
            ident, _type, _machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = (
                _EHDR.unpack(head)
            )
            if ident[4] != 2 or ident[5] != 1:
                raise ManifestError(f"{path} is not a little-endian 64-bit ELF file")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from e
    if len(table) < phentsize * phnum or phentsize < _PHDR.size:
        raise ManifestError(f"{path}: truncated program header table")
    out = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _paddr, _filesz, p_memsz, _align = _PHDR.unpack_from(table, i * phentsize)
        if p_type != PT_LOAD or not p_flags & PF_X or p_memsz == 0:
            continue
        start = p_vaddr - p_vaddr % page
        end = -(-(p_vaddr + p_memsz) // page) * page
        out.append(Segment(offset=p_offset - p_offset % page, length=end - start))
    return out

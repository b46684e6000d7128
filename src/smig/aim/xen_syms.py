"""Xen's reference, from the Xen package's own files: ``xen-syms`` (Debian's
``xen-hypervisor-4.17-amd64-dbg``), the unstripped ELF of exactly the hypervisor in ``/boot``.

From it: the bytes of Xen's ``.text`` and where it runs (its virtual address), the functions
(to name what a mismatch hit), and the alternatives table. Xen rewrites some of its own code
once at boot (``apply_alternatives``: an instruction replaced by a faster one when the CPU has
a feature), so those sites may legitimately hold either their original bytes or their
replacement; every other byte of ``.text`` must equal the file.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from smig.aim import elf
from smig.aim.elf import Section
from smig.errors import ManifestError

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SYM = struct.Struct("<IBBHQQ")
# Xen 4.17's struct alt_instr (xen/arch/x86/include/asm/alternative.h), packed: orig_offset,
# repl_offset (each relative to its own field), cpuid, orig_len, repl_len, pad_len, priv. A site
# spans orig_len + pad_len bytes: the build pads the original with NOPs to the replacement's size.
_ALT = struct.Struct("<iiHBBBB")
STT_FUNC = 2


@dataclass(frozen=True)
class AltSite:
    """One alternatives site: ``length`` bytes at ``addr`` that may instead hold ``replacement``."""

    addr: int
    length: int  # what the site spans: its original instruction(s) and the NOPs padding them
    replacement: bytes
    replacement_addr: int
    cpuid: int


@dataclass(frozen=True)
class XenSyms:
    text: Section
    text_bytes: bytes
    functions: tuple[tuple[int, int, str], ...]  # (addr, size, name), sorted
    alternatives: tuple[AltSite, ...]  # sorted by addr
    build_id: str

    def function_at(self, addr: int) -> str:
        """``name+0xoff`` of the function holding ``addr``, or its address alone."""
        i = bisect.bisect_right(self.functions, (addr, 1 << 64, "")) - 1
        if i >= 0:
            start, size, name = self.functions[i]
            if start <= addr < start + max(size, 1):
                return f"{name}+{addr - start:#x}"
        return f"{addr:#x}"

    def sites_in(self, start: int, end: int) -> list[AltSite]:
        """The alternatives sites overlapping [start, end)."""
        i = bisect.bisect_left(self._site_starts, start - 256)
        out = []
        for site in self.alternatives[i:]:
            if site.addr >= end:
                break
            if site.addr + site.length > start:
                out.append(site)
        return out

    @cached_property
    def _site_starts(self) -> list[int]:
        return [s.addr for s in self.alternatives]


def _symbols(data: bytes, sections: dict[str, Section]) -> tuple[list[tuple[int, int, str]], dict[str, int]]:
    symtab, strtab = sections.get(".symtab"), sections.get(".strtab")
    if symtab is None or strtab is None:
        raise ManifestError("xen-syms has no symbol table: it is not the unstripped hypervisor")
    names = data[strtab.offset : strtab.offset + strtab.size]
    functions, by_name = [], {}
    for at in range(symtab.offset, symtab.offset + symtab.size, _SYM.size):
        name_off, info, _other, _shndx, value, size = _SYM.unpack_from(data, at)
        name = names[name_off : names.index(b"\0", name_off)].decode(errors="replace")
        if name:
            by_name[name] = value
        if info & 0xF == STT_FUNC and value:
            functions.append((value, size, name))
    return sorted(functions), by_name


def _read_at(data: bytes, sections: dict[str, Section], addr: int, length: int) -> bytes:
    for s in sections.values():
        if s.addr and s.addr <= addr and addr + length <= s.addr + s.size:
            return data[s.offset + addr - s.addr : s.offset + addr - s.addr + length]
    raise ManifestError(f"xen-syms holds no bytes at {addr:#x}")


def load(path: Path) -> XenSyms:
    """Raises ManifestError: not Xen's unstripped ELF, or its tables do not parse."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from e
    sections = elf.sections(data, "xen-syms")
    text = sections.get(".text")
    if text is None:
        raise ManifestError(f"{path} has no .text")
    functions, by_name = _symbols(data, sections)
    try:
        first, last = by_name["__alt_instructions"], by_name["__alt_instructions_end"]
    except KeyError as e:
        raise ManifestError(f"{path} has no alternatives table ({e.args[0]})") from None
    table = _read_at(data, sections, first, last - first)
    sites = []
    for i in range(0, len(table) - _ALT.size + 1, _ALT.size):
        orig_off, repl_off, cpuid, orig_len, repl_len, pad_len, _priv = _ALT.unpack_from(table, i)
        here = first + i
        addr, repl_addr = here + orig_off, here + 4 + repl_off
        replacement = _read_at(data, sections, repl_addr, repl_len)
        sites.append(AltSite(addr, orig_len + pad_len, replacement, repl_addr, cpuid))
    build_id = sections.get(".note.gnu.build-id")
    bid = data[build_id.offset + 16 : build_id.offset + build_id.size].hex() if build_id else ""
    return XenSyms(
        text=text,
        text_bytes=data[text.offset : text.offset + text.size],
        functions=tuple(functions),
        alternatives=tuple(sorted(sites, key=lambda s: s.addr)),
        build_id=bid,
    )

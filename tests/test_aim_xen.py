"""AIM for Xen, the pure and local parts: xen-syms parsing, the judging of Xen's code against it
(alternatives renderings allowed, anything else named), and the page walk over real memory."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from smig.aim.elf import Section
from smig.aim.xen_judge import TEXT_TARGET, is_nops, judge_text
from smig.aim.xen_memory import GuestRam, PhysicalReader, XenMemoryError, parse_cr3
from smig.aim.xen_syms import AltSite, XenSyms

BASE = 0xFFFF82D040200000


def _syms(text: bytes, sites: tuple[AltSite, ...]) -> XenSyms:
    return XenSyms(
        text=Section(".text", BASE, 0, len(text)),
        text_bytes=text,
        functions=((BASE, 0x100, "start"), (BASE + 0x100, 0x100, "do_thing"), (BASE + 0x200, 0x100, "target_fn")),
        alternatives=sites,
        build_id="ab",
    )


# A site at 0x110: `call *0x0(%rip)` (6 bytes) whose replacement, 0x1000 bytes past .text's
# start in the file, is a 5-byte `call rel32` to target_fn.
SITE_AT, REPL_AT = BASE + 0x110, BASE + 0x1000
ORIGINAL = bytes.fromhex("ff1500000000")


def _text() -> bytearray:
    text = bytearray(b"\xcc" * 0x300)
    text[0x110:0x116] = ORIGINAL
    return text


def _site(replacement: bytes) -> AltSite:
    return AltSite(addr=SITE_AT, length=6, replacement=replacement, replacement_addr=REPL_AT, cpuid=1)


def test_nops() -> None:
    assert is_nops(b"") and is_nops(b"\x90") and is_nops(bytes.fromhex("0f1f4000") + b"\x90")
    assert not is_nops(b"\xcc") and not is_nops(bytes.fromhex("0f1f40"))


def test_unchanged_code_matches() -> None:
    text = _text()
    assert judge_text(_syms(bytes(text), (_site(b""),)), bytes(text)) == []


def test_a_byte_outside_every_site_is_named_by_its_function() -> None:
    text = _text()
    now = bytearray(text)
    now[0x150] ^= 0xFF
    found = judge_text(_syms(bytes(text), (_site(b""),)), bytes(now))
    assert [(m.path, m.offset, m.length) for m in found] == [(TEXT_TARGET, 0x150, 1)]
    assert "do_thing+0x50" in found[0].reason


def test_renderings_apply_alternatives_makes_are_accepted() -> None:
    text = _text()
    # The replacement `call rel32` aimed at target_fn from where it lies in the file:
    rel_in_file = (BASE + 0x200) - (REPL_AT + 5)
    replacement = b"\xe8" + struct.pack("<i", rel_in_file)
    at_site = b"\xe8" + struct.pack("<i", (BASE + 0x200) - (SITE_AT + 5))  # re-aimed from the site
    syms = _syms(bytes(text), (_site(replacement),))
    for rendering in (at_site + b"\x90", b"\x0f\x1f\x44\x00\x00\x90"):
        now = bytearray(text)
        now[0x110:0x116] = rendering
        verdict = judge_text(syms, bytes(now))
        if rendering.startswith(b"\xe8"):
            assert verdict == []
        else:  # all NOPs is a rendering only of a site whose replacement is empty
            assert verdict and verdict[0].offset == 0x110
    nop_site = _syms(bytes(text), (_site(b""),))
    now = bytearray(text)
    now[0x110:0x116] = bytes.fromhex("660f1f440000")
    assert judge_text(nop_site, bytes(now)) == []


def test_a_direct_call_made_from_an_indirect_one_must_reach_a_function_start() -> None:
    text = _text()
    altcall = b"\xe8" + struct.pack("<i", -5)  # the build's marker: a call to itself
    syms = _syms(bytes(text), (_site(altcall),))

    def rendered(first5: bytes) -> bytes:
        now = bytearray(text)
        now[0x110:0x115] = first5
        now[0x115] = 0x90
        return bytes(now)

    def call_to(target: int) -> bytes:
        return b"\xe8" + struct.pack("<i", target - (SITE_AT + 5))

    assert judge_text(syms, rendered(call_to(BASE + 0x200))) == []
    assert judge_text(syms, rendered(call_to(BASE + 0x204))) == []  # past the target's ENDBR64
    assert judge_text(syms, rendered(bytes.fromhex("0f0b0fffff"))) == []  # a NULL pointer's trap
    into_the_middle = judge_text(syms, rendered(call_to(BASE + 0x208)))
    assert [(m.offset, m.length) for m in into_the_middle] == [(0x110, 6)]  # the whole site, once
    # Only a site built as an indirect call may turn into a direct one:
    plain = _syms(bytes(text), (_site(b"\x90" * 5),))
    assert judge_text(plain, rendered(call_to(BASE + 0x200)))


def test_short_read_is_a_mismatch() -> None:
    text = _text()
    assert judge_text(_syms(bytes(text), ()), bytes(text[:-1]))[0].path == TEXT_TARGET


def test_cr3_from_info_registers() -> None:
    assert parse_cr3("CR0=80050033 CR2=00007f CR3=000000003a5ef000 CR4=00350ee0") == 0x3A5EF000
    with pytest.raises(XenMemoryError):
        parse_cr3("RAX=0")


def test_page_walk_over_real_memory() -> None:
    """Page tables built in a buffer of this process, read back through /proc/self/mem the way a
    monitor reads the outer QEMU's RAM: 4 KiB pages and a 2 MiB one."""
    ram = bytearray(8 << 20)
    start = ctypes.addressof((ctypes.c_char * len(ram)).from_buffer(ram))
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    va = 0xFFFF82D040201000

    def entry(at: int, index: int, value: int) -> None:
        struct.pack_into("<Q", ram, at + index * 8, value)

    entry(pml4, (va >> 39) & 511, pdpt | 0x3)
    entry(pdpt, (va >> 30) & 511, pd | 0x3)
    entry(pd, (va >> 21) & 511, pt | 0x3)
    entry(pt, (va >> 12) & 511, 0x5000 | 0x3)
    ram[0x5000:0x5004] = b"XEN!"
    big = va + (2 << 20)  # the next 2 MiB: one large page at 4 MiB
    entry(pd, (big >> 21) & 511, (4 << 20) | 0x83)
    ram[(4 << 20) + 0x1234 : (4 << 20) + 0x1238] = b"BIG!"
    with PhysicalReader(GuestRam(os.getpid(), start, len(ram))) as reader:
        assert reader.translate(pml4, va) == 0x5000
        assert reader.read_virtual(pml4, va, 4) == b"XEN!"
        assert reader.read_virtual(pml4, (big & ~0x1FFFFF) + 0x1234, 4) == b"BIG!"
        with pytest.raises(XenMemoryError, match="not mapped"):
            reader.translate(pml4, va + (1 << 30))
        with pytest.raises(XenMemoryError, match="outside"):
            reader.read(len(ram) - 2, 4)
        reader.write_virtual(pml4, va + 1, b"ZZ")
    assert ram[0x5000:0x5004] == b"XZZ!"

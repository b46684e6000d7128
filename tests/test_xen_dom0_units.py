"""Measuring dom0's toolstack, the parts that need no nested host: the dom0 kernel's facts read
from its package file, BTF parsing, judging a process's code page by page, the monitor's
configuration, and dom0 going unread counting as a mismatch only after several rounds."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from smig.agent.config import EXAMPLE, parse_config
from smig.aim import linux_image, xen_measure
from smig.aim.linux_image import KernelLayout, _Btf
from smig.aim.xen_dom0 import Dom0Process, Dom0Reference, Tool, dom0_cr3, judge_process
from smig.aim.xen_memory import PAGE, XenMemoryError
from smig.errors import ConfigError, ManifestError
from smig.lab.xen_image import DOM0_TOOLS, XenHostImage


def _btf(types: list[bytes], strings: bytes) -> bytes:
    body = b"".join(types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(strings)) + body + strings


def test_btf_offsets_are_found_through_anonymous_members_and_past_other_kinds() -> None:
    # strings: 0 "", 1 "int", 5 "outer", 11 "inner_field", 23 "plain"
    strings = b"\0int\0outer\0inner_field\0plain\0"
    int_t = struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", 32)  # id 1: int, 4 bytes
    enum_t = struct.pack("<III", 0, (6 << 24) | 2, 4) + struct.pack("<iiii", 1, 0, 1, 1)  # id 2: enum, 2 values
    union_t = struct.pack("<III", 0, (5 << 24) | 1, 8) + struct.pack("<III", 11, 1, 32)  # id 3: union {inner_field@4}
    const_t = struct.pack("<III", 0, 10 << 24, 3)  # id 4: const union
    outer = struct.pack("<III", 5, (4 << 24) | 2, 24) + struct.pack("<IIIIII", 23, 1, 0, 0, 4, 64)  # plain@0, anon@8
    btf = _Btf(_btf([int_t, enum_t, union_t, const_t, outer], strings))
    assert btf.field("outer", "plain") == 0
    assert btf.field("outer", "inner_field") == 8 + 4  # the anonymous member's place plus the field's in it
    with pytest.raises(ManifestError, match="no field nothing"):
        btf.field("outer", "nothing")
    with pytest.raises(ManifestError, match="no struct absent"):
        btf.struct("absent")


def test_the_dom0_kernels_facts_come_from_its_package_file(xen_image: XenHostImage, tmp_path: Path) -> None:
    k = linux_image.layout(xen_image.kernel)
    assert k.init_task >= 0xFFFFFFFF80000000  # a kernel address: the PV dom0 runs at its link address
    assert k.mm_end_code == k.mm_start_code + 8  # adjacent in mm_struct: the BTF is read right
    assert len({k.task_tasks, k.task_mm, k.task_pid}) == 3
    assert len(k.probe) == linux_image.PROBE_LEN and any(k.probe)
    (tmp_path / "not-a-kernel").write_bytes(b"MZ" + bytes(4096))
    with pytest.raises(ManifestError, match="no xz"):
        linux_image.layout(tmp_path / "not-a-kernel")
    with pytest.raises(ManifestError, match="does not decompress"):
        linux_image.layout(xen_image.xen_syms)  # it holds the xz magic (Xen's own decompressor), no kernel


def test_the_toolstack_references_are_the_images_package_files(xen_image: XenHostImage, tmp_path: Path) -> None:
    assert [path for path, _ in xen_image.dom0_tools] == list(DOM0_TOOLS)
    tools = [Tool.load(local, path) for path, local in xen_image.dom0_tools]
    for tool in tools:
        assert tool.size > PAGE and tool.offset + tool.size <= len(tool.data)
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(ManifestError, match="not a 64-bit ELF"):
        Tool.load(tmp_path / "script", "/usr/sbin/xl")


class _Memory:
    """A process's code pages at fixed guest-physical addresses; some never faulted in."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = pages  # virtual page -> its bytes (guest-physical = virtual, for the test)

    def translate(self, cr3: int, va: int) -> int:
        if va // PAGE * PAGE not in self.pages:
            raise XenMemoryError("not mapped")
        return va

    def read(self, phys: int, length: int) -> bytes:
        page = phys // PAGE * PAGE
        return self.pages[page][phys - page : phys - page + length]


def _tool(code: bytes, vaddr: int = 0x1000, offset: int = 0x1000) -> Tool:
    data = bytes(offset) + code
    return Tool("/usr/lib/xen-4.17/bin/xenstored", vaddr, offset, len(code), data)


def test_a_process_is_judged_page_by_page_and_a_changed_byte_is_named_by_file_offset() -> None:
    code = bytes(range(256)) * 48  # three pages
    tool = _tool(code)
    base = 0x5555_0000_0000  # where ASLR put it; the file's link address is 0x1000
    pages = {base + i * PAGE: code[i * PAGE : (i + 1) * PAGE] for i in (0, 2)}  # page 1 never ran
    proc = Dom0Process(42, "xenstored", 0, base, base + len(code))
    read, bad = judge_process(_Memory(pages), proc, tool)  # type: ignore[arg-type]
    assert bad == [] and len(read) == 2 * PAGE

    patched = bytearray(pages[base + 2 * PAGE])
    patched[0x10] ^= 0xFF
    pages[base + 2 * PAGE] = bytes(patched)
    _, bad = judge_process(_Memory(pages), proc, tool)  # type: ignore[arg-type]
    assert [(m.path, m.offset, m.length, m.pid) for m in bad] == [
        ("dom0:/usr/lib/xen-4.17/bin/xenstored", tool.offset + 2 * PAGE + 0x10, 1, 42)
    ]


def test_a_process_whose_code_is_another_size_is_a_mismatch_without_reading() -> None:
    tool = _tool(bytes(2 * PAGE))
    proc = Dom0Process(7, "xenstored", 0, 0x4000, 0x4000 + PAGE)
    read, bad = judge_process(_Memory({}), proc, tool)  # type: ignore[arg-type]
    assert read == b"" and len(bad) == 1 and "bytes, the file's" in bad[0].reason


def test_dom0_going_unread_is_a_mismatch_only_after_several_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    async def unreadable(*_: object) -> object:
        raise XenMemoryError("no dom0 kernel page table")

    monkeypatch.setattr(xen_measure, "measure_toolstack", unreadable)
    layout = KernelLayout(0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, b"")
    ref = Dom0Reference(layout, ())
    cache = xen_measure.XenMeasurer.__new__(xen_measure.XenMeasurer)
    cache._dom0_misses, cache.dom0_cr3 = 0, None

    async def rounds() -> list[int]:
        found = []
        for _ in range(xen_measure.DOM0_MISSES + 1):
            reading = await xen_measure._toolstack(None, ref, Path("/nowhere"), cache)  # type: ignore[arg-type]
            found.append(len(reading.mismatches))
        return found

    assert asyncio.run(rounds()) == [0] * (xen_measure.DOM0_MISSES - 1) + [1, 1]
    cache.dom0_read(0x1000)
    assert asyncio.run(rounds())[0] == 0


def test_a_required_xenstored_that_is_not_running_is_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    from smig.aim.xen_dom0 import ToolstackReading

    async def nothing_running(*_: object) -> ToolstackReading:
        return ToolstackReading((), ())

    monkeypatch.setattr(xen_measure, "measure_toolstack", nothing_running)
    ref = Dom0Reference(KernelLayout(0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, b""), (_tool(b"\xc3"),))
    reading = asyncio.run(xen_measure._toolstack(None, ref, Path("/nowhere"), None))  # type: ignore[arg-type]
    assert [m.path for m in reading.mismatches] == [xen_measure.DOM0_TARGET]
    assert "no xenstored runs" in reading.mismatches[0].reason


_XEN_MONITOR = EXAMPLE.replace('# subjects = "xen"\n', 'subjects = "xen"\n').replace(
    '# xen_syms = "/etc/smig/reference/xen-syms"\n', 'xen_syms = "/r/xen-syms"\n'
)


def test_a_monitor_config_names_dom0s_kernel_and_tools() -> None:
    text = _XEN_MONITOR.replace(
        '# dom0_kernel = "/etc/smig/reference/dom0/vmlinuz"\n', 'dom0_kernel = "/r/vmlinuz"\n'
    ).replace("# dom0_tools = {", "dom0_tools = {")
    config = parse_config(text)
    assert config.dom0_kernel == Path("/r/vmlinuz")
    assert config.dom0_tools == (("/usr/lib/xen-4.17/bin/xenstored", Path("/etc/smig/reference/dom0/xenstored")),)
    assert parse_config(_XEN_MONITOR).dom0_kernel is None  # without them, Xen alone is measured


@pytest.mark.parametrize(
    ("lines", "names"),
    [
        ('dom0_kernel = "/r/vmlinuz"\n', "go together"),
        ('dom0_kernel = "/r/vmlinuz"\ndom0_tools = { "xl" = "/r/xl" }\n', "absolute path in dom0"),
        ('dom0_kernel = "/r/vmlinuz"\ndom0_tools = { "/usr/sbin/xl" = "" }\n', "absolute path in dom0"),
    ],
)
def test_every_dom0_mistake_in_a_monitor_config_is_named(lines: str, names: str) -> None:
    text = _XEN_MONITOR.replace('xen_syms = "/r/xen-syms"\n', 'xen_syms = "/r/xen-syms"\n' + lines)
    with pytest.raises(ConfigError, match=names):
        parse_config(text)
    with pytest.raises(ConfigError, match='subjects = "xen" only'):
        parse_config(EXAMPLE.replace("[monitor]\n", "[monitor]\n" + 'dom0_kernel = "/r/v"\ndom0_tools = {}\n', 1))


class _Tables:
    """Page tables of which only ``good`` maps the kernel's export table."""

    def __init__(self, good: int, probe: bytes) -> None:
        self.good, self.probe = good, probe

    def read_virtual(self, cr3: int, va: int, length: int) -> bytes:
        if cr3 != self.good:
            raise XenMemoryError("not mapped")
        return self.probe[:length]


def test_a_dom0_table_found_once_is_used_again_while_it_still_maps_the_kernel() -> None:
    layout = KernelLayout(0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0xFFFF_FFFF_8246_0110, b"\x01" * 16)
    tables = _Tables(0x5000, layout.probe)
    asked: list[int] = []

    async def vcpu() -> int:  # what the outer QEMU shows: a guest's table, then dom0's
        asked.append(1)
        return 0x9000 if len(asked) == 1 else 0x5000

    assert asyncio.run(dom0_cr3(tables, layout, vcpu)) == 0x5000 and len(asked) == 2  # type: ignore[arg-type]
    assert asyncio.run(dom0_cr3(tables, layout, vcpu, hint=0x5000)) == 0x5000 and len(asked) == 2  # type: ignore[arg-type]
    tables.good = 0x7000  # the hint's table was freed and reused: it no longer maps the kernel
    asked.clear()

    async def later() -> int:
        asked.append(1)
        return 0x7000

    assert asyncio.run(dom0_cr3(tables, layout, later, hint=0x5000)) == 0x7000 and asked == [1]  # type: ignore[arg-type]

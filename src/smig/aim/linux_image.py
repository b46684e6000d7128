"""What a monitor needs to know of dom0's Linux kernel, read from the kernel package's own file.

To find dom0's processes from outside, the monitor needs two facts about the kernel dom0 runs:
where ``init_task`` (the head of the task list) is, and where a few fields lie in
``task_struct`` and ``mm_struct``. Both come from the ``vmlinuz`` the image was built from, never
from the running host: the symbol from the kernel's export table (``__ksymtab``; ``init_task``
is exported), the field offsets from its BTF (the type information Debian's kernels carry for
BPF). A PV dom0 is loaded at its link address (the decompressor that would randomise it does not
run under Xen), so the address is the one in the file.
"""

from __future__ import annotations

import lzma
import struct
from dataclasses import dataclass
from pathlib import Path

from smig.aim.elf import Section
from smig.aim.elf import sections as elf_sections
from smig.errors import ManifestError

_XZ_MAGIC = b"\xfd7zXZ\x00"
_BTF_MAGIC = 0xEB9F
_BTF_HEADER = struct.Struct("<HBBIIIII")
PROBE_LEN = 256
_KSYM = struct.Struct("<iii")  # value, name, namespace: offsets from each field (PREL32)

# BTF kinds (include/uapi/linux/btf.h) and how many bytes follow the 12-byte type record.
_STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG = 4, 5, 8, 9, 10, 11, 18
_ALIASES = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


def _trailer(kind: int, vlen: int) -> int:
    per_entry = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # struct, union, enum, func_proto, datasec, enum64
    fixed = {1: 4, 3: 12, 14: 4, 17: 4}  # int, array, var, decl_tag
    return fixed.get(kind, 0) + per_entry.get(kind, 0) * vlen


@dataclass(frozen=True)
class KernelLayout:
    """The facts of one dom0 kernel build a monitor walks its processes by (all in bytes)."""

    init_task: int  # virtual address
    task_tasks: int  # task_struct.tasks (struct list_head)
    task_mm: int  # task_struct.mm (struct mm_struct *)
    task_pid: int  # task_struct.pid
    mm_pgd: int  # mm_struct.pgd (pgd_t *, a kernel virtual address)
    mm_start_code: int  # mm_struct.start_code
    mm_end_code: int  # mm_struct.end_code
    mm_exe_file: int  # mm_struct.exe_file (struct file *: what the process exec'd)
    file_dentry: int  # file.f_path.dentry
    dentry_name: int  # dentry.d_name.name (const char *)
    # The head of the export table, as in the file: it reads back the same only through a page
    # table of this kernel's (nothing rewrites it at boot), which is how its tables are told apart.
    probe_addr: int
    probe: bytes


def vmlinux(bzimage: bytes) -> bytes:
    """The kernel ELF inside an x86 bzImage compressed with xz (Debian's choice).

    Raises ManifestError: no xz payload, or it is not an ELF file."""
    at = bzimage.find(_XZ_MAGIC)
    if at < 0:
        raise ManifestError("the kernel image holds no xz-compressed payload (only xz kernels are read)")
    try:
        out = lzma.LZMADecompressor().decompress(bzimage[at:])
    except lzma.LZMAError as e:
        raise ManifestError(f"the kernel image's payload does not decompress: {e}") from e
    if out[:4] != b"\x7fELF":
        raise ManifestError("the kernel image's payload is not an ELF file")
    return out


def exported_symbol(image: bytes, sections: dict[str, Section], name: str) -> int:
    """The address of an ``EXPORT_SYMBOL``-ed kernel symbol. Raises ManifestError: not exported."""
    strings = sections.get("__ksymtab_strings")
    if strings is None:
        raise ManifestError("the kernel has no __ksymtab_strings")
    for table in ("__ksymtab", "__ksymtab_gpl"):
        if table not in sections:
            continue
        addr, offset, size = sections[table].addr, sections[table].offset, sections[table].size
        for i in range(0, size - _KSYM.size + 1, _KSYM.size):
            value_off, name_off, _ns = _KSYM.unpack_from(image, offset + i)
            name_at = addr + i + 4 + name_off - strings.addr + strings.offset
            end = image.find(b"\0", name_at)
            if image[name_at:end] == name.encode():
                return int(addr + i + value_off)
    raise ManifestError(f"the kernel does not export {name}")


class _Btf:
    def __init__(self, blob: bytes) -> None:
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _BTF_HEADER.unpack_from(blob)
        if magic != _BTF_MAGIC:
            raise ManifestError("the kernel's .BTF is not BTF")
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[tuple[str, int, int, list[tuple[str, int, int]]]] = [("", 0, 0, [])]  # id 0 is void
        at, end = hdr_len + type_off, hdr_len + type_off + type_len
        while at < end:
            name_off, info, size_or_type = struct.unpack_from("<III", blob, at)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            members = []
            if kind in (_STRUCT, _UNION):
                kflag = info >> 31
                for m in range(vlen):
                    m_name, m_type, m_offset = struct.unpack_from("<III", blob, at + 12 + 12 * m)
                    bits = m_offset & 0xFFFFFF if kflag else m_offset
                    members.append((self._name(m_name), m_type, bits))
            self.types.append((self._name(name_off), kind, size_or_type, members))
            at += 12 + _trailer(kind, vlen)

    def _name(self, off: int) -> str:
        return self._strings[off : self._strings.index(b"\0", off)].decode(errors="replace")

    def struct(self, name: str) -> int:
        for i, (n, kind, _s, members) in enumerate(self.types):
            if n == name and kind == _STRUCT and members:
                return i
        raise ManifestError(f"the kernel's BTF has no struct {name}")

    def offset(self, type_id: int, field: str) -> int | None:
        """Byte offset of ``field`` in the struct, looking into anonymous members."""
        for m_name, m_type, bits in self.types[type_id][3]:
            if m_name == field:
                return bits // 8
            if not m_name:
                inner = self._resolve(m_type)
                if self.types[inner][1] in (_STRUCT, _UNION):
                    found = self.offset(inner, field)
                    if found is not None:
                        return bits // 8 + found
        return None

    def _resolve(self, type_id: int) -> int:
        while self.types[type_id][1] in _ALIASES:
            type_id = self.types[type_id][2]
        return type_id

    def field(self, struct_name: str, field: str) -> int:
        found = self.offset(self.struct(struct_name), field)
        if found is None:
            raise ManifestError(f"the kernel's struct {struct_name} has no field {field}")
        return found


def layout(bzimage_path: Path) -> KernelLayout:
    """Raises ManifestError: the file is not a kernel these facts can be read from."""
    try:
        image = vmlinux(bzimage_path.read_bytes())
    except OSError as e:
        raise ManifestError(f"cannot read {bzimage_path}: {e.strerror or e}") from e
    sections = elf_sections(image, str(bzimage_path))
    if ".BTF" not in sections:
        raise ManifestError(f"{bzimage_path} carries no BTF (CONFIG_DEBUG_INFO_BTF)")
    found = sections[".BTF"]
    btf = _Btf(image[found.offset : found.offset + found.size])
    if "__ksymtab" not in sections:
        raise ManifestError(f"{bzimage_path} has no export table (__ksymtab)")
    exports = sections["__ksymtab"]
    return KernelLayout(
        init_task=exported_symbol(image, sections, "init_task"),
        task_tasks=btf.field("task_struct", "tasks"),
        task_mm=btf.field("task_struct", "mm"),
        task_pid=btf.field("task_struct", "pid"),
        mm_pgd=btf.field("mm_struct", "pgd"),
        mm_start_code=btf.field("mm_struct", "start_code"),
        mm_end_code=btf.field("mm_struct", "end_code"),
        mm_exe_file=btf.field("mm_struct", "exe_file"),
        file_dentry=btf.field("file", "f_path") + btf.field("path", "dentry"),
        dentry_name=btf.field("dentry", "d_name") + btf.field("qstr", "name"),
        probe_addr=exports.addr,
        probe=image[exports.offset : exports.offset + min(exports.size, PROBE_LEN)],
    )

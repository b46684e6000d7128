"""Attacks on a hypervisor, for the lab and the tests; every one can be undone.

- ``patch``: change code in a running process through ``/proc/PID/mem`` (in its binary or in a
  chosen library), optionally transient: it restores itself after a given time;
- ``anon-exec``: make a running process map anonymous executable memory (by ptrace);
- ``swap-binary``: replace a hypervisor binary on disk with a modified copy, so the next VM
  started from it runs changed code;
- ``preload``: a library to inject into a new hypervisor process with ``LD_PRELOAD``.

Each applied attack returns a :class:`AttackRecord`: plain data holding what :func:`undo` needs.
By default a patch lands in inert bytes (the zero padding at the end of a code segment), so the
hypervisor keeps running exactly as before while its measured code differs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from smig.aim import elf, procfs
from smig.aim.procfs import MemoryMapping
from smig.errors import AttackError, ProcessGone

KINDS = ("patch", "anon-exec", "swap-binary", "preload", "xen-code", "xen-toolstack")
_PADDING = re.compile(rb"\x00{16,}")


@dataclass(frozen=True)
class AttackRecord:
    """An applied attack, as much as undoing it needs; ``detail`` is kind-specific."""

    id: str
    kind: str
    pid: int
    path: str  # the module, binary or library attacked ("[anon]" for anonymous memory)
    offset: int  # file offset of the change (the address for anonymous memory)
    length: int
    applied_at: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AttackRecord:
        """Raises: AttackError: not a record this version wrote."""
        try:
            return cls(
                id=str(data["id"]),
                kind=str(data["kind"]),
                pid=int(data["pid"]),
                path=str(data["path"]),
                offset=int(data["offset"]),
                length=int(data["length"]),
                applied_at=float(data["applied_at"]),
                detail=dict(data.get("detail", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AttackError(f"not an attack record: {e!r}") from e


def _start_time(pid: int) -> int:
    started = procfs.start_time(pid)
    if started is None:
        raise AttackError(f"no process with PID {pid}")
    return started


def _new_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(4)}"


# -- patching code in a running process ---------------------------------------------------


def code_mapping(pid: int, module: str | None = None) -> MemoryMapping:
    """The first executable file mapping of ``pid`` whose path contains ``module``.

    With no ``module``, the process's own executable.

    Raises:
        AttackError: no such process or mapping.
    """
    try:
        maps = procfs.executable_mappings(pid)
        exe = os.path.realpath(f"/proc/{pid}/exe")
    except (ProcessGone, OSError) as e:
        raise AttackError(f"no process with PID {pid}") from e
    for m in maps:
        if not m.path.startswith("/"):
            continue
        if (module is None and m.path == exe.removesuffix(" (deleted)")) or (module and module in m.path):
            return m
    known = sorted({os.path.basename(m.path) for m in maps if m.path.startswith("/")})
    raise AttackError(f"process {pid} maps no code of {module or exe!r}; it maps: {', '.join(known)}")


def _read(pid: int, address: int, length: int) -> bytes:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            return os.pread(mem.fileno(), length, address)
    except OSError as e:
        raise AttackError(f"cannot read process {pid}'s memory at {address:#x}: {e.strerror or e}") from e


def _write(pid: int, address: int, data: bytes) -> None:
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            os.pwrite(mem.fileno(), data, address)
    except OSError as e:
        raise AttackError(f"cannot write process {pid}'s memory at {address:#x}: {e.strerror or e}") from e


def inert_offset(pid: int, m: MemoryMapping, length: int) -> int:
    """An offset into ``m`` whose bytes are never executed: inside the zero padding at its end.

    Raises:
        AttackError: the mapping has no padding; name an offset instead.
    """
    data = _read(pid, m.start, m.length)
    runs = list(_PADDING.finditer(data))
    if not runs or runs[-1].end() - runs[-1].start() < length + 8:
        raise AttackError(f"{m.path} has no zero padding to patch safely; pass an explicit --offset")
    run = runs[-1]
    return run.start() + (run.end() - run.start()) // 2


def patch(
    pid: int,
    module: str | None = None,
    offset: int | None = None,
    length: int = 1,
    *,
    mapping: MemoryMapping | None = None,
) -> AttackRecord:
    """Flip ``length`` bytes of code at ``offset`` into ``module``'s first code mapping.

    ``offset`` counts from the start of the mapping; by default it lands in inert padding.
    ``mapping``, found before with :func:`code_mapping`, spares the lookup: the patch is then
    two small accesses to ``/proc/PID/mem`` (what the benchmarks time from).

    Raises:
        AttackError: no such process, module or offset, or the write was refused.
    """
    m = mapping if mapping is not None else code_mapping(pid, module)
    at = inert_offset(pid, m, length) if offset is None else offset
    if not 0 <= at <= m.length - length:
        raise AttackError(f"offset {at:#x} is outside {m.path}'s code mapping (length {m.length:#x})")
    original = _read(pid, m.start + at, length)
    _write(pid, m.start + at, bytes(b ^ 0xFF for b in original))
    return AttackRecord(
        id=_new_id("patch"),
        kind="patch",
        pid=pid,
        path=m.path,
        offset=m.offset + at,
        length=length,
        applied_at=time.time(),
        detail={"address": m.start + at, "original": original.hex(), "start_time": _start_time(pid)},
    )


def transient_patch(pid: int, duration_s: float, module: str | None = None, offset: int | None = None) -> AttackRecord:
    """A patch that is there for ``duration_s`` and then restores itself (this call blocks)."""
    record = patch(pid, module, offset)
    time.sleep(duration_s)
    undo(record)
    return record


# -- anonymous executable memory -----------------------------------------------------------


def anon_exec(pid: int, length: int = 4096) -> AttackRecord:
    """Map anonymous executable memory, filled with breakpoints, into running process ``pid``."""
    from smig.lab import ptrace  # only this attack needs ptrace

    start_time = _start_time(pid)
    address = ptrace.map_anonymous_exec(pid, length, fill=b"\xcc" * 64)
    return AttackRecord(
        id=_new_id("anon-exec"),
        kind="anon-exec",
        pid=pid,
        path="[anon]",
        offset=address,
        length=length,
        applied_at=time.time(),
        detail={"start_time": start_time},
    )


# -- a modified binary on disk ---------------------------------------------------------------


def swap_binary(binary: Path) -> AttackRecord:
    """Replace ``binary`` with a copy whose code differs in one inert byte; keep the original.

    Raises:
        AttackError: not an ELF file with code padding, or it cannot be replaced.
    """
    binary = Path(os.path.realpath(binary))
    backup = binary.with_name(binary.name + ".smig-orig")
    if backup.exists():
        raise AttackError(f"{binary} is already swapped (its original is {backup}); undo that first")
    try:
        segments = elf.executable_segments(binary)
        if not segments:
            raise AttackError(f"{binary} has no code to change")
        seg = segments[0]
        data = bytearray(binary.read_bytes())
        runs = list(_PADDING.finditer(data, seg.offset, min(seg.offset + seg.length, len(data))))
        if not runs:
            raise AttackError(f"{binary} has no zero padding in its code to change safely")
        at = (runs[-1].start() + runs[-1].end()) // 2
        data[at] ^= 0xFF
        staged = binary.with_name(f".{binary.name}.smig-swap")
        staged.write_bytes(bytes(data))
        shutil.copystat(binary, staged)
        os.link(binary, backup)  # the original stays reachable under a second name
        os.replace(staged, binary)
    except OSError as e:
        raise AttackError(f"cannot swap {binary}: {e.strerror or e}") from e
    return AttackRecord(
        id=_new_id("swap-binary"),
        kind="swap-binary",
        pid=0,
        path=str(binary),
        offset=at,
        length=1,
        applied_at=time.time(),
        detail={"backup": str(backup)},
    )


# -- a library to inject ---------------------------------------------------------------------


def preload_library(directory: Path) -> Path:
    """Build (once) the library the ``preload`` attack injects with ``LD_PRELOAD``.

    Raises:
        AttackError: there is no C compiler (``make setup`` installs gcc).
    """
    lib = directory / "libsmig-inject.so"
    if lib.exists():
        return lib
    source = resources.files("smig.lab").joinpath("files/inject.c").read_text()
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "inject.c"
    src.write_text(source)
    try:
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, capture_output=True, text=True
        )
    except FileNotFoundError as e:
        raise AttackError("gcc is not installed; run `make setup`") from e
    except subprocess.CalledProcessError as e:
        raise AttackError(f"cannot build the injected library: {e.stderr.strip()}") from e
    return lib


def preload(library: Path, pid: int) -> AttackRecord:
    """Record that process ``pid`` was started with ``library`` preloaded (undo stops the process)."""
    return AttackRecord(
        id=_new_id("preload"),
        kind="preload",
        pid=pid,
        path=str(library),
        offset=0,
        length=0,
        applied_at=time.time(),
        detail={"start_time": _start_time(pid)},
    )


# -- undo -------------------------------------------------------------------------------------


def _same_process(record: AttackRecord) -> bool:
    try:
        return _start_time(record.pid) == int(record.detail["start_time"])
    except AttackError:
        return False


def undo(record: AttackRecord) -> str:
    """Undo an attack; returns what was done. A process that has since exited needs nothing.

    Raises:
        AttackError: it cannot be undone.
    """
    if record.kind in ("xen-code", "xen-toolstack"):
        from smig.lab import xen_attacks  # it builds on this module

        return xen_attacks.undo(record)
    if record.kind in ("patch", "anon-exec", "preload") and not _same_process(record):
        return f"process {record.pid} is gone; nothing to undo"
    if record.kind == "patch":
        _write(record.pid, int(record.detail["address"]), bytes.fromhex(record.detail["original"]))
        return f"restored {record.length} byte(s) of {record.path} at {record.offset:#x} in process {record.pid}"
    if record.kind == "anon-exec":
        from smig.lab import ptrace

        ptrace.unmap(record.pid, record.offset, record.length)
        return f"unmapped {record.length} bytes at {record.offset:#x} from process {record.pid}"
    if record.kind == "swap-binary":
        backup = Path(record.detail["backup"])
        if not backup.exists():
            raise AttackError(f"the original of {record.path} ({backup}) is gone; reinstall the package")
        os.replace(backup, record.path)
        return f"put the original {record.path} back"
    if record.kind == "preload":
        os.kill(record.pid, 15)
        return f"stopped process {record.pid}, which ran with {record.path} injected"
    raise AttackError(f"unknown attack kind {record.kind!r}; known: {', '.join(KINDS)}")

"""Probes the AIM benchmark (``bench/aim.py``) takes of a QEMU process and of the machine.

The copy-on-write signal alone (:func:`cow_pages`), the page cache and page tables
(:func:`drop_from_page_cache`, :func:`mapped_code_mib`, :func:`paged_in_mib`), timing a call
(:func:`timed`), a tool's output (:func:`stdout_of`), the machine's description (:func:`machine`)
and how busy the rest of it kept while a part ran (:func:`busy_elsewhere`). What SMIG hashes in a
process is :func:`smig.bench.measure.hashed_ranges`.
"""

from __future__ import annotations

import os
import platform
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from importlib.metadata import version
from pathlib import Path

from smig.aim import procfs

# -- a QEMU process --------------------------------------------------------------------------


def drop_from_page_cache(files: Iterable[str]) -> None:
    """Ask the kernel to drop the files' cached pages; pages some process has mapped stay."""
    for path in files:
        with suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def mapped_code_mib(pid: int) -> float:
    """MiB of the process's file-backed code present in its page tables (``Rss:`` in smaps)."""
    kib, current = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = procfs.parse_maps(line)
        if head:
            current = head[0].executable and not head[0].anonymous and not head[0].kernel_page
        elif current and line.startswith("Rss:"):
            kib += int(line.split()[1])
    return kib / 1024


def paged_in_mib() -> float:
    """What the whole machine has read from block devices since boot (``pgpgin``, KiB), in MiB."""
    line = next(x for x in Path("/proc/vmstat").read_text().splitlines() if x.startswith("pgpgin "))
    return int(line.split()[1]) / 1024


def cow_pages(pid: int) -> int:
    """The copy-on-write signal alone: private pages among the process's file-backed code."""
    code = [m for m in procfs.read_maps(pid) if m.executable and m.path.startswith("/")]
    with procfs.PageMap(pid) as pagemap:
        return sum(len(pagemap.private_pages(m)) for m in code)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stdout_of(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


# -- the machine ---------------------------------------------------------------------------


def _busy_s() -> float:
    """CPU time the whole machine spent busy since boot (user, nice, system, irq, softirq), in s."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextmanager
def busy_elsewhere(record: dict[str, float], part: str) -> Iterator[None]:
    """Record how many cores the rest of the machine kept busy while ``part`` ran: every figure
    here shares the CPU with it."""
    busy, own, wall = _busy_s(), _own_s(), time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - wall
        record[part] = max(0.0, (_busy_s() - busy) - (_own_s() - own)) / elapsed


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return {
        "nproc": stdout_of("nproc").strip(),
        "cpu": model,
        "kernel": platform.release(),
        "qemu": stdout_of("qemu-system-x86_64", "--version").splitlines()[0],
        "b3sum": stdout_of("b3sum", "--version").strip(),
        "sha256sum": stdout_of("sha256sum", "--version").splitlines()[0],
        "blake3-py": version("blake3"),
        "hashlib": ssl.OPENSSL_VERSION,
        "python": platform.python_version(),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }

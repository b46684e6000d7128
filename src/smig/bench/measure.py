"""AIM's measurement against ``b3sum`` over the same bytes: how fast SMIG measures one QEMU process.

A bare ``qemu-system-x86_64 -S`` (the code mappings of a guest's QEMU, TCG buffer included) is
measured by SMIG's :class:`~smig.aim.measure.Measurer` with its defaults (BLAKE3, the
copy-on-write check, clean code hashed where it lies). The bytes that measurement hashes are
dumped into one file in /dev/shm, and ``b3sum`` hashes that file: with all its threads (its
default) and with one. The steps are interleaved, each timed once per pass. ``b3sum`` is timed
whole and then net of its process start (the same command over /dev/null); the ratio compares
throughput over the same bytes, SMIG's whole measurement against b3sum's net hashing, so
``ratio_vs_b3sum`` = b3sum net time / SMIG's time. Goal: at least 0.8.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3

from smig.aim import procfs, reference
from smig.aim.hashing import DEFAULT_THREADS
from smig.aim.measure import Measurer
from smig.bench.stats import Progress, Summary, machine, ratio, summary_text
from smig.errors import SmigError
from smig.lab.bare import bare_qemu
from smig.model import Verdict

GOAL_RATIO = 0.8


def hashed_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, length) of what SMIG hashes in a QEMU process: its code but the unreadable
    ``[vsyscall]`` page and the TCG buffer of generated code (its only anonymous code here)."""
    return [
        (m.start, m.length)
        for m in procfs.executable_mappings(pid)
        if m.path != "[vsyscall]" and not (m.anonymous and not m.kernel_page)
    ]


def dump_code(pid: int, directory: str = "/dev/shm") -> str:
    """Write the bytes :func:`hashed_ranges` names into one new file; returns its path."""
    fd, name = tempfile.mkstemp(prefix="smig-bench-code-", suffix=".bin", dir=directory)
    with os.fdopen(fd, "wb") as out, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, length in hashed_ranges(pid):
            chunk = os.pread(mem.fileno(), length, start)
            if len(chunk) != length:
                raise SmigError(f"short read of QEMU's memory at {start:#x}")
            out.write(chunk)
    return name


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _quiet(*argv: str) -> Callable[[], object]:
    return lambda: subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Raises SmigError: QEMU or b3sum missing, or a measurement of the healthy process mismatched."""
    say = progress or (lambda _: None)
    repeats = 10 if quick else 30
    say("building the reference manifest of the installed QEMU")
    manifest = reference.build(reference.installed_qemu_files())
    with bare_qemu() as pid:
        measurer = Measurer(manifest)
        try:
            cold = measurer.measure([pid])  # faults QEMU's code into its page tables
            name = dump_code(pid)
            try:
                size = Path(name).stat().st_size
                try:
                    agrees = subprocess.run(["b3sum", "--no-names", name], capture_output=True, text=True, check=True)
                except (OSError, subprocess.CalledProcessError) as e:
                    raise SmigError(f"b3sum, the baseline, cannot run: {e} (apt-get install b3sum)") from e
                if agrees.stdout.strip() != blake3.blake3(Path(name).read_bytes()).hexdigest():
                    raise SmigError("b3sum and Python's BLAKE3 disagree over the same file")
                steps: dict[str, Callable[[], object]] = {
                    "smig": lambda: measurer.measure([pid]),
                    "b3sum": _quiet("b3sum", name),
                    "b3sum_one_thread": _quiet("b3sum", "--num-threads", "1", name),
                    "b3sum_start": _quiet("b3sum", "/dev/null"),
                }
                for fn in steps.values():
                    fn()
                ms: dict[str, list[float]] = {k: [] for k in steps}
                say(f"timing SMIG's measurement and b3sum over the same {size / 2**20:.1f} MiB, {repeats} passes")
                for _ in range(repeats):
                    for what, fn in steps.items():
                        ms[what].append(_timed(fn))
                final = measurer.measure([pid])
            finally:
                os.unlink(name)
        finally:
            measurer.close()
    if final.verdict is not Verdict.MATCH:
        raise SmigError(f"the healthy QEMU process did not match its reference: {final.mismatches[:3]}")
    s = {k: Summary.of(v) for k, v in ms.items()}
    net = s["b3sum"].median - s["b3sum_start"].median
    net_one = s["b3sum_one_thread"].median - s["b3sum_start"].median
    r = ratio(net, s["smig"].median)
    return {
        "name": "measure",
        "elapsed_ms": round(s["smig"].median, 3),
        "elapsed": s["smig"].to_json(),
        "cold_ms": round(cold.elapsed_ms, 3),
        "bytes": final.bytes,
        "dump_bytes": size,
        "in_place_bytes": final.in_place_bytes,
        "mib_per_s": round(final.bytes / 2**20 / (s["smig"].median / 1000), 1),
        "b3sum_ms": s["b3sum"].to_json(),
        "b3sum_one_thread_ms": s["b3sum_one_thread"].to_json(),
        "b3sum_start_ms": s["b3sum_start"].to_json(),
        "b3sum_net_ms": round(net, 3),
        "b3sum_one_thread_net_ms": round(net_one, 3),
        "ratio_vs_b3sum": r,
        "ratio_vs_b3sum_one_thread": ratio(net_one, s["smig"].median),
        "ratio_vs_b3sum_whole_command": ratio(s["b3sum"].median, s["smig"].median),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": r is not None and r >= GOAL_RATIO,
        "threads": DEFAULT_THREADS,
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    """The figures as a section of docs/BENCHMARKS.md (the CLI prints the same)."""
    s, b, b1, b0 = r["elapsed"], r["b3sum_ms"], r["b3sum_one_thread_ms"], r["b3sum_start_ms"]
    met = "met" if r["meets_goal"] else "not met"
    mib = r["bytes"] / 2**20
    return "\n".join(
        [
            "### AIM: one QEMU process measured, against b3sum over the same bytes",
            "",
            f"{mib:.1f} MiB of code ({r['in_place_bytes'] / 2**20:.1f} MiB hashed where it lies); cold (first) "
            f"measurement {r['cold_ms']:.1f} ms. Median (spread) over the passes, in ms.",
            "",
            "| what | time (ms) | net of process start (ms) | ratio (b3sum net / SMIG) |",
            "|---|---|---|---|",
            f"| SMIG measurement (BLAKE3, copy-on-write check, {r['threads']} threads) | {summary_text(s)} | - | - |",
            f"| b3sum FILE (all threads) | {summary_text(b)} | {r['b3sum_net_ms']:.2f} | {r['ratio_vs_b3sum']} |",
            f"| b3sum --num-threads 1 FILE | {summary_text(b1)} | {r['b3sum_one_thread_net_ms']:.2f} | "
            f"{r['ratio_vs_b3sum_one_thread']} |",
            f"| b3sum /dev/null (process start) | {summary_text(b0)} | - | - |",
            "",
            f"**Goal: at least {r['goal_ratio']}x b3sum (all threads, net): {met}** ({r['ratio_vs_b3sum']}x; "
            f"{r['ratio_vs_b3sum_whole_command']}x against b3sum's whole command).",
        ]
    )

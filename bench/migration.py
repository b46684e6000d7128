"""Live-migration figures: total time and downtime by guest size, load and TLS.

Each case boots fresh guests and migrates each, ``--repeats`` times, with SMIG's defaults
(bandwidth cap chosen by the driver: none under KVM, 128 MiB/s under TCG; 300 ms downtime
limit), and as many times uncapped, measured in the same run. Prints medians with the
min-max spread and the ratio SMIG/baseline; ``--write FILE`` replaces this benchmark's section
of ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/migration.py [--repeats 3] [--quick] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from smig.bench.docs import write_section
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import MigrationParams, VMSpec
from smig.paths import smig_cache
from smig.pki import ensure_local_migration_tls

UNCAPPED = 0.0
SECTION = "migration"


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mbps: int
    tls: bool

    @property
    def label(self) -> str:
        load = f"dirty {self.dirty_mbps} MiB/s" if self.dirty_mbps else "idle"
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib >= 1024 else f"{self.memory_mib} MiB"
        return f"{size}, {load}, {'TLS' if self.tls else 'plain'}"


@dataclass(frozen=True)
class Result:
    case: Case
    smig_total: list[int]
    smig_down: list[int]
    base_total: list[int]
    base_down: list[int]
    again_total: list[int]


def _fmt(values: list[int]) -> str:
    return f"{statistics.median(values):.0f} ({min(values)}-{max(values)})"


async def _first_moves(driver: QemuDriver, spec: VMSpec, params: MigrationParams, moves: int) -> list[tuple[int, int]]:
    """Boot a fresh guest and migrate it ``moves`` times; (total, downtime) of each move."""
    await driver.launch(spec)
    try:
        await driver.wait_heartbeat(spec.name, 10)
        out: list[tuple[int, int]] = []
        for _ in range(moves):
            s = await live_migrate(driver, driver, spec.name, params)
            out.append((s.total_ms, s.downtime_ms))
        return out
    finally:
        await driver.stop(spec.name)


async def run_case(driver: QemuDriver, case: Case, repeats: int) -> Result:
    """Evacuations move guests that have never moved, and the first move after boot is the slow
    one, so every measured move is the first of a freshly booted guest."""
    spec = VMSpec(
        name=f"bench-{case.memory_mib}-{case.dirty_mbps}", memory_mib=case.memory_mib, dirty_mbps=case.dirty_mbps
    )
    smig = MigrationParams(tls=case.tls, timeout_s=120)
    base = MigrationParams(tls=case.tls, bandwidth_mibps=UNCAPPED, timeout_s=120)
    st, sd, bt, bd, again = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so drift on the machine hits both alike
        (t1, d1), (t2, _) = await _first_moves(driver, spec, smig, 2)
        st.append(t1)
        sd.append(d1)
        again.append(t2)
        ((tb, db),) = await _first_moves(driver, spec, base, 1)
        bt.append(tb)
        bd.append(db)
    return Result(case, st, sd, bt, bd, again)


def render(results: list[Result], repeats: int, command: str) -> str:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "## Live migration: total time and downtime",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.node()}, {platform.machine()}, {_cpus()} cores, Linux {platform.release()}, {qemu}, "
        "guests under TCG, migration on loopback within one machine.  ",
        f"Each figure: median (min-max) over {repeats} freshly booted guests of the guest's first migration, in ms "
        "(an evacuation moves guests that have never moved). "
        "SMIG = SMIG's defaults (under TCG, as here: QEMU's own 128 MiB/s cap, kept because faster "
        "TCG migrations corrupted busy guests, see below; 300 ms downtime limit); "
        "baseline = the same migration uncapped, measured in the same run. "
        "Ratio = SMIG median / baseline median: the price of the cap. "
        "'SMIG again' is the same guest's second move, for comparison.",
        "",
        "| guest | SMIG total | SMIG downtime | baseline total | baseline downtime | total ratio | SMIG again |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = statistics.median(r.smig_total) / statistics.median(r.base_total)
        lines.append(
            f"| {r.case.label} | {_fmt(r.smig_total)} | {_fmt(r.smig_down)} | {_fmt(r.base_total)} | "
            f"{_fmt(r.base_down)} | {ratio:.2f} | {_fmt(r.again_total)} |"
        )
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    return os.cpu_count() or 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="migrations per case and per setting (default 3)")
    ap.add_argument("--quick", action="store_true", help="256 MiB cases only, 2 repeats")
    ap.add_argument("--write", type=Path, help="replace this benchmark's section in this Markdown file")
    ap.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    args = ap.parse_args()
    repeats = 2 if args.quick else args.repeats
    sizes = [256] if args.quick else [256, 1024]
    cases = [Case(m, d, t) for m in sizes for d in (0, 50) for t in (False, True)]
    command = ".venv/bin/python bench/migration.py " + " ".join(sys.argv[1:])

    async def go() -> list[Result]:
        with tempfile.TemporaryDirectory(prefix="smig-b") as home:
            tls = ensure_local_migration_tls(Path(home))
            driver = QemuDriver(QemuConfig(home=Path(home), cache=smig_cache(), tls=tls))
            out = []
            for case in cases:
                print(f"… {case.label}", file=sys.stderr, flush=True)
                out.append(await run_case(driver, case, repeats))
            return out

    results = asyncio.run(go())
    body = render(results, repeats, command.strip())
    print(body)
    if args.write:
        write_section(args.write, SECTION, body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                [
                    {
                        "case": r.case.label,
                        "smig_total_ms": r.smig_total,
                        "smig_downtime_ms": r.smig_down,
                        "baseline_total_ms": r.base_total,
                        "baseline_downtime_ms": r.base_down,
                        "smig_second_move_total_ms": r.again_total,
                    }
                    for r in results
                ],
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

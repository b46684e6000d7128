"""AIM figures: what measuring a hypervisor costs, and how SMIG's hashing compares with b3sum.

Four parts, each taken in one run so that every ratio divides figures measured side by side:

1. one QEMU process (a bare ``qemu-system-x86_64 -S`` without a guest: the same code mappings as
   a guest's QEMU, TCG buffer included): time and bytes of one measurement, BLAKE3 and SHA-256,
   with and without the copy-on-write check, cold (first round on a fresh process, its code files
   dropped from the page cache) and warm;
2. a host of three real guests (idle, 256 MiB, booted by the QEMU driver in a temporary SMIG
   home), all three measured per round, with clean mappings hashed once per round or per process;
3. hashing throughput over the same bytes: the code one QEMU process maps, dumped to /dev/shm
   and hashed by ``b3sum`` (all threads, one thread), ``sha256sum`` and SMIG's ``Reader``; SMIG's
   measurement from process memory; and the steps of that measurement timed alone;
4. the CPU share of a monitor measuring one QEMU process at mean intervals of 1 s and 0.1 s,
   uncapped and under the default cap.

Prints the figures; writes them raw to ``--json`` (default ``bench/results/aim.json``);
``--write FILE`` replaces this benchmark's section of ``docs/BENCHMARKS.md``.

    .venv/bin/python bench/aim.py [--quick] [--write docs/BENCHMARKS.md] [--json bench/results/aim.json]
"""

# The parts live in modules beside this one: aim_record.py (what a run records), aim_probes.py (probes of a
# process and the machine), aim_processes.py (parts 1 and 2), aim_throughput.py (part 3), aim_monitor.py
# (part 4) and aim_tables.py (the Markdown). This module parses the arguments, runs the parts in order
# and writes what they found.

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from aim_monitor import bench_monitor
from aim_probes import busy_elsewhere, machine
from aim_processes import bench_host, bench_single
from aim_record import Results, Unexpected
from aim_tables import render
from aim_throughput import bench_throughput
from smig.aim import reference
from smig.bench.docs import write_section
from smig.model import HashAlgorithm

SECTION = "aim"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 3 s monitor runs (about a minute)")
    ap.add_argument("--write", type=Path, help="replace this benchmark's section in this Markdown file")
    ap.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results" / "aim.json", help="raw figures"
    )
    args = ap.parse_args()
    quick: bool = args.quick
    command = " ".join([".venv/bin/python bench/aim.py", *sys.argv[1:]])
    odd = Unexpected()
    info = machine()
    print("… building the reference manifests", file=sys.stderr, flush=True)
    files = reference.installed_qemu_files()
    manifests = {a: reference.build(files, algorithm=a) for a in (HashAlgorithm.BLAKE3, HashAlgorithm.SHA256)}
    busy: dict[str, float] = {}
    print("… one QEMU process", file=sys.stderr, flush=True)
    with busy_elsewhere(busy, "one QEMU process"):
        single = bench_single(manifests, 2 if quick else 5, 4 if quick else 10, odd)
    with busy_elsewhere(busy, "three guests (their own CPU included)"):
        host = asyncio.run(bench_host(manifests[HashAlgorithm.BLAKE3], 3, 5 if quick else 20, odd))
    print("… throughput", file=sys.stderr, flush=True)
    with busy_elsewhere(busy, "throughput"):
        throughput = bench_throughput(manifests, 10 if quick else 30, odd)
    seconds = 3.0 if quick else 10.0
    with busy_elsewhere(busy, "monitor"):
        monitor = bench_monitor(manifests[HashAlgorithm.BLAKE3], seconds, 1 if quick else 3, odd)
    results = Results(
        command=command,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        quick=quick,
        machine=info,
        single=single,
        host=host,
        throughput=throughput,
        monitor=monitor,
        monitor_seconds=seconds,
        busy_elsewhere=busy,
        unexpected=odd.notes,
    )
    body = render(results)
    print(body)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(asdict(results), indent=2) + "\n")
    if args.write:
        write_section(args.write, SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a guest survive live migration? Crash counts by bandwidth cap, under this machine's
accelerator.

Boots ``--trials`` fresh guests writing ``--dirty-mbps`` MiB/s, migrates each once per
bandwidth setting, and counts the guests that stopped sending heartbeats afterwards (under
TCG on QEMU 7.2 a crashed guest panics and QEMU exits). Settings are MiB/s, ``0`` for no cap.

    .venv/bin/python bench/migration_safety.py [--trials 20] [--dirty-mbps 50] [--bandwidth 0 128] [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

from smig.errors import SmigError
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.model import MigrationParams, VMSpec
from smig.paths import smig_cache
from smig.pki import ensure_local_migration_tls


async def trial(driver: QemuDriver, dirty: int, mibps: float, tls: bool) -> tuple[bool, int]:
    """One fresh guest, one migration: (survived, total_ms)."""
    name = "safety"
    await driver.launch(VMSpec(name=name, memory_mib=256, dirty_mbps=dirty))
    try:
        before = await driver.wait_heartbeat(name, 10)
        stats = await live_migrate(driver, driver, name, MigrationParams(bandwidth_mibps=mibps, tls=tls))
        after = await driver.wait_heartbeat(name, 3, after=before.counter if before else -1)
        again = await driver.wait_heartbeat(name, 3, after=after.counter) if after else None
        return again is not None, stats.total_ms
    finally:
        with contextlib.suppress(SmigError):
            await driver.stop(name)


async def run(trials: int, dirty: int, settings: list[float], tls: bool) -> dict[float, tuple[int, list[int]]]:
    out: dict[float, tuple[int, list[int]]] = {s: (0, []) for s in settings}
    with tempfile.TemporaryDirectory(prefix="smig-s") as home:
        creds = ensure_local_migration_tls(Path(home))
        driver = QemuDriver(QemuConfig(home=Path(home), cache=smig_cache(), tls=creds))
        for i in range(trials):
            for s in settings:  # interleaved, so the machine's drift hits every setting alike
                ok, ms = await trial(driver, dirty, s, tls)
                crashed, times = out[s]
                out[s] = (crashed + (not ok), [*times, ms])
                print(
                    f"trial {i + 1}/{trials}, cap {s or 'none'}: {'ok' if ok else 'GUEST CRASHED'} ({ms} ms)",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--dirty-mbps", type=int, default=50)
    ap.add_argument("--bandwidth", type=float, nargs="+", default=[0.0, 128.0], help="MiB/s; 0 = no cap")
    ap.add_argument("--tls", action="store_true", help="migrate over mutual TLS")
    args = ap.parse_args()
    results = asyncio.run(run(args.trials, args.dirty_mbps, args.bandwidth, args.tls))
    print("| cap (MiB/s) | guests crashed after one migration | median total (ms) |\n|---|---|---|")
    for s, (crashed, times) in results.items():
        times.sort()
        print(f"| {s or 'none'} | {crashed}/{args.trials} | {times[len(times) // 2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

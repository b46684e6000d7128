"""Parts 1 and 2 of the AIM benchmark (``bench/aim.py``): measuring QEMU processes.

:func:`bench_single` times one measurement of one bare QEMU process, cold and warm, BLAKE3 and
SHA-256, with and without the copy-on-write check; :func:`bench_host` boots three idle guests and
measures all their QEMU processes per round, clean mappings shared across processes or not.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from functools import partial
from pathlib import Path

from aim_probes import cow_pages, drop_from_page_cache, mapped_code_mib, paged_in_mib, timed
from aim_record import HostCase, HostResult, SingleCase, Unexpected
from smig.aim import procfs
from smig.aim.measure import Measurer
from smig.aim.reference import Manifest
from smig.errors import VMNotFound
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.lab.bare import bare_qemu
from smig.model import HashAlgorithm, VMInfo, VMSpec
from smig.paths import smig_cache

# -- 1. one QEMU process ---------------------------------------------------------------------


def bench_single(
    manifests: dict[HashAlgorithm, Manifest], repeats: int, warm: int, odd: Unexpected
) -> list[SingleCase]:
    """Per repeat and setting: a fresh QEMU, its code files dropped from the page cache, one cold
    round and ``warm`` warm ones. Settings rotate each repeat, so drift on the machine hits all alike.

    Without the check is ``cow_check=False, share_clean=False``: with one process sharing saves
    nothing, and only so is ``/proc/PID/pagemap`` not read at all.
    """
    settings = [(a, cow) for a in (HashAlgorithm.BLAKE3, HashAlgorithm.SHA256) for cow in (True, False)]
    code = sorted(manifests[HashAlgorithm.BLAKE3].modules)
    cold: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    hot: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    mapped: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    disk: dict[tuple[HashAlgorithm, bool], list[float]] = {s: [] for s in settings}
    nbytes: dict[tuple[HashAlgorithm, bool], int] = {}
    for r in range(repeats):
        for i in range(len(settings)):
            algorithm, cow = setting = settings[(i + r) % len(settings)]
            measurer = Measurer(manifests[algorithm], cow_check=cow, share_clean=cow)
            with bare_qemu() as pid:
                drop_from_page_cache(code)
                mapped[setting].append(mapped_code_mib(pid))
                before = paged_in_mib()
                m = odd.check("one QEMU process, cold", measurer.measure([pid]))
                disk[setting].append(paged_in_mib() - before)
                cold[setting].append(m.elapsed_ms)
                nbytes[setting] = m.bytes
                for _ in range(warm):
                    m = odd.check("one QEMU process, warm", measurer.measure([pid]))
                    hot[setting].append(m.elapsed_ms)
    return [
        SingleCase(a.value, cow, nbytes[(a, cow)], cold[(a, cow)], hot[(a, cow)], mapped[(a, cow)], disk[(a, cow)])
        for a, cow in settings
    ]


# -- 2. three guests on one host -------------------------------------------------------------


async def _launch_all(driver: QemuDriver, specs: list[VMSpec]) -> list[VMInfo]:
    """Boot the guests side by side; every launch finishes (or cleans up) before this returns."""
    done = await asyncio.gather(*(driver.launch(s) for s in specs), return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return [d for d in done if isinstance(d, VMInfo)]


async def bench_host(manifest: Manifest, guests: int, rounds: int, odd: Unexpected) -> HostResult:
    """Boot ``guests`` idle guests and measure all their QEMU processes per round, sharing clean
    mappings across processes or not, the two settings interleaved round by round."""
    specs = [VMSpec(name=f"aim-bench-{i}", memory_mib=256, dirty_mbps=0) for i in range(guests)]
    with tempfile.TemporaryDirectory(prefix="smig-aim-bench-") as home:
        driver = QemuDriver(QemuConfig(home=Path(home), cache=smig_cache()))
        try:
            print(f"… booting {guests} guests", file=sys.stderr, flush=True)
            infos = await _launch_all(driver, specs)
            pids = [i.pid for i in infos]
            measurers = {share: Measurer(manifest, share_clean=share) for share in (True, False)}
            first = odd.check("three guests, first round", measurers[True].measure(pids)).elapsed_ms
            times: dict[bool, list[float]] = {True: [], False: []}
            sizes: dict[bool, list[int]] = {True: [], False: []}
            for r in range(rounds):
                for share in (True, False) if r % 2 == 0 else (False, True):
                    m = odd.check("three guests", measurers[share].measure(pids))
                    if len(m.pids) != guests:
                        odd.notes.append(f"three guests: only {len(m.pids)} measured in a round (gone: {m.gone})")
                    times[share].append(m.elapsed_ms)
                    sizes[share].append(m.bytes)
            cases = [HostCase(s, times[s], sizes[s]) for s in (True, False)]
            maps = [timed(partial(procfs.read_maps, pid)) * 1000 for _ in range(rounds) for pid in pids]
            smaps = [timed(partial(cow_pages, pid)) * 1000 for _ in range(rounds) for pid in pids]
            return HostResult(guests, 256, infos[0].accel.value, first, cases, maps, smaps)
        finally:
            for spec in specs:
                try:
                    await driver.stop(spec.name)
                except VMNotFound:
                    pass  # never launched, or its launch cleaned up after itself
                except Exception as e:  # keep stopping the others
                    print(f"! could not stop {spec.name}: {e}", file=sys.stderr, flush=True)

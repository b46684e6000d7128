"""The monitor on real QEMU: signed reports that the verifier accepts once, transient patches
caught as often as the randomised schedule predicts, and no false alarm while VMs come and go."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from smig.aim import reference
from smig.aim.keys import generate_key
from smig.aim.measure import Measurer
from smig.aim.monitor import Monitor, Observation, Subject
from smig.aim.reference import Manifest
from smig.aim.report import verify_report
from smig.aim.schedule import Schedule, detection_probability
from smig.errors import ReportRejected
from smig.hypervisor.migration import live_migrate
from smig.hypervisor.qemu import QemuDriver
from smig.lab import attacks
from smig.lab.bare import bare_qemu
from smig.model import MigrationParams, Mismatch, Transport, Verdict, VMSpec
from tests.helpers import qemu_pids

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return reference.build(reference.installed_qemu_files())


def _run(monitor: Monitor, subject: Subject, rounds: int) -> list[Observation]:
    seen: list[Observation] = []
    asyncio.run(monitor.run(subject, seen.append, rounds=rounds))
    return seen


def test_reports_are_signed_fresh_and_accepted_once(home: Path, manifest: Manifest) -> None:
    key = generate_key()
    monitor = Monitor("h2", key, Measurer(manifest), Schedule(mean_interval_s=0.05))
    try:
        with bare_qemu(marker_dir=home) as pid:
            subject = Subject("h1", lambda: [pid], files=False)
            healthy = _run(monitor, subject, 3)
            record = attacks.patch(pid, "libz")
            tampered = _run(monitor, subject, 1)
    finally:
        monitor.close()
    keys = {"h2": key.public_key()}
    assigned = {"h1": ["h2", "h3"]}
    last: dict[tuple[str, str], int] = {}
    for obs in [*healthy, *tampered]:
        report = verify_report(
            obs.signed, keys=keys, assigned=assigned, last_sequence=last, now=time.time(), max_age_s=5, max_skew_s=1
        )
        last[("h2", "h1")] = report.sequence
    assert [o.report.verdict for o in healthy] == [Verdict.MATCH] * 3
    [hit] = [x for x in tampered[0].report.mismatches if "differs" in x.reason]
    assert hit.path == record.path and hit.offset <= record.offset < hit.offset + hit.length
    with pytest.raises(ReportRejected) as replay:
        verify_report(
            healthy[0].signed,
            keys=keys,
            assigned=assigned,
            last_sequence=last,
            now=time.time(),
            max_age_s=5,
            max_skew_s=1,
        )
    assert replay.value.reason == "out-of-order"


_ATTACKER = """
import json, random, sys, time
from smig.lab import attacks
from smig.lab.bare import bare_qemu
pid, duration, horizon = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
rng, windows, end = random.Random(7), [], time.monotonic() + horizon
while time.monotonic() < end:
    time.sleep(rng.uniform(0.2, 0.4))
    record = attacks.patch(pid)
    t0 = time.monotonic()
    time.sleep(duration)
    attacks.undo(record)
    windows.append((t0, time.monotonic()))
print(json.dumps(windows))
"""


def test_transient_patches_are_caught_as_often_as_the_schedule_predicts(home: Path, manifest: Manifest) -> None:
    schedule = Schedule(mean_interval_s=0.2, jitter=0.5)
    # Full hashes only: the copy-on-write signal would keep every patched page visible for good.
    monitor = Monitor(
        "h2", generate_key(), Measurer(manifest, cow_check=False), schedule, max_cpu_share=1.0, clock=time.monotonic
    )
    measured: list[tuple[float, float, bool]] = []
    try:
        with bare_qemu(marker_dir=home) as pid:
            attacker = subprocess.Popen(
                [sys.executable, "-c", _ATTACKER, str(pid), "0.05", "30"], stdout=subprocess.PIPE, text=True
            )
            subject = Subject("h1", lambda: [pid], files=False)
            stop = asyncio.Event()

            def emit(o: Observation) -> None:
                measured.append((o.report.started_at, o.report.ended_at, o.report.verdict is Verdict.MISMATCH))
                if attacker.poll() is not None:
                    stop.set()

            asyncio.run(monitor.run(subject, emit, stop=stop))
            windows = json.loads(attacker.communicate(timeout=10)[0])
    finally:
        monitor.close()
    caught = sum(any(bad and s <= t1 and e >= t0 for s, e, bad in measured) for t0, t1 in windows)
    false_alarms = sum(bad and not any(s <= t1 and e >= t0 for t0, t1 in windows) for s, e, bad in measured)
    n = len(windows)
    width = sum(t1 - t0 for t0, t1 in windows) / n
    predicted = detection_probability(width, schedule)
    sigma = (predicted * (1 - predicted) / n) ** 0.5
    assert n >= 60 and false_alarms == 0
    # Tolerance: 4 binomial standard deviations of the prediction.
    assert abs(caught / n - predicted) <= 4 * sigma, f"caught {caught}/{n}, predicted {predicted:.3f} ± {sigma:.3f}"


def test_no_false_alarm_in_a_thousand_rounds_while_vms_launch_migrate_and_stop(
    driver: QemuDriver, home: Path, manifest: Manifest
) -> None:
    done = threading.Event()
    events: list[str] = []
    failures: list[BaseException] = []

    async def churn() -> None:
        n = 0
        while not done.is_set():
            await driver.launch(VMSpec(name=f"churn{n}", memory_mib=128, dirty_mbps=5))
            events.append(f"launched churn{n}")
            if n:
                await driver.stop(f"churn{n - 1}")
                events.append(f"stopped churn{n - 1}")
            await live_migrate(driver, driver, f"churn{n}", MigrationParams(transport=Transport.UNIX))
            events.append(f"migrated churn{n}")
            n += 1

    def churner() -> None:
        try:
            asyncio.run(churn())
        except BaseException as e:  # surfaced by the assertion below
            failures.append(e)

    thread = threading.Thread(target=churner)
    thread.start()
    measurer = Measurer(manifest)
    seen: set[int] = set()
    gone = 0
    mismatches: list[Mismatch] = []
    try:
        for _ in range(1000):
            result = measurer.measure(qemu_pids(str(home)))
            seen.update(result.pids)
            gone += len(result.gone)
            mismatches += result.mismatches
            time.sleep(0.005)
    finally:
        done.set()
        thread.join(timeout=120)
    assert not failures, failures
    assert mismatches == []
    assert len(seen) >= 4, f"the churn must have started several QEMUs beside the monitor: {events}"
    assert any(e.startswith("migrated") for e in events)


def test_blake3s_threads_hash_at_the_monitors_priority_whoever_started_them() -> None:
    # A fresh interpreter whose main thread (normal priority) starts BLAKE3's native pool first,
    # as building a reference manifest does; after `lower_native_threads`, which every measurement
    # calls, that pool hashes at the monitor's lower priority, and the main thread keeps its own.
    script = """
import os, threading, blake3
from smig.aim import monitor
blake3.blake3(b"x" * (8 << 20), max_threads=blake3.blake3.AUTO).digest()
def nice(t): return os.getpriority(os.PRIO_PROCESS, t)
ours = {t.native_id for t in threading.enumerate()}
native = [int(t) for t in os.listdir("/proc/self/task") if int(t) not in ours]
assert native and all(nice(t) == 0 for t in native), "BLAKE3 started its pool at normal priority"
monitor.lower_native_threads()
assert all(nice(t) == monitor.MEASURE_NICE for t in native), [nice(t) for t in native]
assert nice(threading.get_native_id()) == 0, "the main thread keeps its priority"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr

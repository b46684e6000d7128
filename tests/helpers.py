"""Shared helpers for tests that run real QEMU guests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from smig.hypervisor.qemu import QemuDriver
from smig.model import HashAlgorithm, Heartbeat, Mismatch, Report, Verdict


def qemu_pids(marker: str) -> list[int]:
    """PIDs of QEMU processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and marker.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


async def rising_heartbeat(driver: QemuDriver, name: str, *, after: int = -1, timeout_s: float = 10.0) -> Heartbeat:
    """Wait for a heartbeat from ``name`` counting past ``after``, and for one more after it.

    Returns the later of the two, proving the guest is running (not just that a line exists).
    """
    first = await driver.wait_heartbeat(name, timeout_s, after=after)
    assert first is not None, f"{name} sent no heartbeat past {after} within {timeout_s}s"
    second = await driver.wait_heartbeat(name, timeout_s, after=first.counter)
    assert second is not None, f"{name}'s heartbeat stopped at {first.counter}"
    return second


def region_report(
    monitor: str, subject: str, sequence: int, at: float, verdict: Verdict = Verdict.MATCH, **changes: Any
) -> Report:
    """A monitor's report on ``subject`` that ended at ``at`` (``changes`` override any field); a
    MISMATCH names one patched range of the QEMU binary (a verdict must agree with its mismatches)."""
    report = Report(
        subject=subject,
        monitor=monitor,
        sequence=sequence,
        started_at=at - 0.1,
        ended_at=at,
        algorithm=HashAlgorithm.BLAKE3,
        root="ab" * 32,
        verdict=verdict,
        targets=(),
        mismatches=(Mismatch("/usr/bin/qemu-system-x86_64", 4096, 16, "code differs", 42),)
        if verdict is Verdict.MISMATCH
        else (),
        measured_bytes=1 << 20,
    )
    return dataclasses.replace(report, **changes)

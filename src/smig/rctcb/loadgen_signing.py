"""Signing an ingest run's reports: the request bodies each agent sends, signed before timing.

:class:`Work` is one agent's batches to sign; :func:`sign_works` turns them into request bodies
(in this process, or in worker processes: it is module-level so that they can run it);
:func:`sign_all` chooses between the two and :func:`count_reports` counts what is to be signed.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.report import sign_report
from smig.aim.report_batch import sign_batch
from smig.model import HashAlgorithm, Report, TargetDigest, Verdict

SIGN_IN_PROCESS = 20_000  # reports; more are signed by a process per core


@dataclass(frozen=True)
class Work:
    """One agent's batches to sign: each is (first sequence, ended_at of each of its rounds)."""

    key: bytes
    monitor: str
    subjects: tuple[str, ...]
    batches: tuple[tuple[int, tuple[float, ...]], ...]
    targets: int
    one_signature: bool


def sign_works(works: Sequence[Work]) -> list[list[bytes]]:
    """Request bodies ``{"reports": [...]}``, per agent and batch. Module-level: runs in worker processes."""
    out = []
    for w in works:
        key = Ed25519PrivateKey.from_private_bytes(w.key)
        targets = tuple(
            TargetDigest(f"pid:1:/usr/lib/x86_64-linux-gnu/lib{i}.so@0x0+0x10000", f"{i:02x}" * 32)
            for i in range(w.targets)
        )
        bodies = []
        for first, ends in w.batches:
            reports = [
                Report(
                    subject, w.monitor, first + j, ended - 0.25, ended, HashAlgorithm.BLAKE3,
                    "ab" * 32, Verdict.MATCH, targets, (), 64 << 20,
                )
                for j, ended in enumerate(ends)
                for subject in w.subjects
            ]  # fmt: skip
            if w.one_signature:
                wires = [json.dumps(sign_batch(reports, key).to_wire().decode())]
            else:
                wires = [json.dumps(sign_report(report, key).to_wire().decode()) for report in reports]
            bodies.append(('{"reports":[' + ",".join(wires) + "]}").encode())
        out.append(bodies)
    return out


async def sign_all(works: list[Work]) -> list[list[bytes]]:
    """Sign in this process when there is little to sign, else in one process per core."""
    cpus = os.cpu_count() or 1
    if count_reports(works) <= SIGN_IN_PROCESS or cpus == 1:
        return sign_works(works)
    n = cpus * 4
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=cpus, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = await asyncio.gather(*(loop.run_in_executor(pool, sign_works, works[i::n]) for i in range(n)))
    signed: list[list[bytes]] = [[] for _ in works]
    for i, part in enumerate(done):
        signed[i::n] = part
    return signed


def count_reports(works: Sequence[Work]) -> int:
    return sum(len(w.subjects) * len(ends) for w in works for _, ends in w.batches)

"""The RC-TCB's reaction: from a host turning UNTRUSTED to the first migration command it sends.

What the service does in that time, run in process on its real parts: the region (an SQLite IVT
in a directory on disk, ``synchronous=FULL``) ingests a signed mismatch report under the
``immediate`` policy and commits UNTRUSTED; its ``Evacuate`` effect goes to the service's
evacuation loop (:class:`~smig.rctcb.evacuations.Evacuations`), which plans the evacuation
(placement over the IVT), writes the orders, and takes the first step: asking the first target's
agent to prepare. The agents are the in-memory ones of the orchestrator's tests, stamped with the
time of each call; the clock stops at the first ``prepare_incoming``. Each trial is a fresh region
of 10 hosts with ``vms`` guests on the host that falls.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.keys import generate_key, public_key_pem
from smig.aim.report import SignedReport, sign_report
from smig.bench.stats import Summary
from smig.ivt.sqlite import SQLiteStore
from smig.model import HashAlgorithm, Mismatch, PlacedVM, Report, Resources, Verdict
from smig.rctcb.evacuations import Evacuations
from smig.rctcb.fake_agents import FakeRegionAgents
from smig.rctcb.orchestrator import Orchestrator
from smig.rctcb.orders import OrchestratorConfig
from smig.rctcb.placement import PlacementConfig
from smig.rctcb.policy import PolicyConfig, PolicyKind
from smig.rctcb.region import Region, RegionConfig

HOSTS = 10
BAD = "h00"


class _Stamped(FakeRegionAgents):
    """The in-memory agents, noting when the first command of the evacuation arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.first_command: float | None = None
        self.arrived = asyncio.Event()

    def prepare_incoming(self, host: str, vm: PlacedVM, order_id: str) -> str:
        if self.first_command is None:
            self.first_command = time.perf_counter()
            self.arrived.set()
        return super().prepare_incoming(host, vm, order_id)


async def _trial(root: Path, vms: int) -> tuple[float, float]:
    """(ingest ms, UNTRUSTED committed -> first command ms) of one fresh region."""
    store = SQLiteStore(root / "ivt.db")
    try:
        config = RegionConfig(policy=PolicyConfig(kind=PolicyKind.IMMEDIATE))
        region = Region(store, config)
        keys = {f"h{i:02d}": generate_key() for i in range(HOSTS)}
        now = time.time()
        for host, key in keys.items():
            capacity = Resources(16, 16384)
            region.enroll(host, agent_key=public_key_pem(key).decode(), manifest="m", capacity=capacity, now=now,
                          vouched=True)  # fmt: skip
        placed = [PlacedVM(f"vm{i}", BAD, Resources(1, 256)) for i in range(vms)]
        with store.transaction() as tx:
            tx.set_placements(BAD, placed)
        # Every host verified once, so that each is a fresh, eligible target.
        for subject in keys:
            monitor = region.assignment()[subject][0]
            region.ingest(_signed(subject, monitor, keys[monitor], Verdict.MATCH, 1), time.time())
        agents = _Stamped()
        for host in keys:
            agents.add_host(host)
        for vm in placed:
            agents.run(vm)
        orchestrator = Orchestrator(
            region, agents, placement=PlacementConfig(), config=OrchestratorConfig(), clock=time.time
        )
        loop = Evacuations(orchestrator, lambda _: None)
        driving = asyncio.create_task(loop.run())
        await asyncio.sleep(0.05)  # the loop has resumed (nothing) and waits
        accuser = region.assignment()[BAD][0]
        report = _signed(BAD, accuser, keys[accuser], Verdict.MISMATCH, 2)
        t0 = time.perf_counter()
        _, decision = region.ingest(report, time.time())
        untrusted = time.perf_counter()
        loop.on_effects(decision.effects)  # what the API's effect hook does with them
        await asyncio.wait_for(agents.arrived.wait(), 10)
        driving.cancel()
        assert agents.first_command is not None
        return (untrusted - t0) * 1000, (agents.first_command - untrusted) * 1000
    finally:
        store.close()


def _signed(subject: str, monitor: str, key: Ed25519PrivateKey, verdict: Verdict, sequence: int) -> SignedReport:
    now = time.time()
    mismatches = (Mismatch("/usr/bin/qemu-system-x86_64", 0x1000, 1, "code differs from the reference", 1),)
    report = Report(subject, monitor, sequence, now - 0.02, now, HashAlgorithm.BLAKE3, "ab" * 32, verdict, (),
                    mismatches if verdict is Verdict.MISMATCH else (), 1 << 20)  # fmt: skip
    return sign_report(report, key)


def run_reaction(trials: int, vm_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per number of guests on the falling host: the ingest and the reaction, over ``trials``."""
    # Every trial's region announces its host's fall and the evacuation: here that is the point.
    logging.getLogger("smig.rctcb").setLevel(logging.ERROR)
    out = []
    for vms in vm_counts:
        ingest: list[float] = []
        reaction: list[float] = []
        for _ in range(trials):
            with tempfile.TemporaryDirectory(prefix="smig-bench-reaction-") as root:
                a, b = asyncio.run(_trial(Path(root), vms))
            ingest.append(a)
            reaction.append(b)
        s = Summary.of(reaction)
        out.append(
            {
                "vms": vms,
                "trials": trials,
                "ingest_ms": Summary.of(ingest).to_json(),
                "reaction_ms": s.to_json(),
                "p50_ms": round(s.median, 2),
                "p99_ms": round(s.p99, 2),
            }
        )
    return out

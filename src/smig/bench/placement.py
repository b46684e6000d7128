"""Placement: how long planning the evacuation of 1,000 VMs over a 1,000-host IVT takes.

The region (seeded, so every run plans the same one): 1,000 hosts of 64 vCPUs and 256 GiB; 50 of
them turned untrusted, with 20 VMs each to evacuate (the 1,000 evacuees); each of the other 950
trusted, freshly verified and running 8 VMs. VMs take 1-4 vCPUs and 1-8 GiB, one in five belongs
to one of 100 anti-affinity groups, priorities run 0-3. Timed: one :func:`plan_evacuation` of all
1,000 evacuees (what the RC-TCB computes when the hosts turn untrusted), repeated. Baseline, in
the same run: a first-fit placement of the same evacuees (the first eligible host with room, by
host id; no spreading, no anti-affinity, no concurrency limits), the least any placement does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from smig.bench.stats import Progress, Summary, machine, ratio, summary_text
from smig.model import HostRecord, PlacedVM, Resources, TrustState, Verdict, VerifiedMeasurement
from smig.rctcb.placement import Move, PlacementConfig, SendSlots, eligible, plan_evacuation

HOSTS = 1000
SOURCES = 50
VMS_PER_SOURCE = 20
VMS_PER_TARGET = 8
CAPACITY = Resources(64, 256 * 1024)


def region(seed: int = 7, now: float | None = None) -> tuple[dict[str, HostRecord], list[PlacedVM], list[PlacedVM]]:
    """(IVT rows, every placed VM, the evacuees): the region described in the module docstring,
    every trusted host verified at ``now`` (default: the time of the call)."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    rows: dict[str, HostRecord] = {}
    placed: list[PlacedVM] = []
    evacuees: list[PlacedVM] = []
    for i in range(HOSTS):
        host = f"h{i:04d}"
        source = i < SOURCES
        vms = [
            PlacedVM(
                name=f"{host}-vm{j:02d}",
                host=host,
                needs=Resources(rng.choice((1, 2, 4)), 1024 * rng.choice((1, 2, 4, 8))),
                priority=rng.randrange(4),
                anti_affinity=f"group{rng.randrange(100):03d}" if rng.random() < 0.2 else "",
            )
            for j in range(VMS_PER_SOURCE if source else VMS_PER_TARGET)
        ]
        load = Resources(sum(v.needs.vcpus for v in vms), sum(v.needs.memory_mib for v in vms))
        rows[host] = HostRecord(
            host=host, region="bench", address="", agent_key="", manifest="",
            state=TrustState.UNTRUSTED if source else TrustState.TRUSTED, state_since=now,
            capacity=CAPACITY, load=load, verified=VerifiedMeasurement(now, "m", 1, "00", Verdict.MATCH),
        )  # fmt: skip
        placed += vms
        if source:
            evacuees += vms
    return rows, placed, evacuees


def first_fit(evacuees: Sequence[PlacedVM], rows: Mapping[str, HostRecord], now: float) -> dict[str, str]:
    """The baseline: each VM on the first eligible host, by id, with room left for it."""
    targets = sorted(h for h, r in rows.items() if eligible(r, now, PlacementConfig().freshness_s))
    free = {h: rows[h].capacity - rows[h].load for h in targets}
    chosen: dict[str, str] = {}
    for vm in evacuees:
        for h in targets:
            if h != vm.host and vm.needs.fits_in(free[h]):
                free[h] -= vm.needs
                chosen[vm.name] = h
                break
    return chosen


def run(quick: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    say = progress or (lambda _: None)
    repeats = 5 if quick else 20
    rows, placed, evacuees = region()
    now = time.time()
    config = PlacementConfig()
    say(f"planning the evacuation of {len(evacuees)} VMs over {len(rows)} hosts, {repeats} times")
    smig_s: list[float] = []
    base_s: list[float] = []
    plan = None
    for _ in range(repeats):  # interleaved, so that both see the same machine
        t = time.perf_counter()
        plan = plan_evacuation(evacuees, rows, placed, (), now, config)
        smig_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        base = first_fit(evacuees, rows, now)
        base_s.append(time.perf_counter() - t)
    assert plan is not None
    smig = Summary.of([s * 1000 for s in smig_s])
    baseline = Summary.of([s * 1000 for s in base_s])
    targets = {m.target for m in (*plan.start, *plan.waiting)}
    return {
        "name": "placement",
        "hosts": len(rows),
        "evacuees": len(evacuees),
        "placed_vms": len(placed),
        "placed": len(plan.start) + len(plan.waiting),
        "start_now": len(plan.start),
        # Of those, the ones that may send at once; the rest prepare their target meanwhile.
        "send_now": _sending(plan.start, config),
        "no_capacity": len(plan.no_capacity),
        "targets_used": len(targets),
        "plan_ms": smig.to_json(),
        "p50_ms": round(smig.median, 3),
        "p99_ms": round(smig.p99, 3),
        "baseline": "first fit by host id, capacity only",
        "baseline_ms": baseline.to_json(),
        "baseline_placed": len(base),
        "baseline_targets_used": len(set(base.values())),
        "ratio_vs_baseline": ratio(smig.median, baseline.median),
        "goal": "none set; the response goal (UNTRUSTED to first migration command, p99 under 20 ms) includes one plan",
        "machine": machine(),
    }


def markdown(r: dict[str, Any]) -> str:
    """The figures as a section of docs/BENCHMARKS.md (the CLI prints the same)."""
    p, b = r["plan_ms"], r["baseline_ms"]
    return "\n".join(
        [
            "### Placement: evacuating 1,000 VMs over a 1,000-host IVT",
            "",
            f"{r['hosts']} hosts ({r['hosts'] - r['evacuees'] // VMS_PER_SOURCE} trusted, {r['placed_vms']} VMs "
            f"placed); {r['evacuees']} VMs of {r['evacuees'] // VMS_PER_SOURCE} untrusted hosts to evacuate. "
            "Median (spread) over the runs, in ms.",
            "",
            "| placement | time (ms) | VMs placed | targets used | ratio to baseline |",
            "|---|---|---|---|---|",
            f"| SMIG (`plan_evacuation`: spread, anti-affinity, limits) | {summary_text(p)} | {r['placed']} "
            f"({r['start_now']} start now, {r.get('send_now', r['start_now'])} of them sending, "
            f"{r['no_capacity']} no capacity) | {r['targets_used']} | "
            f"{r['ratio_vs_baseline']} |",
            f"| baseline: {r['baseline']} | {summary_text(b)} | {r['baseline_placed']} | "
            f"{r['baseline_targets_used']} | 1.00 |",
            "",
            f"Goal: {r['goal']}.",
        ]
    )


def _sending(started: Sequence[Move], config: PlacementConfig) -> int:
    slots = SendSlots([], config)
    return sum(slots.take(m.source, m.target) for m in started)

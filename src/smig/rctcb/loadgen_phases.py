"""The timed phases of an ingest run: who sends which batch when, and the sending itself.

:func:`plan_sends` plans every client's batches and the stamps of their reports;
:func:`batches_for` pairs the plan with the signed bodies; :func:`time_phase` sends every
client's batches, the clients concurrently, and returns the :class:`~smig.rctcb.loadgen_model.Phase`
figures (latencies, counts, CPU, TLS handshakes).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from smig.rctcb.loadgen_http import Reply
from smig.rctcb.loadgen_model import LoadConfig, Phase
from smig.rctcb.loadgen_region import Agent, Service
from smig.rctcb.loadgen_signing import Work

_AGE_S = 6.0  # how old the newest report of a batch is when it is sent on plan
_SPREAD_S = 4.0  # from the oldest report of a batch to the newest


@dataclass(frozen=True)
class Batch:
    agent: Agent
    body: bytes
    reports: int
    not_before: float  # Unix seconds: earlier, its newest report would be from the future
    items: int  # wire items in the body: 1 when the reports travel as one signed batch


def plan_sends(
    agents: Sequence[Agent], clients: int, firsts: Sequence[int], batches: int, load: LoadConfig, t0: float,
    per_s: float, skew_s: float,
) -> tuple[list[list[tuple[Agent, int, float]]], list[Work]]:  # fmt: skip
    """Who sends what when, and what to sign for it.

    ``batches`` batches, taken round-group by round-group (``firsts``: each group's first sequence)
    over all agents. Per client, in sending order: (agent, first sequence, not before when); an
    agent always goes through the same client, so its batches arrive in sequence order. A client's
    batch is planned for ``t0`` plus the time the reports before it take at ``per_s`` over all
    clients. Its rounds end ``_SPREAD_S`` apart in all, the newest ``_AGE_S`` before the planned
    send: on plan, every report is well inside the window the service accepts, which leaves room
    for the service being slower or faster than planned. A batch is held back only if it would
    otherwise arrive from the future.
    """
    rpb = load.rounds_per_batch
    spacing = _SPREAD_S / max(1, rpb - 1)
    order: list[list[tuple[Agent, int, float]]] = [[] for _ in range(clients)]
    stamps: dict[str, list[tuple[int, tuple[float, ...]]]] = {}
    sent = [0] * clients
    chosen = [(i, first) for first in firsts for i in range(len(agents))][:batches]
    for i, first in chosen:
        agent, c = agents[i], i % clients
        newest = t0 + sent[c] * clients / per_s - _AGE_S
        stamps.setdefault(agent.name, []).append((first, tuple(newest - (rpb - 1 - j) * spacing for j in range(rpb))))
        order[c].append((agent, first, newest - skew_s + 0.5))
        sent[c] += len(agent.subjects) * rpb
    works = [
        Work(a.key.private_bytes_raw(), a.name, a.subjects, tuple(stamps[a.name]), load.targets, load.one_signature)
        for a in agents
        if a.name in stamps
    ]
    return order, works


def batches_for(
    order: list[list[tuple[Agent, int, float]]], works: Sequence[Work], signed: Sequence[Sequence[bytes]]
) -> list[list[Batch]]:
    bodies = {
        (w.monitor, first): body
        for w, per_agent in zip(works, signed, strict=True)
        for (first, _), body in zip(w.batches, per_agent, strict=True)
    }
    size = {w.monitor: len(w.subjects) * len(w.batches[0][1]) for w in works}
    items = {w.monitor: 1 if w.one_signature else size[w.monitor] for w in works}
    return [
        [Batch(a, bodies[a.name, first], size[a.name], gate, items[a.name]) for a, first, gate in mine]
        for mine in order
    ]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def time_phase(path: str, plan: list[list[Batch]], service: Service, *, gate: bool, close: bool) -> Phase:
    """Send every client's batches in order, the clients concurrently; time it all."""
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    counts = Counter[str]()
    waited = [0.0] * len(plan)
    agents = {id(b.agent): b.agent for mine in plan for b in mine}.values()
    handshakes0 = sum(a.client.handshakes for a in agents if a.client is not None)

    async def client(c: int) -> None:
        for b in plan[c]:
            if gate and (delay := b.not_before - time.time()) > 0:
                waited[c] += delay
                await asyncio.sleep(delay)
            assert b.agent.client is not None
            t = time.perf_counter()
            reply = await b.agent.client.post(path, b.body, close=close)
            latencies.append(time.perf_counter() - t)
            _tally(path, reply, b.reports, b.items, counts, reasons)

    cpu0, server0, t0 = time.process_time(), service.cpu_s(), time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for c in range(len(plan)):
            group.create_task(client(c))
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)
    return Phase(
        endpoint=path,
        requests=len(latencies),
        reports=sum(b.reports for mine in plan for b in mine),
        accepted=counts["accepted"],
        rejected=counts["rejected"],
        reasons=dict(reasons),
        wall_s=wall,
        p50_ms=_percentile(ms, 0.50),
        p99_ms=_percentile(ms, 0.99),
        max_ms=ms[-1] if ms else 0.0,
        server_cpu_s=service.cpu_s() - server0,
        client_cpu_s=time.process_time() - cpu0,
        gate_wait_s=sum(waited),
        tls_handshakes=sum(a.client.handshakes for a in agents if a.client is not None) - handshakes0,
    )


def _tally(path: str, reply: Reply, sent: int, items: int, counts: Counter[str], reasons: Counter[str]) -> None:
    try:
        body = json.loads(reply.body)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if path.endswith("/noop"):
        ok = reply.status == 200 and body.get("count") == items  # the no-op counts the body's items
        counts["accepted" if ok else "rejected"] += sent
        if not ok:
            reasons[f"http-{reply.status}"] += sent
        return
    if not isinstance(body.get("results"), list):  # refused as a whole: a 401/413/500, not per report
        counts["rejected"] += sent
        reasons[str(body.get("reason") or f"http-{reply.status}")] += sent
        return
    counts["accepted"] += int(body.get("accepted", 0))
    counts["rejected"] += int(body.get("rejected", 0))
    for r in body["results"]:
        if not r.get("accepted"):
            reasons[str(r.get("reason"))] += 1

"""Load for the RC-TCB: a region's signed reports over the real HTTPS stack, against a no-op baseline.

:func:`run_ingest` builds a region in a temporary SMIG home (its CA; the service's, an operator's
and every host agent's certificates), starts ``smig rctcb serve`` as a child process, so that the
load and the service never share a GIL (as in production), enrols the hosts through the API with
their own Ed25519 keys, and then times two phases over the same request set:

1. ``POST /v1/reports``: every monitor's signed MATCH reports on its subjects, one agent's reports
   over ``rounds_per_batch`` rounds per request, each sent over that agent's own certificate (the
   service refuses an agent's submitting another monitor's reports): verified, judged, committed;
2. ``POST /v1/noop``: the same bodies, read and parsed the same way, judged not at all. The ratio
   of the two is what ingesting costs beyond the bare HTTPS + JSON path.

Reports are signed before timing (signing is the monitors' work, not the RC-TCB's). A report
counts only if it is fresh when it arrives (``max_age_s``) and not from the future
(``max_skew_s``), so a short calibration pass measures first how fast the service ingests; the
timed phase is planned from it and every batch is stamped for the moment the plan sends it. A
client more than the allowed skew ahead of the plan waits (``gate_wait_s``; the figure is then a
lower bound). Hosts are vouched for at enrolment and the policy's freshness window is set longer
than the run, so that the region stays in its steady state (every host TRUSTED) while it is loaded.

Whatever happens, the service is stopped (SIGTERM, then SIGKILL) and the temporary home deleted.

The parts live apart: ``loadgen_model`` (configuration, figures, :class:`BenchError`),
``loadgen_region`` (the CA, the service process, enrolment), ``loadgen_signing`` (the request
bodies, signed) and ``loadgen_phases`` (the plan and the timed sending). This module runs them
in order and re-exports what callers use.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from smig.aim.keys import generate_key
from smig.rctcb.loadgen_model import GOAL_PER_S, QUICK, BenchError, Connections, IngestResult, LoadConfig, Phase
from smig.rctcb.loadgen_phases import Batch, batches_for, plan_sends, time_phase
from smig.rctcb.loadgen_region import (
    OPERATOR,
    Agent,
    Service,
    agent_connection,
    check_assignments,
    enrol,
    host_names,
    make_region_files,
    subjects_of,
    tls_client,
)
from smig.rctcb.loadgen_signing import SIGN_IN_PROCESS, count_reports, sign_all, sign_works

__all__ = [
    "GOAL_PER_S",
    "OPERATOR",
    "QUICK",
    "Agent",
    "BenchError",
    "Connections",
    "IngestResult",
    "LoadConfig",
    "Phase",
    "Service",
    "host_names",
    "run_ingest",
    "subjects_of",
]

_MAX_REPORTS = 600_000  # the timed phase's request bodies stay in memory (~0.5 KiB a report)


async def run_ingest(config: LoadConfig, progress: Callable[[str], None] | None = None) -> IngestResult:
    """Build a region, load the service with it, and return the figures.

    Raises:
        BenchError: the service did not start, a request failed on the way, or the calibration pass
            had reports refused (the harness and the service disagree: nothing worth timing).
        ConfigError: the region's files could not be made.
    """
    say = progress or (lambda _: None)
    home = Path(tempfile.mkdtemp(prefix="smig-bench-", dir=config.root))
    service: Service | None = None
    agents: list[Agent] = []
    try:
        names = host_names(config.hosts)
        say(f"issuing certificates for {len(names)} agents")
        cfg_path, service_config = await asyncio.to_thread(make_region_files, home, names)
        region = service_config.region
        service = Service(home, cfg_path)
        url = f"https://127.0.0.1:{await service.start()}"
        agents = [Agent(n, generate_key()) for n in names]
        say(f"enrolling {len(agents)} hosts over {config.enrol_connections} connections")
        started = time.perf_counter()
        async with tls_client(url, home, OPERATOR, config.enrol_connections) as operator:
            await enrol(operator, agents, config.enrol_connections)
            enrol_s = time.perf_counter() - started
            local = subjects_of(names, region.monitors_per_host)
            await check_assignments(operator, local, sample=20)
        for a in agents:
            a.subjects = local[a.name]
            a.client = agent_connection(url, home, a.name)
        try:
            return await _load(config, service, agents, region.max_skew_s, enrol_s, home, say)
        finally:
            await asyncio.gather(*(a.client.aclose() for a in agents if a.client is not None))
    finally:
        if service is not None:
            service.stop()
        shutil.rmtree(home, ignore_errors=True)


async def _load(
    config: LoadConfig, service: Service, agents: list[Agent], skew_s: float, enrol_s: float, home: Path,
    say: Callable[[str], None],
) -> IngestResult:  # fmt: skip
    c, rpb = config.clients, config.rounds_per_batch
    say(f"opening {len(agents)} agent connections")
    lanes = max(c, 16)  # the handshakes are not timed: open them fast
    warm = [[Batch(a, b'{"reports":["warm-up"]}', 1, 0.0, 1) for a in agents[i::lanes]] for i in range(lanes)]
    connect = await time_phase("/v1/noop", warm, service, gate=False, close=False)
    if connect.rejected:
        raise BenchError(f"opening the agents' connections failed: {connect.reasons}")

    # Calibration: a tenth of the agents, one batch each, stamped now: how fast does it ingest?
    few = agents[: max(min(len(agents), c), len(agents) // 10)]
    order, works = plan_sends(few, c, [1], len(few), config, time.time(), math.inf, skew_s)
    started = time.perf_counter()
    signed = sign_works(works)
    sign_rate = count_reports(works) / (time.perf_counter() - started)
    calibration = await time_phase("/v1/reports", batches_for(order, works, signed), service, gate=False, close=False)
    if calibration.rejected:
        raise BenchError(f"the calibration pass had {calibration.rejected} reports refused: {calibration.reasons}")
    say(f"calibrated at {calibration.per_s:.0f} reports/s; signing the timed phase")

    per_batch = len(agents[0].subjects) * rpb
    if config.rounds is not None:  # every agent, config.rounds rounds
        batches = len(agents) * (config.rounds // rpb)
    else:  # as many batches as fill the timed phase at the calibrated rate
        batches = max(c, min(round(calibration.per_s * config.duration_s / per_batch), _MAX_REPORTS // per_batch))
    groups = -(-batches // len(agents))
    workers = 1 if batches * per_batch <= SIGN_IN_PROCESS else (os.cpu_count() or 1)
    # Stamps assume the phase starts at t0: after signing, at the rate signing went (with room to spare).
    t0 = time.time() + 0.5 + 1.2 * batches * per_batch / (sign_rate * max(1.0, 0.85 * workers))
    firsts = [1 + rpb * g for g in range(1, groups + 1)]  # sequences go on after the calibration's
    order, works = plan_sends(agents, c, firsts, batches, config, t0, calibration.per_s, skew_s)
    started = time.perf_counter()
    signed = await sign_all(works)
    sign_s = time.perf_counter() - started
    plan = batches_for(order, works, signed)
    if (lead := t0 - time.time()) > 0:
        await asyncio.sleep(lead)
    start_lag = time.time() - t0
    if start_lag > 5:
        say(f"signing overran its estimate by {start_lag:.1f}s: the oldest reports may turn stale")
    close = config.connections is Connections.PER_REQUEST
    say(f"timing {count_reports(works)} reports in {sum(map(len, plan))} requests to /v1/reports")
    ingest = await time_phase("/v1/reports", plan, service, gate=True, close=close)
    say("timing the same requests to /v1/noop")
    baseline = await time_phase("/v1/noop", plan, service, gate=False, close=close)
    sample = plan[0][0]
    return IngestResult(
        config=config,
        ingest=ingest,
        baseline=baseline,
        calibration=calibration,
        rounds=groups * rpb,
        monitors=len(works),
        batch_size=sample.reports,
        report_bytes=len(sample.body) // sample.reports,
        enrol_s=enrol_s,
        connect_s=connect.wall_s,
        sign_s=sign_s,
        start_lag_s=start_lag,
        server_pid=service.proc.pid if service.proc else 0,
        home=str(home),
        cpus=os.cpu_count() or 1,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )

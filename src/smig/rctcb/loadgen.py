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
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.report import generate_key, public_key_pem, sign_report
from smig.aim.report_batch import sign_batch
from smig.aim.ring import assign_monitors
from smig.errors import ConfigError, SmigError
from smig.model import HashAlgorithm, Report, TargetDigest, Verdict
from smig.rctcb.ca import Role, client_ssl_context, init_ca, issue_identity
from smig.rctcb.server import ServiceConfig, parse_config

log = logging.getLogger(__name__)

GOAL_PER_S = 10_000.0  # subject verdicts a second: 5,000 hosts, each measured by two monitors every second
OPERATOR = "bench-operator"
_SIGN_IN_PROCESS = 20_000  # reports; more are signed by a process per core
_MAX_REPORTS = 600_000  # the timed phase's request bodies stay in memory (~0.5 KiB a report)
_TIMEOUT_S = 120.0
_AGE_S = 6.0  # how old the newest report of a batch is when it is sent on plan
_SPREAD_S = 4.0  # from the oldest report of a batch to the newest


class BenchError(SmigError):
    """The load could not be generated or measured (the service did not start, a request failed)."""


class Connections(StrEnum):
    """How agents reach the service during the timed phases."""

    PERSISTENT = "persistent"  # one keep-alive TLS connection per agent, opened before timing (production)
    PER_REQUEST = "per-request"  # a new TLS connection, full handshake, for every request


@dataclass(frozen=True)
class LoadConfig:
    """What to load the service with.

    ``rounds`` (a multiple of ``rounds_per_batch``): every monitor sends that many rounds. None: as
    many batches as fill ``duration_s`` at the calibrated rate, round by round over the monitors
    (the last round may be sent by some of them only)."""

    hosts: int = 5000
    clients: int = 4
    rounds_per_batch: int = 10
    duration_s: float = 30.0
    rounds: int | None = None
    connections: Connections = Connections.PERSISTENT
    targets: int = 0  # target digests per report (a real one lists one per measured mapping and file)
    one_signature: bool = True  # each request one batch under one signature, else a signature per report
    enrol_connections: int = 8
    root: Path | None = None  # where the temporary SMIG home is made (default: the system's temp dir)

    def __post_init__(self) -> None:
        if self.hosts < 3:
            raise ConfigError(f"a region needs at least 3 hosts for each to have 2 monitors, not {self.hosts}")
        if self.clients < 1 or self.enrol_connections < 1 or self.rounds_per_batch < 1 or self.targets < 0:
            raise ConfigError("clients, enrol connections and rounds per batch must be at least 1, targets >= 0")
        if self.rounds is not None and (self.rounds < 1 or self.rounds % self.rounds_per_batch):
            raise ConfigError(f"rounds ({self.rounds}) must be a positive multiple of rounds per batch")
        if not self.duration_s > 0:
            raise ConfigError(f"the timed phase must last a positive time, not {self.duration_s}")


QUICK = LoadConfig(hosts=500, duration_s=8.0)


@dataclass(frozen=True)
class Phase:
    """One timed phase: requests sent by all clients, from the first send to the last response."""

    endpoint: str
    requests: int
    reports: int
    accepted: int  # reports the service counted (for /v1/noop: parsed)
    rejected: int
    reasons: dict[str, int]
    wall_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float
    client_cpu_s: float
    gate_wait_s: float
    tls_handshakes: int  # connections the clients opened during the phase

    @property
    def per_s(self) -> float:
        return self.accepted / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True)
class IngestResult:
    config: LoadConfig
    ingest: Phase
    baseline: Phase
    calibration: Phase
    rounds: int  # that the busiest monitor sent in the timed phase
    monitors: int  # that sent reports in the timed phase
    batch_size: int
    report_bytes: int
    enrol_s: float
    connect_s: float
    sign_s: float
    start_lag_s: float  # how late the timed phase started against the plan its stamps assume
    server_pid: int
    home: str
    cpus: int
    date: str

    def to_json(self) -> dict[str, Any]:
        """The figures as ``smig bench ingest --json`` prints them (``verdicts_per_s``, ``p99_ms``,
        ``baseline_per_s`` are a contract)."""
        c, i, b = self.config, self.ingest, self.baseline
        return {
            "verdicts_per_s": round(i.per_s, 1),
            "p50_ms": round(i.p50_ms, 2),
            "p99_ms": round(i.p99_ms, 2),
            "baseline_per_s": round(b.per_s, 1),
            "baseline_p50_ms": round(b.p50_ms, 2),
            "baseline_p99_ms": round(b.p99_ms, 2),
            "ratio": round(i.per_s / b.per_s, 4) if b.per_s else None,
            "goal_per_s": GOAL_PER_S,
            "meets_goal": i.per_s >= GOAL_PER_S and i.rejected == 0,
            "accepted": i.accepted,
            "rejected": i.rejected,
            "rejected_reasons": i.reasons,
            "reports": i.reports,
            "batches": i.requests,
            "batch_size": self.batch_size,
            "rounds": self.rounds,
            "monitors_reporting": self.monitors,
            "rounds_per_batch": c.rounds_per_batch,
            "report_bytes": self.report_bytes,
            "targets_per_report": c.targets,
            "hosts": c.hosts,
            "clients": c.clients,
            "connections": c.connections.value,
            "signing": "one per batch" if c.one_signature else "one per report",
            "duration_s": round(i.wall_s, 3),
            "baseline_duration_s": round(b.wall_s, 3),
            "gate_wait_s": round(i.gate_wait_s, 3),
            "tls_handshakes": i.tls_handshakes,
            "baseline_tls_handshakes": b.tls_handshakes,
            "start_lag_s": round(self.start_lag_s, 3),
            "server_cpu_s": round(i.server_cpu_s, 2),
            "client_cpu_s": round(i.client_cpu_s, 2),
            "baseline_server_cpu_s": round(b.server_cpu_s, 2),
            "baseline_client_cpu_s": round(b.client_cpu_s, 2),
            "calibration_per_s": round(self.calibration.per_s, 1),
            "enrol_s": round(self.enrol_s, 2),
            "connect_s": round(self.connect_s, 2),
            "sign_s": round(self.sign_s, 2),
            "cpus": self.cpus,
            "date": self.date,
            "max_ms": round(i.max_ms, 2),
            "baseline_max_ms": round(b.max_ms, 2),
        }


# -- the region and the service --------------------------------------------------------------


def host_names(n: int) -> list[str]:
    return [f"h{i:05d}" for i in range(n)]


def _config_text(home: Path) -> str:
    ca = home / "rctcb" / "ca"
    # Freshness and grace longer than any run: enrolling thousands of hosts takes longer than the
    # 10 s window, and the load is about a region in its steady state, not one going UNKNOWN.
    return (
        "[rctcb]\n"
        'listen = "127.0.0.1:0"\n'
        f'store = "sqlite:///{home}/rctcb/ivt.sqlite"\n'
        f'ca = "{ca}/ca.pem"\n'
        f'cert = "{ca}/issued/rctcb/cert.pem"\n'
        f'key = "{ca}/issued/rctcb/key.pem"\n'
        "[policy]\n"
        "freshness_s = 86400.0\n"
        "unknown_grace_s = 86400.0\n"
    )


def _make_region_files(home: Path, names: Sequence[str]) -> tuple[Path, ServiceConfig]:
    """The CA, every identity and the configuration file; returns the file and what it says."""
    ca = home / "rctcb" / "ca"
    init_ca(ca, "bench")
    issue_identity(ca, "rctcb", Role.RCTCB)
    issue_identity(ca, OPERATOR, Role.OPERATOR)
    for name in names:
        issue_identity(ca, name, Role.AGENT)
    text = _config_text(home)
    path = home / "rctcb.toml"
    path.write_text(text)
    return path, parse_config(text, source=str(path))


class Service:
    """``smig rctcb serve`` as a child process; its output goes to files, so it never blocks on a pipe."""

    def __init__(self, home: Path, config: Path) -> None:
        self.home, self.config = home, config
        self.proc: subprocess.Popen[bytes] | None = None
        self._out, self._err = home / "serve.out", home / "serve.err"

    def spawn(self) -> None:
        smig = Path(sys.executable).parent / "smig"  # this environment's, whichever way it was started
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(smig), "rctcb", "serve", "--config", str(self.config), "--json"],
                env={**os.environ, "SMIG_HOME": str(self.home)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    async def start(self, timeout_s: float = 60.0) -> int:
        """Start it and return its port. Raises BenchError if it exits or stays silent."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._out.read_text()
            if "\n" in text:
                return int(json.loads(text.splitlines()[0])["port"])
            if self.proc.poll() is not None:
                raise BenchError(f"the RC-TCB exited with {self.proc.returncode} at start: {self.stderr_tail()}")
            await asyncio.sleep(0.05)
        raise BenchError(f"the RC-TCB did not say it listens within {timeout_s:g}s: {self.stderr_tail()}")

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            return self._err.read_text()[-limit:].strip() or "(nothing on stderr)"
        except OSError:
            return "(no stderr)"

    def cpu_s(self) -> float:
        """CPU time the service has used, all its threads (0 once it is gone)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; blocks until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the RC-TCB ignored SIGTERM for %gs; killing it", timeout_s)
            self.proc.kill()
            self.proc.wait()


@dataclass
class Agent:
    """A host's agent: its certificate's connection to the service, its monitor key, its subjects."""

    name: str
    key: Ed25519PrivateKey
    subjects: tuple[str, ...] = ()
    client: httpx.AsyncClient | None = None


def _client(url: str, home: Path, name: str, connections: int = 1) -> httpx.AsyncClient:
    ca = home / "rctcb" / "ca"
    context = client_ssl_context(ca / "issued" / name / "cert.pem", ca / "issued" / name / "key.pem", ca / "ca.pem")
    # An agent sends a batch every few rounds and keeps its TLS session in between, as the service
    # allows (75 s keep-alive); httpx would drop an idle connection after 5 s.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=120.0)
    return httpx.AsyncClient(base_url=url, verify=context, timeout=_TIMEOUT_S, limits=limits, trust_env=False)


async def _enrol(operator: httpx.AsyncClient, agents: Sequence[Agent], workers: int) -> None:
    """Enrol every host, vouched for, over ``workers`` concurrent requests."""
    todo = iter(agents)

    async def worker() -> None:
        for agent in todo:
            body = {
                "host": agent.name,
                "agent_key": public_key_pem(agent.key).decode(),
                "manifest": "5e" * 32,
                "capacity": {"vcpus": 64, "memory_mib": 256 * 1024},
                "region": "bench",
                "vouched": True,
            }
            reply = await operator.post("/v1/hosts", json=body)
            if reply.status_code != 201:
                raise BenchError(f"enrolling {agent.name} answered {reply.status_code}: {reply.text[:500]}")

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())


def subjects_of(names: Sequence[str], k: int) -> dict[str, tuple[str, ...]]:
    """Each monitor's subjects when every host is TRUSTED (the service's own ring, computed here)."""
    subjects: dict[str, list[str]] = {n: [] for n in names}
    for subject, monitors in assign_monitors(names, k).items():
        for m in monitors:
            subjects[m].append(subject)
    return {m: tuple(sorted(s)) for m, s in subjects.items()}


async def _check_assignments(operator: httpx.AsyncClient, local: dict[str, tuple[str, ...]], sample: int) -> None:
    names = sorted(local)
    step = max(1, len(names) // sample)
    for name in names[::step]:
        reply = await operator.get(f"/v1/assignments/{name}")
        if reply.status_code != 200 or tuple(reply.json()["subjects"]) != local[name]:
            raise BenchError(f"the service assigns {name} {reply.text[:300]}, the local ring {list(local[name])}")


# -- reports -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    """One agent's batches to sign: each is (first sequence, ended_at of each of its rounds)."""

    key: bytes
    monitor: str
    subjects: tuple[str, ...]
    batches: tuple[tuple[int, tuple[float, ...]], ...]
    targets: int
    one_signature: bool


def _sign(works: Sequence[_Work]) -> list[list[bytes]]:
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


async def _sign_all(works: list[_Work]) -> list[list[bytes]]:
    """Sign in this process when there is little to sign, else in one process per core."""
    cpus = os.cpu_count() or 1
    if _reports(works) <= _SIGN_IN_PROCESS or cpus == 1:
        return _sign(works)
    n = cpus * 4
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=cpus, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = await asyncio.gather(*(loop.run_in_executor(pool, _sign, works[i::n]) for i in range(n)))
    signed: list[list[bytes]] = [[] for _ in works]
    for i, part in enumerate(done):
        signed[i::n] = part
    return signed


def _reports(works: Sequence[_Work]) -> int:
    return sum(len(w.subjects) * len(ends) for w in works for _, ends in w.batches)


@dataclass(frozen=True)
class _Batch:
    agent: Agent
    body: bytes
    reports: int
    not_before: float  # Unix seconds: earlier, its newest report would be from the future


def _plan(
    agents: Sequence[Agent], clients: int, firsts: Sequence[int], batches: int, load: LoadConfig, t0: float,
    per_s: float, skew_s: float,
) -> tuple[list[list[tuple[Agent, int, float]]], list[_Work]]:  # fmt: skip
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
        _Work(a.key.private_bytes_raw(), a.name, a.subjects, tuple(stamps[a.name]), load.targets, load.one_signature)
        for a in agents
        if a.name in stamps
    ]
    return order, works


def _batches(
    order: list[list[tuple[Agent, int, float]]], works: Sequence[_Work], signed: Sequence[Sequence[bytes]]
) -> list[list[_Batch]]:
    bodies = {
        (w.monitor, first): body
        for w, per_agent in zip(works, signed, strict=True)
        for (first, _), body in zip(w.batches, per_agent, strict=True)
    }
    size = {w.monitor: len(w.subjects) * len(w.batches[0][1]) for w in works}
    return [[_Batch(a, bodies[a.name, first], size[a.name], gate) for a, first, gate in mine] for mine in order]


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


async def _phase(path: str, plan: list[list[_Batch]], service: Service, *, gate: bool, close: bool) -> Phase:
    """Send every client's batches in order, the clients concurrently; time it all."""
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    counts = Counter[str]()
    headers = {"content-type": "application/json", **({"connection": "close"} if close else {})}
    waited = [0.0] * len(plan)
    handshakes = 0

    async def trace(event: str, _: object) -> None:
        nonlocal handshakes
        if event == "connection.start_tls.complete":
            handshakes += 1

    async def client(c: int) -> None:
        for b in plan[c]:
            if gate and (delay := b.not_before - time.time()) > 0:
                waited[c] += delay
                await asyncio.sleep(delay)
            assert b.agent.client is not None
            t = time.perf_counter()
            try:
                reply = await b.agent.client.post(path, content=b.body, headers=headers, extensions={"trace": trace})
            except httpx.HTTPError as e:
                raise BenchError(f"{path} as {b.agent.name} failed: {type(e).__name__}: {e}") from e
            latencies.append(time.perf_counter() - t)
            _tally(path, reply, b.reports, counts, reasons)

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
        tls_handshakes=handshakes,
    )


def _tally(path: str, reply: httpx.Response, sent: int, counts: Counter[str], reasons: Counter[str]) -> None:
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if path.endswith("/noop"):
        # The no-op counts the body's items: one per request when a batch travels under one signature.
        ok = reply.status_code == 200 and body.get("count") in (sent, 1)
        counts["accepted" if ok else "rejected"] += sent
        if not ok:
            reasons[f"http-{reply.status_code}"] += sent
        return
    if not isinstance(body.get("results"), list):  # refused as a whole: a 401/413/500, not per report
        counts["rejected"] += sent
        reasons[str(body.get("reason") or f"http-{reply.status_code}")] += sent
        return
    counts["accepted"] += int(body.get("accepted", 0))
    counts["rejected"] += int(body.get("rejected", 0))
    for r in body["results"]:
        if not r.get("accepted"):
            reasons[str(r.get("reason"))] += 1


# -- the run -----------------------------------------------------------------------------------


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
        cfg_path, service_config = await asyncio.to_thread(_make_region_files, home, names)
        region = service_config.region
        service = Service(home, cfg_path)
        url = f"https://127.0.0.1:{await service.start()}"
        agents = [Agent(n, generate_key()) for n in names]
        say(f"enrolling {len(agents)} hosts over {config.enrol_connections} connections")
        started = time.perf_counter()
        async with _client(url, home, OPERATOR, config.enrol_connections) as operator:
            await _enrol(operator, agents, config.enrol_connections)
            enrol_s = time.perf_counter() - started
            local = subjects_of(names, region.monitors_per_host)
            await _check_assignments(operator, local, sample=20)
        for a in agents:
            a.subjects = local[a.name]
            a.client = _client(url, home, a.name)
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
    warm = [[_Batch(a, b'{"reports":["warm-up"]}', 1, 0.0) for a in agents[i::lanes]] for i in range(lanes)]
    connect = await _phase("/v1/noop", warm, service, gate=False, close=False)
    if connect.rejected:
        raise BenchError(f"opening the agents' connections failed: {connect.reasons}")

    # Calibration: a tenth of the agents, one batch each, stamped now: how fast does it ingest?
    few = agents[: max(min(len(agents), c), len(agents) // 10)]
    order, works = _plan(few, c, [1], len(few), config, time.time(), math.inf, skew_s)
    started = time.perf_counter()
    signed = _sign(works)
    sign_rate = _reports(works) / (time.perf_counter() - started)
    calibration = await _phase("/v1/reports", _batches(order, works, signed), service, gate=False, close=False)
    if calibration.rejected:
        raise BenchError(f"the calibration pass had {calibration.rejected} reports refused: {calibration.reasons}")
    say(f"calibrated at {calibration.per_s:.0f} reports/s; signing the timed phase")

    per_batch = len(agents[0].subjects) * rpb
    if config.rounds is not None:  # every agent, config.rounds rounds
        batches = len(agents) * (config.rounds // rpb)
    else:  # as many batches as fill the timed phase at the calibrated rate
        batches = max(c, min(round(calibration.per_s * config.duration_s / per_batch), _MAX_REPORTS // per_batch))
    groups = -(-batches // len(agents))
    workers = 1 if batches * per_batch <= _SIGN_IN_PROCESS else (os.cpu_count() or 1)
    # Stamps assume the phase starts at t0: after signing, at the rate signing went (with room to spare).
    t0 = time.time() + 0.5 + 1.2 * batches * per_batch / (sign_rate * max(1.0, 0.85 * workers))
    firsts = [1 + rpb * g for g in range(1, groups + 1)]  # sequences go on after the calibration's
    order, works = _plan(agents, c, firsts, batches, config, t0, calibration.per_s, skew_s)
    started = time.perf_counter()
    signed = await _sign_all(works)
    sign_s = time.perf_counter() - started
    plan = _batches(order, works, signed)
    if (lead := t0 - time.time()) > 0:
        await asyncio.sleep(lead)
    start_lag = time.time() - t0
    if start_lag > 5:
        say(f"signing overran its estimate by {start_lag:.1f}s: the oldest reports may turn stale")
    close = config.connections is Connections.PER_REQUEST
    say(f"timing {_reports(works)} reports in {sum(map(len, plan))} requests to /v1/reports")
    ingest = await _phase("/v1/reports", plan, service, gate=True, close=close)
    say("timing the same requests to /v1/noop")
    baseline = await _phase("/v1/noop", plan, service, gate=False, close=close)
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

"""What the ingest load generator is asked for and what it returns.

:class:`LoadConfig` (and :data:`QUICK`, :class:`Connections`) say how to load the service;
:class:`Phase` is one timed phase's figures and :class:`IngestResult` a whole run's, with
:meth:`IngestResult.to_json` the figures ``smig bench ingest --json`` prints; :class:`BenchError`
is what the load generator raises when the load cannot be generated or measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from smig.errors import ConfigError, SmigError

GOAL_PER_S = 10_000.0  # subject verdicts a second: 5,000 hosts, each measured by two monitors every second


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
    # Requests in flight at once. 5,000 agents send independently; with 4 in flight the service
    # sat idle between group commits (bound by the fsync's latency, not by its CPU), and with 16
    # it still did a third of the time: a group commit serves whatever waits, so it needs company.
    clients: int = 64
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

"""The JSON the RC-TCB API speaks: request and response bodies as pydantic models, and the
conversions from SMIG's plain data (IVT rows, policy effects, audit entries) into them."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smig.ivt.base import AuditEntry
from smig.model import HostRecord, TrustState
from smig.rctcb.policy import Effect, StateChanged

MAX_BATCH = 10_000  # reports per POST; the body limit caps the bytes, this caps the work per request

# Host ids travel in URL paths and certificate common names, so they are kept plain.
HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class _In(BaseModel):
    # A misspelt field is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    """Every error response: what went wrong for a person, and one word for a program."""

    error: str
    reason: str


class Capacity(_In):
    vcpus: int = Field(ge=1)
    memory_mib: int = Field(ge=1)


class EnrolIn(_In):
    host: str = Field(pattern=HOST_PATTERN)
    agent_key: str = Field(min_length=1, max_length=16384, description="the agent's Ed25519 public key, PEM")
    manifest: str = Field(min_length=1, max_length=1024, description="digest of the approved reference manifest")
    capacity: Capacity
    region: str = Field("", max_length=256)
    address: str = Field("", max_length=256)
    vouched: bool = Field(False, description="start TRUSTED: the operator checked the host out of band")


class MaintenanceIn(_In):
    on: bool


class TickIn(_In):
    now: float | None = Field(None, description="Unix seconds; the app's clock when absent")


class ReportBatchIn(_In):
    reports: list[str] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="signed reports, or signed batches of one monitor's reports, each as SignedReport.to_wire() text",
    )


class VerifiedOut(BaseModel):
    at: float
    monitor: str
    sequence: int
    root: str
    verdict: str


class HostOut(BaseModel):
    host: str
    region: str
    address: str
    agent_key: str
    manifest: str
    state: TrustState
    state_since: float
    capacity: Capacity
    load: dict[str, int]
    verified_at: float | None
    verified: VerifiedOut | None
    suspected_by: list[str]
    strikes: int
    enrolled_at: float


class HostsOut(BaseModel):
    hosts: list[HostOut]


class EffectOut(BaseModel):
    """One effect of a decision; ``kind`` is the event name on ``/v1/events`` (``trust.changed``...)."""

    kind: str
    host: str | None = None
    subject: str | None = None
    monitor: str | None = None
    old: TrustState | None = None
    new: TrustState | None = None
    at: float | None = None
    reason: str | None = None
    exclude: list[str] | None = None


class DecisionOut(BaseModel):
    row: HostOut
    effects: list[EffectOut]


class TickOut(BaseModel):
    now: float
    previous: float
    effects: list[EffectOut]


class AssignmentOut(BaseModel):
    monitor: str
    subjects: list[str]


class ReportResultOut(BaseModel):
    accepted: bool
    monitor: str
    subject: str | None = None
    sequence: int | None = None
    reason: str | None = None
    message: str | None = None


class ReportsOut(BaseModel):
    results: list[ReportResultOut]
    accepted: int
    rejected: int


class NoopOut(ReportsOut):
    count: int


class AuditEntryOut(BaseModel):
    seq: int
    at: float
    kind: str
    subject: str
    body: dict[str, Any]
    prev: str
    hash: str


class AuditOut(BaseModel):
    entries: list[AuditEntryOut]
    next: int = Field(description="pass as `since` to read on")


class AuditVerifyOut(BaseModel):
    valid: bool
    entries: int
    seq: int | None = None
    error: str | None = None


def host_out(row: HostRecord) -> HostOut:
    v = row.verified
    return HostOut(
        host=row.host,
        region=row.region,
        address=row.address,
        agent_key=row.agent_key,
        manifest=row.manifest,
        state=row.state,
        state_since=row.state_since,
        capacity=Capacity(vcpus=row.capacity.vcpus, memory_mib=row.capacity.memory_mib),
        load={"vcpus": row.load.vcpus, "memory_mib": row.load.memory_mib},
        verified_at=row.verified_at,
        verified=None if v is None else VerifiedOut(**{**asdict(v), "verdict": v.verdict.value}),
        suspected_by=list(row.suspected_by),
        strikes=row.strikes,
        enrolled_at=row.enrolled_at,
    )


def event_name(effect: Effect) -> str:
    """The name of an effect as an event, the same word the audit log files it under."""
    return "trust.changed" if isinstance(effect, StateChanged) else f"effect.{type(effect).__name__.lower()}"


def effect_out(effect: Effect) -> EffectOut:
    fields: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(effect).items()}
    return EffectOut.model_validate({"kind": event_name(effect), **fields})


def effects_out(effects: tuple[Effect, ...] | list[Effect]) -> list[EffectOut]:
    return [effect_out(e) for e in effects]


def audit_entry_out(entry: AuditEntry) -> AuditEntryOut:
    # The store hands bodies out read-only (a mapping proxy); JSON round-tripping gives plain dicts.
    body = json.loads(json.dumps(dict(entry.body)))
    return AuditEntryOut(
        seq=entry.seq,
        at=entry.at,
        kind=entry.kind,
        subject=entry.subject,
        body=body,
        prev=entry.prev,
        hash=entry.hash,
    )


class ManifestIn(_In):
    manifest: str = Field(min_length=1, max_length=1024, description="digest of the reference manifest to approve")


class MigrationsOut(BaseModel):
    orders: list[dict[str, Any]] = Field(description="migration orders as the orchestrator records them")


class CancelIn(_In):
    reason: str = Field("", max_length=1024, description="why, for the audit log")

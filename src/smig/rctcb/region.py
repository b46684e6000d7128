"""The RC-TCB's core over its store: reports in, trust decisions out, every step on the record.

This is where the pure parts meet the IVT. A signed report is checked by
:func:`smig.aim.report.verify_report` against the keys, monitor assignments and last sequences
the IVT holds; a report that passes is handed to the trust policy (:func:`smig.rctcb.policy.decide`);
the rows the policy changed, the report's sequence and the audit entries (the report, every state
change and every effect) are written in **one** transaction. A report that fails changes nothing
but the audit log, which records why it was refused.

The region is the store's only writer, so it keeps the rows in memory (written through on every
commit) and serialises decisions with one lock: a decision reads and writes the rows as one step.
The HTTP API, the service loop and the tests all go through this class; the clock is passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from smig.aim.keys import load_public_key_pem
from smig.aim.report import SignedReport, admit_report, verify_report
from smig.aim.report_batch import authenticate_batch
from smig.aim.ring import assign_monitors
from smig.errors import ConfigError, HostExists, HostNotFound, ReportRejected
from smig.ivt.base import IVTStore, Transaction
from smig.model import HostRecord, Report, Resources, TrustState, frozen_from
from smig.rctcb.policy import (
    Effect,
    Enrolled,
    Event,
    Maintenance,
    Outcome,
    PolicyConfig,
    ReEnrolled,
    Restitch,
    StateChanged,
    Tick,
    Verified,
    decide,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionConfig:
    """How reports are judged: the policy, how old or early a report may be, monitors per host."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    max_age_s: float = 30.0
    max_skew_s: float = 5.0
    monitors_per_host: int = 2

    def __post_init__(self) -> None:
        if self.max_age_s <= 0 or self.max_skew_s < 0:
            raise ConfigError(
                f"max_age_s must be positive and max_skew_s not negative (got {self.max_age_s}, {self.max_skew_s})"
            )
        if self.monitors_per_host < 1:
            raise ConfigError(f"monitors_per_host must be at least 1, not {self.monitors_per_host}")


@dataclass(frozen=True)
class Decision:
    """What one event did: the rows it changed and the effects the service must carry out."""

    rows: Mapping[str, HostRecord]
    effects: tuple[Effect, ...]


@dataclass(frozen=True)
class ReportResult:
    """One report of a batch: ``report`` when it counted, else ``reason`` and ``message`` say why
    not (the reasons of :func:`~smig.aim.report.verify_report`, and ``"wrong-agent"``)."""

    report: Report | None
    monitor: str
    reason: str = ""
    message: str = ""
    effects: tuple[Effect, ...] = ()
    rows: Mapping[str, HostRecord] = field(default_factory=dict)
    item: int = 0  # the index, in the input, of the item (report or batch) this came from


class _Sequences(Mapping[tuple[str, str], int]):
    """The last accepted sequences: those of this batch over the region's, which come from the
    store once per pair and are then kept in memory (the region is the only writer of them)."""

    def __init__(self, region: Region) -> None:
        self._region = region
        self.accepted: dict[tuple[str, str], int] = {}

    def accept(self, monitor: str, subject: str, sequence: int) -> None:
        self.accepted[(monitor, subject)] = sequence

    def __getitem__(self, key: tuple[str, str]) -> int:
        if key in self.accepted:
            return self.accepted[key]
        value = self._region._last_sequence(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise TypeError("the last sequences are looked up one pair at a time")

    def __len__(self) -> int:
        raise TypeError("the last sequences are looked up one pair at a time")


class _Overlay(Mapping[str, HostRecord]):
    """The region's rows under one run's changes, without copying the table per request
    (``collections.ChainMap`` does the same, but its lookups cost more than judging a report)."""

    def __init__(self, base: Mapping[str, HostRecord]) -> None:
        self.base = base
        self.changes: dict[str, HostRecord] = {}  # the rows the run changed: what its transaction writes

    def __getitem__(self, host: str) -> HostRecord:
        changes = self.changes
        return changes[host] if host in changes else self.base[host]

    def get(self, host: str, default: Any = None) -> Any:
        changes = self.changes
        return changes[host] if host in changes else self.base.get(host, default)

    def __contains__(self, host: object) -> bool:
        return host in self.changes or host in self.base

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from (h for h in self.changes if h not in self.base)

    def __len__(self) -> int:
        return len(self.base) + sum(1 for h in self.changes if h not in self.base)

    def update(self, rows: Mapping[str, HostRecord]) -> None:
        self.changes.update(rows)


class _Keys(Mapping[str, Ed25519PublicKey]):
    """Monitors' public keys, parsed from their rows when first asked for (and cached)."""

    def __init__(self, region: Region, rows: Mapping[str, HostRecord]) -> None:
        self._region = region
        self._rows = rows

    def __getitem__(self, host: str) -> Ed25519PublicKey:
        return self._region._key(self._rows[host])

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _assign(rows: Mapping[str, HostRecord], k: int) -> dict[str, tuple[str, ...]]:
    distrusted = [h for h, row in rows.items() if row.state is not TrustState.TRUSTED]
    return assign_monitors(rows, k, not_monitors=distrusted)


def _accepted_body(report: Report) -> dict[str, object]:
    body: dict[str, object] = {
        "monitor": report.monitor,
        "sequence": report.sequence,
        "verdict": report.verdict.value,
        "root": report.root,
        "mismatches": len(report.mismatches),
    }
    if report.mismatches:  # what was found, in the record: where an operator starts looking
        first = report.mismatches[0]
        body["first"] = {"path": first.path, "offset": first.offset, "length": first.length, "reason": first.reason}
    return body


def _effect_subject(effect: Effect) -> str:
    return str(getattr(effect, "host", None) or getattr(effect, "subject", None) or "")


def _effect_body(effect: Effect) -> dict[str, object]:
    body = {k: (v.value if isinstance(v, TrustState) else v) for k, v in asdict(effect).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}


def _effect_kind(effect: Effect) -> str:
    return "trust.changed" if isinstance(effect, StateChanged) else f"effect.{type(effect).__name__.lower()}"


class _Run:
    """One ``ingest_batch``: the rows as the reports so far left them, and what to write."""

    def __init__(self, region: Region, now: float) -> None:
        self.region = region
        self.now = now
        # The region's rows under this run's changes: no copy of the whole table per request.
        self.rows = _Overlay(region._rows)
        self.assigned = region.assignment()
        self.sequences = _Sequences(region)
        self.keys = _Keys(region, self.rows)
        self.audit: list[tuple[str, str, Mapping[str, object]]] = []
        self.results: list[ReportResult] = []

    def reject(self, item: int, monitor: str, e: ReportRejected, *, audit: bool = True) -> None:
        if audit:
            self.audit.append(("report.rejected", e.host or "", {"reason": e.reason, "message": e.message}))
        self.results.append(ReportResult(None, e.host or monitor, e.reason, e.message, item=item))

    def _limits(self) -> dict[str, Any]:
        config = self.region.config
        return {
            "assigned": self.assigned,
            "last_sequence": self.sequences,
            "now": self.now,
            "max_age_s": config.max_age_s,
            "max_skew_s": config.max_skew_s,
        }

    def take_one(self, item: int, signed: SignedReport) -> None:
        try:
            report = verify_report(signed, keys=self.keys, **self._limits())
        except ReportRejected as e:
            self.reject(item, signed.key_id, e)
            return
        self.audit.append(("report.accepted", report.subject, _accepted_body(report)))
        self.audit += self._decide(item, report)

    def take_batch(self, item: int, signed: SignedReport) -> None:
        try:
            reports = authenticate_batch(signed, self.keys)
        except ReportRejected as e:
            self.reject(item, signed.key_id, e)
            return
        accepted: list[list[object]] = []
        effects: list[tuple[str, str, Mapping[str, object]]] = []
        for report in reports:
            try:
                admit_report(report, **self._limits())
            except ReportRejected as e:
                self.reject(item, signed.key_id, e)
                continue
            effects += self._decide(item, report)
            accepted.append([report.subject, report.sequence, report.verdict.value, report.root])
        if accepted:
            # One entry for the batch, listing every report that counted (one signature covered them
            # all), then what they caused.
            body = {"monitor": signed.key_id, "reports": accepted}
            self.audit.append(("report.batch.accepted", signed.key_id, body))
        self.audit += effects

    def _decide(self, item: int, report: Report) -> list[tuple[str, str, Mapping[str, object]]]:
        """Let ``report`` count; the audit entries of what it caused."""
        region = self.region
        event: Verified = frozen_from(
            Verified,
            {
                "subject": report.subject,
                "monitor": report.monitor,
                "verdict": report.verdict,
                "at": report.ended_at,
                "sequence": report.sequence,
                "root": report.root,
            },
        )
        outcome = decide(self.rows, event, region.config.policy, self.assigned)
        self.rows.update(outcome.rows)
        self.sequences.accept(report.monitor, report.subject, report.sequence)
        fields = {"report": report, "monitor": report.monitor, "reason": "", "message": "", "effects": outcome.effects,
                  "rows": outcome.rows, "item": item}  # fmt: skip
        self.results.append(frozen_from(ReportResult, fields))
        if any(isinstance(e, StateChanged) for e in outcome.effects):
            self.assigned = _assign(self.rows, region.config.monitors_per_host)
        return [(_effect_kind(e), _effect_subject(e), _effect_body(e)) for e in outcome.effects]


class Region:
    """The IVT of one region and the decisions over it."""

    def __init__(self, store: IVTStore, config: RegionConfig | None = None) -> None:
        self.store = store
        self.config = config or RegionConfig()
        self._lock = threading.RLock()
        self._rows = {row.host: row for row in store.hosts()}
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        self._assigned: dict[str, tuple[str, ...]] | None = None
        # (monitor, subject) -> last accepted sequence, None for "none yet": read from the store
        # once per pair, not by every report's replay check (the region is their only writer).
        self._sequences: dict[tuple[str, str], int | None] = {}

    # -- reading ---------------------------------------------------------------------------

    def rows(self) -> dict[str, HostRecord]:
        with self._lock:
            return dict(self._rows)

    def assignment(self) -> dict[str, tuple[str, ...]]:
        """Each host's monitors: the ring over every host, stitched around those not TRUSTED."""
        with self._lock:
            if self._assigned is None:
                self._assigned = _assign(self._rows, self.config.monitors_per_host)
            return self._assigned

    def _last_sequence(self, key: tuple[str, str]) -> int | None:
        if key not in self._sequences:
            self._sequences[key] = self.store.last_sequence(*key)
        return self._sequences[key]

    def _key(self, row: HostRecord) -> Ed25519PublicKey:
        cached = self._keys.get(row.host)
        if cached is None or cached[0] != row.agent_key:
            cached = (row.agent_key, load_public_key_pem(row.agent_key.encode()))
            self._keys[row.host] = cached
        return cached[1]

    # -- writing ---------------------------------------------------------------------------

    def enroll(
        self,
        host: str,
        *,
        agent_key: str,
        manifest: str,
        capacity: Resources,
        now: float,
        region: str = "",
        address: str = "",
        vouched: bool = False,
    ) -> Decision:
        """Add a host in ENROLLING; it is trusted after its first verified match.

        Only TRUSTED hosts monitor, so a region's first hosts cannot be verified by anyone: the
        operator *vouches* for them (checked out of band, e.g. freshly installed from the approved
        reference), and they start TRUSTED. They are targets only after a peer verified them.

        Raises HostExists, ConfigError for a key that is not an Ed25519 public key in PEM.
        """
        try:
            load_public_key_pem(agent_key.encode())
        except ConfigError as e:
            raise ConfigError(f"cannot enrol {host!r}: {e.message}", host=host) from e
        row = HostRecord(
            host=host,
            region=region,
            address=address,
            agent_key=agent_key,
            manifest=manifest,
            state=TrustState.TRUSTED if vouched else TrustState.ENROLLING,
            state_since=now,
            capacity=capacity,
            enrolled_at=now,
        )
        with self._lock:
            if host in self._rows:
                raise HostExists(f"host {host!r} is already enrolled; re-enrol it to start over", host=host)
            self.store.enroll(row)
            self._rows[host] = row
            self._assigned = None
            if not vouched:
                return self._apply(Enrolled(host, now), now)
            effects: tuple[Effect, ...] = (Restitch(f"{host} enrolled, vouched for by the operator"),)
            with self.store.transaction() as tx:
                tx.audit("trust.vouched", host, {"by": "operator", "state": row.state.value}, now)
                self._record(tx, effects, now)
            return Decision({host: row}, effects)

    def ingest(self, signed: SignedReport, now: float) -> tuple[Report, Decision]:
        """Verify one signed report and let it count. On refusal the audit log records why and
        :class:`~smig.errors.ReportRejected` is raised; nothing else changes."""
        result = self.ingest_batch([signed], now)[0]
        if result.report is None:
            raise ReportRejected(result.reason, result.message, host=result.monitor)
        return result.report, Decision(result.rows, result.effects)

    def ingest_batch(
        self, batch: Sequence[SignedReport], now: float, *, agent: str | None = None
    ) -> list[ReportResult]:
        """Verify and decide on every report of ``batch`` in order, then commit them all at once.

        An item is one signed report, or a monitor's batch of reports under one signature
        (:mod:`smig.aim.report_batch`). Each report is judged against the state the reports before
        it left (so a replay inside one batch is caught), but the store sees one transaction: a
        batch lands whole or not at all. ``agent`` is the identity of the connection the batch
        came over; an item signed by another monitor is refused ("wrong-agent") so that one host
        cannot submit another's. Returns one result per report (``item`` is the input's index; a
        batch whose signature fails gives one result).
        """
        return self.ingest_many([(agent, batch)], now)[0]

    def ingest_many(
        self, requests: Sequence[tuple[str | None, Sequence[SignedReport]]], now: float
    ) -> list[list[ReportResult]]:
        """:meth:`ingest_batch` for several ``(agent, batch)`` requests at once, in order, in ONE
        transaction: the service groups the requests that arrive while the previous group is
        being judged, so that a commit (and its fsync) serves them all. Results per request."""
        with self._lock:
            run = _Run(self, now)
            owners: list[int] = []
            for request, (agent, batch) in enumerate(requests):
                for item, signed in enumerate(batch):
                    if agent is not None and signed.key_id != agent:
                        refused = ReportRejected(
                            "wrong-agent",
                            f"a report signed as monitor {signed.key_id!r} came over the connection of agent "
                            f"{agent!r}; an agent submits only its own reports",
                            host=agent,
                        )
                        run.reject(item, signed.key_id, refused)
                    elif signed.batch:
                        run.take_batch(item, signed)
                    else:
                        run.take_one(item, signed)
                    owners += [request] * (len(run.results) - len(owners))
            with self.store.transaction() as tx:
                tx.set_last_sequences([(m, s, q) for (m, s), q in run.sequences.accepted.items()])
                tx.put_all(list(run.rows.changes.values()))
                for kind, subject, body in run.audit:
                    tx.audit(kind, subject, body, now)
            self._commit(run.rows.changes)
            self._sequences.update(run.sequences.accepted)
            grouped: list[list[ReportResult]] = [[] for _ in requests]
            for owner, result in zip(owners, run.results, strict=True):
                grouped[owner].append(result)
            return grouped

    def tick(self, now: float, previous: float) -> Decision:
        """Let time pass: rows with no fresh verified report turn UNKNOWN, and so on."""
        with self._lock:
            return self._apply(Tick(now, previous), now)

    def maintenance(self, host: str, on: bool, now: float) -> Decision:
        with self._lock:
            return self._apply(Maintenance(host, on, now), now)

    def reenroll(self, host: str, now: float) -> Decision:
        with self._lock:
            return self._apply(ReEnrolled(host, now), now)

    def _apply(self, event: Event, now: float) -> Decision:
        """Decide, then write the changed rows and the record of it all in one transaction."""
        outcome: Outcome = decide(self._rows, event, self.config.policy, self.assignment())
        with self.store.transaction() as tx:
            for row in outcome.rows.values():
                tx.put(row)
            self._record(tx, outcome.effects, now)
        self._commit(outcome.rows)
        return Decision(outcome.rows, outcome.effects)

    def approve_manifest(self, host: str, manifest: str, now: float) -> HostRecord:
        """Make ``manifest`` (a reference manifest's digest) the one ``host`` is measured against:
        an operator's decision after an upgrade, recorded with the digest it replaces.

        Raises HostNotFound.
        """
        with self.writing() as (tx, rows, changed):
            row = rows.get(host)
            if row is None:
                raise HostNotFound(f"no IVT row for host {host!r}", host=host)
            changed[host] = dataclasses.replace(row, manifest=manifest)
            tx.audit("manifest.approved", host, {"old": row.manifest, "new": manifest}, now)
        return changed[host]

    @contextlib.contextmanager
    def writing(self) -> Iterator[tuple[Transaction, dict[str, HostRecord], dict[str, HostRecord]]]:
        """One store transaction under the region's lock, for its other writer (the orchestrator).

        Yields ``(tx, rows, changed)``: ``rows`` the table as it stands, and ``changed`` a dict the
        caller fills with new rows; they are written in the same transaction and reach the
        in-memory table once it commits, so neither writer overwrites the other with stale rows.
        """
        with self._lock:
            changed: dict[str, HostRecord] = {}
            with self.store.transaction() as tx:
                yield tx, dict(self._rows), changed
                if changed:
                    tx.put_all(list(changed.values()))
            self._commit(changed)

    def _commit(self, changed: Mapping[str, HostRecord]) -> None:
        """Take committed rows into the in-memory table; a change of state re-stitches the ring."""
        for host, row in changed.items():
            old = self._rows.get(host)
            if old is None or old.state is not row.state:
                self._assigned = None
                log.warning("%s: %s -> %s", host, old.state.value if old else "(new)", row.state.value)
            self._rows[host] = row

    @staticmethod
    def _record(tx: Transaction, effects: Sequence[Effect], now: float) -> None:
        for effect in effects:
            tx.audit(_effect_kind(effect), _effect_subject(effect), _effect_body(effect), now)

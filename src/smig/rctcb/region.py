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

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from smig.aim.report import SignedReport, load_public_key_pem, verify_report
from smig.aim.ring import assign_monitors
from smig.errors import ConfigError, HostExists, ReportRejected
from smig.ivt.base import IVTStore, Transaction
from smig.model import HostRecord, Report, Resources, TrustState
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


class _Sequences(Mapping[tuple[str, str], int]):
    """The last accepted sequences, read from the store only for the pair a report names."""

    def __init__(self, store: IVTStore) -> None:
        self._store = store

    def __getitem__(self, key: tuple[str, str]) -> int:
        value = self._store.last_sequence(*key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        raise TypeError("the last sequences are looked up one pair at a time")

    def __len__(self) -> int:
        raise TypeError("the last sequences are looked up one pair at a time")


def _effect_body(effect: Effect) -> dict[str, object]:
    body = {k: (v.value if isinstance(v, TrustState) else v) for k, v in asdict(effect).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}


def _effect_kind(effect: Effect) -> str:
    return "trust.changed" if isinstance(effect, StateChanged) else f"effect.{type(effect).__name__.lower()}"


class Region:
    """The IVT of one region and the decisions over it."""

    def __init__(self, store: IVTStore, config: RegionConfig | None = None) -> None:
        self.store = store
        self.config = config or RegionConfig()
        self._lock = threading.RLock()
        self._rows = {row.host: row for row in store.hosts()}
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}

    # -- reading ---------------------------------------------------------------------------

    def rows(self) -> dict[str, HostRecord]:
        with self._lock:
            return dict(self._rows)

    def assignment(self) -> dict[str, tuple[str, ...]]:
        """Each host's monitors: the ring over every host, stitched around those not TRUSTED."""
        with self._lock:
            distrusted = [h for h, row in self._rows.items() if row.state is not TrustState.TRUSTED]
            return assign_monitors(self._rows, self.config.monitors_per_host, not_monitors=distrusted)

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
            if not vouched:
                return self._apply(Enrolled(host, now), now)
            effects: tuple[Effect, ...] = (Restitch(f"{host} enrolled, vouched for by the operator"),)
            with self.store.transaction() as tx:
                tx.audit("trust.vouched", host, {"by": "operator", "state": row.state.value}, now)
                self._record(tx, effects, now)
            return Decision({host: row}, effects)

    def ingest(self, signed: SignedReport, now: float) -> tuple[Report, Decision]:
        """Verify a signed report and let it count. On refusal the audit log records why and
        :class:`~smig.errors.ReportRejected` is raised; nothing else changes."""
        with self._lock:
            keys = {h: self._key(r) for h, r in self._rows.items()}
            try:
                report = verify_report(
                    signed,
                    keys=keys,
                    assigned=self.assignment(),
                    last_sequence=_Sequences(self.store),
                    now=now,
                    max_age_s=self.config.max_age_s,
                    max_skew_s=self.config.max_skew_s,
                )
            except ReportRejected as e:
                with self.store.transaction() as tx:
                    tx.audit("report.rejected", e.host or "", {"reason": e.reason, "message": e.message}, now)
                raise
            event = Verified(
                report.subject, report.monitor, report.verdict, report.ended_at, report.sequence, report.root
            )
            accepted = {
                "monitor": report.monitor,
                "sequence": report.sequence,
                "verdict": report.verdict.value,
                "root": report.root,
                "mismatches": len(report.mismatches),
            }
            return report, self._apply(event, now, report=accepted)

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

    def _apply(self, event: Event, now: float, *, report: Mapping[str, object] | None = None) -> Decision:
        """Decide, then write the changed rows and the record of it all in one transaction."""
        outcome: Outcome = decide(self._rows, event, self.config.policy, self.assignment())
        with self.store.transaction() as tx:
            if report is not None and isinstance(event, Verified):
                tx.set_last_sequence(event.monitor, event.subject, event.sequence)
                tx.audit("report.accepted", event.subject, report, now)
            for row in outcome.rows.values():
                tx.put(row)
            self._record(tx, outcome.effects, now)
        self._rows.update(outcome.rows)
        for effect in outcome.effects:
            if isinstance(effect, StateChanged):
                log.warning("%s: %s -> %s (%s)", effect.host, effect.old.value, effect.new.value, effect.reason)
        return Decision(outcome.rows, outcome.effects)

    @staticmethod
    def _record(tx: Transaction, effects: Sequence[Effect], now: float) -> None:
        for effect in effects:
            subject = getattr(effect, "host", None) or getattr(effect, "subject", None) or ""
            tx.audit(_effect_kind(effect), str(subject), _effect_body(effect), now)

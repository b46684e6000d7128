"""The trust policy of the RC-TCB: how verified reports, operator actions and the passing of time
move a host's IVT row between trust states, and what the service must do about each move.

Pure functions of plain data: no I/O and no clock (every event carries its own time), so the
service, the simulator and the tests all call the same :func:`decide`. Every state change it makes
is one of :data:`TRANSITIONS`.

The rules, in short (see the design's "Trust model" and "Trust states"):

- A report counts only if its monitor's row is TRUSTED and the monitor is not its own subject;
  other reports are :class:`Ignored` and change no row. Nothing but an operator's re-enrolment
  changes an UNTRUSTED row.
- Under the *quorum* policy one monitor's mismatch makes its subject SUSPECT and asks others to
  measure it; a mismatch from a second, still trusted monitor makes it UNTRUSTED, while a match
  from an independent monitor clears it and gives each accuser a :class:`Strike`. An accuser with
  ``strike_limit`` strikes turns SUSPECT itself, and stays SUSPECT (a match about its own code does
  not restore its word) until an operator re-enrols it. Under the *immediate* policy the first counted
  mismatch makes the subject UNTRUSTED.
- TRUSTED and SUSPECT hosts with no verified report for ``freshness_s`` turn UNKNOWN; an UNKNOWN
  host is evacuated once, when it has been UNKNOWN for ``unknown_grace_s``.
- MAINTENANCE records reports but ignores their verdict; leaving it goes through ENROLLING, so a
  host needs a fresh match before it is trusted again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from smig.errors import ConfigError
from smig.model import HostRecord, TrustState, Verdict, VerifiedMeasurement, frozen_from

_S = TrustState

TRANSITIONS: frozenset[tuple[TrustState, TrustState]] = frozenset(
    (old, new)
    for old, news in {
        _S.ENROLLING: (_S.TRUSTED, _S.SUSPECT, _S.UNTRUSTED, _S.MAINTENANCE),
        _S.TRUSTED: (_S.SUSPECT, _S.UNTRUSTED, _S.UNKNOWN, _S.MAINTENANCE, _S.ENROLLING),
        _S.SUSPECT: (_S.TRUSTED, _S.UNTRUSTED, _S.UNKNOWN, _S.MAINTENANCE, _S.ENROLLING),
        _S.UNKNOWN: (_S.TRUSTED, _S.SUSPECT, _S.UNTRUSTED, _S.MAINTENANCE, _S.ENROLLING),
        _S.MAINTENANCE: (_S.ENROLLING,),
        _S.UNTRUSTED: (_S.ENROLLING,),
    }.items()
    for new in news
)
"""Every (from, to) state change :func:`decide` may make. Into ENROLLING means an operator's
re-enrolment or the end of maintenance; out of UNTRUSTED only re-enrolment leads."""


class PolicyKind(StrEnum):
    """How many monitors must report a mismatch before a host is UNTRUSTED."""

    IMMEDIATE = "immediate"  # one: fastest evacuation, but one lying monitor can evict a host
    QUORUM = "quorum"  # two independent ones; the first makes the subject SUSPECT


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of the trust policy; times in seconds.

    Raises :class:`~smig.errors.ConfigError` on a value the policy cannot work with. ``kind`` may be
    given as its string value (as read from a config file).
    """

    kind: PolicyKind = PolicyKind.QUORUM
    freshness_s: float = 10.0  # no verified report for longer than this: TRUSTED/SUSPECT → UNKNOWN
    unknown_grace_s: float = 30.0  # UNKNOWN for this long: evacuate
    strike_limit: int = 3  # contradicted accusations that make a monitor SUSPECT

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", PolicyKind(self.kind))
        except ValueError:
            choices = ", ".join(k.value for k in PolicyKind)
            raise ConfigError(f"unknown trust policy {self.kind!r}; choose one of: {choices}") from None
        if not (math.isfinite(self.freshness_s) and self.freshness_s > 0):
            raise ConfigError(f"freshness_s must be a positive number of seconds, not {self.freshness_s!r}")
        if not (math.isfinite(self.unknown_grace_s) and self.unknown_grace_s >= 0):
            raise ConfigError(
                f"unknown_grace_s must be zero or a positive number of seconds, not {self.unknown_grace_s!r}"
            )
        if isinstance(self.strike_limit, bool) or not isinstance(self.strike_limit, int) or self.strike_limit < 1:
            raise ConfigError(f"strike_limit must be a whole number of at least 1, not {self.strike_limit!r}")


# -- events: what happened ---------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A monitor's report that already passed the signature, assignment and replay checks.

    ``at`` is the report's ``ended_at``.
    """

    subject: str
    monitor: str
    verdict: Verdict
    at: float
    sequence: int
    root: str


@dataclass(frozen=True)
class Tick:
    """Time passed from ``previous`` to ``now``; deadlines in ``(previous, now]`` fire now."""

    now: float
    previous: float


@dataclass(frozen=True)
class Enrolled:
    """A new host's row was written, in ENROLLING."""

    host: str
    at: float


@dataclass(frozen=True)
class Maintenance:
    """An operator took a host into maintenance (``on``) or brought it back."""

    host: str
    on: bool
    at: float


@dataclass(frozen=True)
class ReEnrolled:
    """An operator re-enrolled a host: back to ENROLLING, its accusers and strikes forgotten."""

    host: str
    at: float


Event = Verified | Tick | Enrolled | Maintenance | ReEnrolled


# -- effects: what the service must do ---------------------------------------------------------


@dataclass(frozen=True)
class StateChanged:
    """A host's trust state changed; one per changed row, in the order they happened."""

    host: str
    old: TrustState
    new: TrustState
    at: float
    reason: str


@dataclass(frozen=True)
class Remeasure:
    """Ask monitors of ``subject`` other than those in ``exclude`` to measure it now."""

    subject: str
    exclude: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Evacuate:
    """Move every VM off ``host``."""

    host: str
    reason: str


@dataclass(frozen=True)
class Restitch:
    """Recompute the monitor ring: a host joined, turned UNTRUSTED, or was re-enrolled from it."""

    reason: str


@dataclass(frozen=True)
class Strike:
    """``monitor``'s accusation of ``subject`` was contradicted by an independent monitor."""

    monitor: str
    subject: str
    at: float


@dataclass(frozen=True)
class Ignored:
    """An event that changes nothing; ``monitor`` is None for events that are not reports."""

    subject: str
    monitor: str | None
    reason: str


Effect = StateChanged | Remeasure | Evacuate | Restitch | Strike | Ignored


@dataclass(frozen=True)
class Outcome:
    """What one event did: the new versions of the rows that changed, and the effects, in order."""

    rows: Mapping[str, HostRecord]
    effects: tuple[Effect, ...]


# -- freshness ---------------------------------------------------------------------------------


def is_fresh(row: HostRecord, now: float, freshness_s: float) -> bool:
    """Whether ``row`` was verified at most ``freshness_s`` before ``now``.

    A row never verified counts from when it entered its state, so a host is not declared stale
    before it had a chance to be measured.
    """
    last = row.verified_at if row.verified_at is not None else row.state_since
    return now - last <= freshness_s


def is_target(row: HostRecord, now: float, config: PolicyConfig) -> bool:
    """Whether a VM may be placed on ``row``'s host: TRUSTED, and verified within the window."""
    return row.state is TrustState.TRUSTED and row.verified is not None and is_fresh(row, now, config.freshness_s)


# -- the decision ------------------------------------------------------------------------------


def decide(
    rows: Mapping[str, HostRecord],
    event: Event,
    config: PolicyConfig,
    monitors_of: Mapping[str, tuple[str, ...]] | None = None,
) -> Outcome:
    """Apply ``event`` to the region's ``rows`` (host → row) under ``config``.

    ``monitors_of`` (subject → its assigned monitors) lets the policy ask for the subjects of a
    host that turns UNTRUSTED to be re-measured at once. Never raises: an event about a host with
    no row, or one that may not change anything, yields an :class:`Ignored` effect.
    """
    if type(event) is Verified and (confirmed := _confirmed(rows, event, config)) is not None:
        return confirmed
    return _decide(rows, event, config, monitors_of)


def _decide(
    rows: Mapping[str, HostRecord],
    event: Event,
    config: PolicyConfig,
    monitors_of: Mapping[str, tuple[str, ...]] | None,
) -> Outcome:
    draft = _Draft(rows)
    match event:
        case Verified():
            _on_report(draft, event, config, monitors_of or {})
        case Tick():
            _on_tick(draft, event, config)
        case Enrolled():
            _on_enrolled(draft, event)
        case Maintenance():
            _on_maintenance(draft, event)
        case ReEnrolled():
            _on_reenrolled(draft, event)
    return draft.outcome()


def _confirmed(rows: Mapping[str, HostRecord], ev: Verified, config: PolicyConfig) -> Outcome | None:
    """The outcome of the report nearly every report is, decided without the general machinery:
    a trusted monitor's match on another trusted host that no one accuses and whose own word is
    not in doubt, which only records the measurement. None for any other report. The RC-TCB
    decides thousands of reports a second, and this case is nearly all of them; a property test
    holds it to what the general path decides."""
    if ev.verdict is not Verdict.MATCH or ev.monitor == ev.subject:
        return None
    subject, monitor = rows.get(ev.subject), rows.get(ev.monitor)
    if (
        subject is None
        or monitor is None
        or subject.state is not TrustState.TRUSTED
        or monitor.state is not TrustState.TRUSTED
        or subject.suspected_by
        or subject.strikes >= config.strike_limit
    ):
        return None
    measured: VerifiedMeasurement = frozen_from(
        VerifiedMeasurement,
        {"at": ev.at, "monitor": ev.monitor, "sequence": ev.sequence, "root": ev.root, "verdict": ev.verdict},
    )
    if subject.verified == measured:
        return Outcome({}, ())
    return Outcome({subject.host: _with(subject, verified=measured)}, ())


_ROW_FIELDS = frozenset(f.name for f in fields(HostRecord))


def _with(row: HostRecord, **changes: Any) -> HostRecord:
    """``dataclasses.replace`` for a row, minus its cost: the RC-TCB changes a row for every report
    it ingests, and ``replace`` (which rebuilds the row through ``__init__``) was the largest
    single cost of ingesting one. Only the fields change; the row stays frozen."""
    unknown = changes.keys() - _ROW_FIELDS
    if unknown:
        raise TypeError(f"HostRecord has no field(s) {sorted(unknown)}")
    new = object.__new__(HostRecord)
    new.__dict__.update(row.__dict__)
    new.__dict__.update(changes)
    return new


class _Draft:
    """The rows as they become during one decision, and the effects so far."""

    def __init__(self, rows: Mapping[str, HostRecord]) -> None:
        self.original = rows
        self._changed: dict[str, HostRecord] = {}
        self._effects: list[Effect] = []

    def get(self, host: str) -> HostRecord | None:
        return self._changed[host] if host in self._changed else self.original.get(host)

    def put(self, row: HostRecord) -> HostRecord:
        self._changed[row.host] = row
        return row

    def emit(self, effect: Effect) -> None:
        self._effects.append(effect)

    def settle(self, row: HostRecord, state: TrustState, at: float, reason: str, **fields: Any) -> HostRecord:
        """Put ``row`` in ``state`` with ``fields`` changed; only a real change of state is announced."""
        if row.state is state:
            return self.put(_with(row, **fields))
        assert (row.state, state) in TRANSITIONS, f"{row.state} → {state} is not in TRANSITIONS"
        self.emit(StateChanged(row.host, row.state, state, at, reason))
        return self.put(_with(row, state=state, state_since=at, **fields))

    def outcome(self) -> Outcome:
        # A row written back unchanged (the same report twice, say) is not a change.
        rows = {h: r for h, r in self._changed.items() if r != self.original.get(h)}
        return Outcome(rows, tuple(self._effects))


def _why_ignored(subject: HostRecord | None, monitor: HostRecord | None, ev: Verified) -> str | None:
    if subject is None:
        return "no such subject"
    if ev.monitor == ev.subject:
        return "a host cannot vouch for itself"
    if monitor is None:
        return "no such monitor"
    if monitor.state is not TrustState.TRUSTED:
        return f"the monitor is {monitor.state}: only reports from trusted monitors count"
    if subject.state is TrustState.UNTRUSTED:
        return "the subject is untrusted: only re-enrolment changes it"
    return None


def _on_report(d: _Draft, ev: Verified, config: PolicyConfig, monitors_of: Mapping[str, tuple[str, ...]]) -> None:
    subject, monitor = d.get(ev.subject), d.get(ev.monitor)
    why_not = _why_ignored(subject, monitor, ev)
    if subject is None or why_not is not None:
        d.emit(Ignored(ev.subject, ev.monitor, why_not or "no such subject"))
        return
    measured = VerifiedMeasurement(ev.at, ev.monitor, ev.sequence, ev.root, ev.verdict)
    row = d.put(_with(subject, verified=measured))
    if row.state is TrustState.MAINTENANCE:
        return  # an operator is changing the host: its measurements are kept, its verdicts not acted on
    if ev.verdict is Verdict.MATCH:
        _on_match(d, row, ev, config)
    elif config.kind is PolicyKind.IMMEDIATE:
        _distrust(d, row, ev.at, f"mismatch reported by {ev.monitor}", monitors_of)
    else:
        _on_quorum_mismatch(d, row, ev, monitors_of)


def _on_match(d: _Draft, row: HostRecord, ev: Verified, config: PolicyConfig) -> None:
    accusers = row.suspected_by
    if ev.monitor in accusers:
        # A second opinion must be independent: an accuser taking its word back clears nothing.
        if row.state is not TrustState.SUSPECT:
            d.settle(row, TrustState.SUSPECT, ev.at, "measured again while an accusation is pending")
            d.emit(Remeasure(row.host, accusers, "an accusation needs an independent second opinion"))
        return
    reason = f"accusation contradicted by {ev.monitor}" if accusers else f"verified match by {ev.monitor}"
    if row.strikes >= config.strike_limit:
        # Its hypervisor may well be fine: its word is what is in doubt, and a match about its
        # code says nothing about that. It stays out of the ring and off the targets until an
        # operator re-enrols it.
        reason = f"{reason}, but it made too many contradicted accusations"
        d.settle(row, TrustState.SUSPECT, ev.at, reason, suspected_by=())
    else:
        d.settle(row, TrustState.TRUSTED, ev.at, reason, suspected_by=())
    for accuser in accusers:
        _strike(d, accuser, row.host, ev.at, config)


def _strike(d: _Draft, accuser: str, subject: str, at: float, config: PolicyConfig) -> None:
    row = d.get(accuser)
    if row is None or row.state is TrustState.UNTRUSTED:
        return  # gone, or already out of the ring: a strike would change nothing
    row = d.put(_with(row, strikes=row.strikes + 1))
    d.emit(Strike(accuser, subject, at))
    if row.strikes >= config.strike_limit and row.state is TrustState.TRUSTED:
        reason = "too many contradicted accusations"
        d.settle(row, TrustState.SUSPECT, at, reason)
        d.emit(Remeasure(accuser, (), reason))


def _on_quorum_mismatch(d: _Draft, row: HostRecord, ev: Verified, monitors_of: Mapping[str, tuple[str, ...]]) -> None:
    accusers = row.suspected_by if ev.monitor in row.suspected_by else (*row.suspected_by, ev.monitor)
    # An earlier accusation stands only while its accuser is still trusted: a host found lying
    # since then must not complete a quorum.
    standing = [a for a in accusers if a == ev.monitor or _trusted(d.get(a))]
    if len(standing) >= 2:
        _distrust(d, row, ev.at, f"mismatch confirmed by {', '.join(standing)}", monitors_of)
    elif row.state is not TrustState.SUSPECT or accusers != row.suspected_by:
        d.settle(row, TrustState.SUSPECT, ev.at, f"mismatch reported by {ev.monitor}", suspected_by=accusers)
        d.emit(Remeasure(row.host, accusers, "a mismatch needs an independent second opinion"))


def _trusted(row: HostRecord | None) -> bool:
    return row is not None and row.state is TrustState.TRUSTED


def _distrust(d: _Draft, row: HostRecord, at: float, reason: str, monitors_of: Mapping[str, tuple[str, ...]]) -> None:
    d.settle(row, TrustState.UNTRUSTED, at, reason)
    d.emit(Evacuate(row.host, reason))
    d.emit(Restitch(f"{row.host} is untrusted"))
    # Its reports stop counting, so the hosts it measured must be measured by someone else now.
    its_subjects = [s for s, monitors in sorted(monitors_of.items()) if row.host in monitors and s != row.host]
    for subject in its_subjects:
        if (measured := d.get(subject)) is not None and measured.state is not TrustState.UNTRUSTED:
            d.emit(Remeasure(subject, (row.host,), f"its monitor {row.host} is untrusted"))


def _on_tick(d: _Draft, ev: Tick, config: PolicyConfig) -> None:
    for host, row in sorted(d.original.items()):
        if row.state in (TrustState.TRUSTED, TrustState.SUSPECT) and not is_fresh(row, ev.now, config.freshness_s):
            reason = f"no verified report for more than {config.freshness_s:g}s"
            # Grace is counted from when a tick found the host stale, so it is exact to one tick.
            row = d.settle(row, TrustState.UNKNOWN, ev.now, reason)
            d.emit(Remeasure(host, (), reason))
        if row.state is TrustState.UNKNOWN and ev.previous < row.state_since + config.unknown_grace_s <= ev.now:
            d.emit(Evacuate(host, "unknown for longer than the grace period"))


def _on_enrolled(d: _Draft, ev: Enrolled) -> None:
    row = d.get(ev.host)
    if row is None or row.state is not TrustState.ENROLLING:
        why = "no such host" if row is None else f"the host is {row.state}, not enrolling"
        d.emit(Ignored(ev.host, None, why))
        return
    d.emit(Restitch(f"{ev.host} joined the region"))
    d.emit(Remeasure(ev.host, (), "a new host is trusted only after a first match"))


def _on_maintenance(d: _Draft, ev: Maintenance) -> None:
    row = d.get(ev.host)
    if row is None:
        d.emit(Ignored(ev.host, None, "no such host"))
    elif ev.on and row.state in (TrustState.UNTRUSTED, TrustState.MAINTENANCE):
        d.emit(Ignored(ev.host, None, f"the host is {row.state}: maintenance changes nothing"))
    elif ev.on:
        # Pending accusations lapse: the host comes back through ENROLLING and a fresh match anyway.
        d.settle(row, TrustState.MAINTENANCE, ev.at, "operator maintenance", suspected_by=())
    elif row.state is not TrustState.MAINTENANCE:
        d.emit(Ignored(ev.host, None, f"the host is {row.state}, not in maintenance"))
    else:
        reason = "maintenance over: trusted again only after a fresh match"
        d.settle(row, TrustState.ENROLLING, ev.at, reason)
        d.emit(Remeasure(ev.host, (), reason))


def _on_reenrolled(d: _Draft, ev: ReEnrolled) -> None:
    row = d.get(ev.host)
    if row is None:
        d.emit(Ignored(ev.host, None, "no such host"))
        return
    was = row.state
    reason = "re-enrolled by an operator"
    d.settle(row, TrustState.ENROLLING, ev.at, reason, suspected_by=(), strikes=0, enrolled_at=ev.at)
    if was is TrustState.UNTRUSTED:
        d.emit(Restitch(f"{ev.host} was re-enrolled"))
    d.emit(Remeasure(ev.host, (), reason))

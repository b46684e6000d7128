"""The trust policy: short stories of a small region, each ending in the log of what the policy
decided, and properties that must hold for any sequence of events."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smig.aim.ring import assign_monitors
from smig.errors import ConfigError
from smig.model import HostRecord, Resources, TrustState, Verdict, VerifiedMeasurement
from smig.rctcb import policy
from smig.rctcb.policy import (
    TRANSITIONS,
    Effect,
    Enrolled,
    Evacuate,
    Event,
    Ignored,
    Maintenance,
    PolicyConfig,
    PolicyKind,
    ReEnrolled,
    Remeasure,
    Restitch,
    StateChanged,
    Strike,
    Tick,
    Verified,
    decide,
    is_fresh,
    is_target,
)

S = TrustState
HOSTS = ("h1", "h2", "h3", "h4")
# Fixed by hand so the stories can be read without the ring: each host measures the next two.
MONITORS = {"h1": ("h2", "h3"), "h2": ("h3", "h4"), "h3": ("h4", "h1"), "h4": ("h1", "h2")}
QUORUM = PolicyConfig()
IMMEDIATE = PolicyConfig(kind=PolicyKind.IMMEDIATE)


def row(host: str, state: TrustState = S.TRUSTED, at: float = 0.0) -> HostRecord:
    verified = VerifiedMeasurement(at, "h0", 1, "root", Verdict.MATCH) if state is not S.ENROLLING else None
    return HostRecord(host, "r1", f"{host}:7000", "key", "manifest", state, at, Resources(8, 8192), verified=verified)


def region(hosts: Iterable[str] = HOSTS, state: TrustState = S.TRUSTED) -> dict[str, HostRecord]:
    return {h: row(h, state) for h in hosts}


def match(subject: str, monitor: str, at: float) -> Verified:
    return Verified(subject, monitor, Verdict.MATCH, at, int(at * 10), "root")


def mismatch(subject: str, monitor: str, at: float) -> Verified:
    return Verified(subject, monitor, Verdict.MISMATCH, at, int(at * 10), "evil")


def log(effect: Effect) -> tuple[object, ...]:
    """An effect without its prose, so that a story ends in a readable log."""
    match effect:
        case StateChanged():
            return ("state", effect.host, effect.new)
        case Remeasure():
            return ("remeasure", effect.subject, effect.exclude)
        case Evacuate():
            return ("evacuate", effect.host)
        case Restitch():
            return ("restitch",)
        case Strike():
            return ("strike", effect.monitor, effect.subject)
        case Ignored():
            return ("ignored", effect.subject, effect.monitor)


class Region:
    """The rows of a region as the service would keep them, fed one event at a time."""

    def __init__(self, rows: dict[str, HostRecord], config: PolicyConfig = QUORUM) -> None:
        self.rows = rows
        self.config = config

    def feed(self, event: Event) -> list[tuple[object, ...]]:
        outcome = decide(self.rows, event, self.config, MONITORS)
        self.rows = {**self.rows, **outcome.rows}
        return [log(e) for e in outcome.effects]

    def state(self, host: str) -> TrustState:
        return self.rows[host].state


# -- stories -----------------------------------------------------------------------------------


def test_quorum_one_mismatch_makes_suspect_and_a_second_independent_one_untrusted() -> None:
    r = Region(region())
    assert r.feed(mismatch("h1", "h2", 1.0)) == [("state", "h1", S.SUSPECT), ("remeasure", "h1", ("h2",))]
    assert r.rows["h1"].suspected_by == ("h2",)
    assert r.rows["h1"].verified == VerifiedMeasurement(1.0, "h2", 10, "evil", Verdict.MISMATCH)
    assert r.feed(mismatch("h1", "h2", 2.0)) == [], "the same accuser again adds nothing"
    assert r.feed(mismatch("h1", "h3", 3.0)) == [
        ("state", "h1", S.UNTRUSTED),
        ("evacuate", "h1"),
        ("restitch",),
        ("remeasure", "h3", ("h1",)),  # h1 measured h3 and h4: their monitor is gone
        ("remeasure", "h4", ("h1",)),
    ]
    assert r.feed(match("h3", "h1", 4.0)) == [("ignored", "h3", "h1")], "an untrusted monitor counts for nothing"


def test_independent_match_clears_suspicion_and_strikes_the_accuser() -> None:
    r = Region(region())
    r.feed(mismatch("h1", "h2", 1.0))
    assert r.feed(match("h1", "h2", 2.0)) == [], "the accuser cannot withdraw its own accusation"
    assert r.state("h1") is S.SUSPECT
    assert r.feed(match("h1", "h3", 3.0)) == [("state", "h1", S.TRUSTED), ("strike", "h2", "h1")]
    assert r.rows["h1"].suspected_by == ()
    assert r.rows["h2"].strikes == 1
    assert r.state("h2") is S.TRUSTED


def test_a_monitor_whose_accusations_keep_being_contradicted_turns_suspect() -> None:
    r = Region(region(), PolicyConfig(strike_limit=2))
    r.feed(mismatch("h1", "h2", 1.0))
    r.feed(match("h1", "h3", 2.0))
    r.feed(mismatch("h4", "h2", 3.0))
    assert r.feed(match("h4", "h1", 4.0)) == [
        ("state", "h4", S.TRUSTED),
        ("strike", "h2", "h4"),
        ("state", "h2", S.SUSPECT),
        ("remeasure", "h2", ()),
    ]
    assert r.feed(mismatch("h3", "h2", 5.0)) == [("ignored", "h3", "h2")], "a suspect monitor is not heard"
    # Its code may be clean; its word is what is in doubt. A match does not restore it (a liar whose
    # hypervisor is fine would otherwise be back in the ring a second later) ...
    assert r.feed(match("h2", "h3", 6.0)) == [], "a clean measurement does not restore a struck monitor"
    assert r.state("h2") is S.SUSPECT and r.rows["h2"].verified is not None
    # ... an operator's re-enrolment does, through ENROLLING and a fresh match.
    r.feed(ReEnrolled("h2", 7.0))
    assert r.rows["h2"].strikes == 0
    assert r.feed(match("h2", "h3", 8.0)) == [("state", "h2", S.TRUSTED)]


def test_an_accusation_from_a_monitor_since_found_untrusted_does_not_complete_a_quorum() -> None:
    r = Region(region())
    r.feed(mismatch("h1", "h2", 1.0))  # h2 accuses h1 ...
    r.feed(mismatch("h2", "h3", 2.0))
    r.feed(mismatch("h2", "h4", 3.0))  # ... and is then found compromised itself
    assert r.state("h2") is S.UNTRUSTED
    assert r.feed(mismatch("h1", "h3", 4.0)) == [("remeasure", "h1", ("h2", "h3"))]
    assert r.state("h1") is S.SUSPECT


def test_immediate_policy_distrusts_on_the_first_mismatch() -> None:
    r = Region(region(), IMMEDIATE)
    assert r.feed(mismatch("h2", "h3", 1.0)) == [
        ("state", "h2", S.UNTRUSTED),
        ("evacuate", "h2"),
        ("restitch",),
        ("remeasure", "h1", ("h2",)),
        ("remeasure", "h4", ("h2",)),
    ]


def test_enrolling_host_is_trusted_after_its_first_match() -> None:
    rows = region()
    rows["h4"] = row("h4", S.ENROLLING, at=5.0)
    r = Region(rows)
    assert r.feed(Enrolled("h4", 5.0)) == [("restitch",), ("remeasure", "h4", ())]
    assert not is_target(r.rows["h4"], 6.0, QUORUM)
    assert r.feed(match("h4", "h1", 6.0)) == [("state", "h4", S.TRUSTED)]
    assert is_target(r.rows["h4"], 6.0, QUORUM)


def test_maintenance_records_reports_but_acts_on_none_and_ends_in_enrolling() -> None:
    r = Region(region())
    assert r.feed(Maintenance("h1", on=True, at=1.0)) == [("state", "h1", S.MAINTENANCE)]
    assert r.feed(mismatch("h1", "h2", 2.0)) == []
    assert r.feed(mismatch("h1", "h3", 3.0)) == []
    assert r.state("h1") is S.MAINTENANCE
    assert r.rows["h1"].verified_at == 3.0
    assert r.feed(Maintenance("h1", on=False, at=4.0)) == [("state", "h1", S.ENROLLING), ("remeasure", "h1", ())]
    assert r.feed(match("h1", "h2", 5.0)) == [("state", "h1", S.TRUSTED)]


def test_maintenance_cannot_launder_an_untrusted_host() -> None:
    r = Region(region(), IMMEDIATE)
    r.feed(mismatch("h1", "h2", 1.0))
    assert r.feed(Maintenance("h1", on=True, at=2.0)) == [("ignored", "h1", None)]
    assert r.state("h1") is S.UNTRUSTED


def test_a_silent_host_turns_unknown_and_is_evacuated_exactly_once() -> None:
    r = Region(region(), PolicyConfig(freshness_s=10.0, unknown_grace_s=30.0))
    for host in ("h2", "h3", "h4"):
        r.rows[host] = replace(r.rows[host], verified=VerifiedMeasurement(100.0, "h1", 9, "root", Verdict.MATCH))
    effects = {now: r.feed(Tick(float(now), float(now - 1))) for now in range(1, 61)}
    assert effects[11] == [("state", "h1", S.UNKNOWN), ("remeasure", "h1", ())], "stale once 10 s have passed"
    assert effects[41] == [("evacuate", "h1")], "30 s after it was found stale"
    assert sum(e == ("evacuate", "h1") for es in effects.values() for e in es) == 1
    assert not is_target(r.rows["h1"], 60.0, QUORUM)
    assert r.feed(match("h1", "h2", 61.0)) == [("state", "h1", S.TRUSTED)]
    assert is_target(r.rows["h1"], 61.0, QUORUM)


def test_only_reenrolment_leaves_untrusted() -> None:
    r = Region(region(), IMMEDIATE)
    r.feed(mismatch("h1", "h2", 1.0))
    for monitor in ("h2", "h3", "h4"):
        assert r.feed(match("h1", monitor, 2.0)) == [("ignored", "h1", monitor)]
    assert all(e[:2] != ("state", "h1") for e in r.feed(Tick(100.0, 1.0))), "not even to UNKNOWN"
    assert r.state("h1") is S.UNTRUSTED
    r.rows["h1"] = replace(r.rows["h1"], strikes=2, suspected_by=("h2",))
    assert r.feed(ReEnrolled("h1", 200.0)) == [("state", "h1", S.ENROLLING), ("restitch",), ("remeasure", "h1", ())]
    assert (r.rows["h1"].suspected_by, r.rows["h1"].strikes, r.rows["h1"].enrolled_at) == ((), 0, 200.0)


def test_reports_about_or_from_unknown_hosts_or_oneself_are_ignored() -> None:
    r = Region(region())
    assert r.feed(match("ghost", "h1", 1.0)) == [("ignored", "ghost", "h1")]
    assert r.feed(mismatch("h1", "ghost", 1.0)) == [("ignored", "h1", "ghost")]
    assert r.feed(mismatch("h1", "h1", 1.0)) == [("ignored", "h1", "h1")]
    assert r.feed(Enrolled("h1", 1.0)) == [("ignored", "h1", None)], "h1 is not enrolling"
    for event in (Enrolled("ghost", 1.0), Maintenance("ghost", True, 1.0), ReEnrolled("ghost", 1.0)):
        assert r.feed(event) == [("ignored", "ghost", None)]
    assert r.rows == region()


def test_freshness_counts_from_the_last_verified_report() -> None:
    trusted = row("h1", at=0.0)
    assert is_fresh(trusted, 10.0, 10.0) and not is_fresh(trusted, 10.5, 10.0)
    assert is_fresh(row("h1", S.ENROLLING, at=5.0), 15.0, 10.0), "never verified: counts from state_since"
    assert not is_target(row("h1", S.SUSPECT), 1.0, QUORUM)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"kind": "majority"}, "unknown trust policy"),
        ({"freshness_s": 0.0}, "freshness_s"),
        ({"freshness_s": float("nan")}, "freshness_s"),
        ({"unknown_grace_s": -1.0}, "unknown_grace_s"),
        ({"strike_limit": 0}, "strike_limit"),
    ],
)
def test_config_rejects_what_the_policy_cannot_use(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        PolicyConfig(**fields)  # type: ignore[arg-type]


def test_config_accepts_the_policy_kind_as_read_from_a_file() -> None:
    assert PolicyConfig(kind="immediate").kind is PolicyKind.IMMEDIATE  # type: ignore[arg-type]


def test_untrusted_is_left_only_towards_enrolling() -> None:
    assert {new for old, new in TRANSITIONS if old is S.UNTRUSTED} == {S.ENROLLING}
    assert all(old is not new for old, new in TRANSITIONS)


# -- properties --------------------------------------------------------------------------------

# Strategies are built once: building them per draw made the property tests several times slower.
# Mostly trusted hosts, so that many reports count; every other state appears too.
HOST_STATES = st.lists(st.tuples(st.sampled_from([S.TRUSTED] * 4 + list(S)), st.integers(0, 2)), min_size=3, max_size=6)
CONFIGS = st.builds(
    PolicyConfig,
    kind=st.sampled_from(PolicyKind),
    freshness_s=st.sampled_from([5.0, 10.0]),
    unknown_grace_s=st.sampled_from([0.0, 15.0]),
    strike_limit=st.integers(1, 3),
)
# (kind of event, seconds since the previous one, host index, monitor index, flag); index 7 names
# a host that has no row.
EVENT_KINDS = ("report",) * 6 + ("tick", "enrolled", "maintenance", "reenrolled")
STEPS = st.lists(
    st.tuples(
        st.sampled_from(EVENT_KINDS),
        st.sampled_from([0.0, 1.0, 1.0, 4.0, 12.0]),
        st.integers(0, 7),
        st.integers(0, 7),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)


@st.composite
def stories(
    draw: st.DrawFn, kind: PolicyKind | None = None, single_monitor: bool = False, accused: bool = False
) -> tuple[dict[str, HostRecord], list[Event], PolicyConfig]:
    """A region of 3 to 6 hosts in any states, a policy, and up to 30 events in time order. With
    ``accused``, rows may start with accusers whatever their state (as a store could hold them)."""
    states = draw(HOST_STATES)
    hosts = [f"h{i}" for i in range(len(states))]
    rows = {h: replace(row(h, state), strikes=strikes) for h, (state, strikes) in zip(hosts, states, strict=True)}
    if accused:
        rows = {
            h: replace(r, suspected_by=tuple(draw(st.sets(st.sampled_from(hosts), max_size=2))))
            for h, r in rows.items()
        }
    config = draw(CONFIGS)
    if kind is not None:
        config = replace(config, kind=kind)

    def name(i: int) -> str:
        return hosts[i % len(hosts)] if i < 7 else "ghost"

    now, events = 0.0, list[Event]()
    for what, step, i, j, flag in draw(STEPS):
        previous, now = now, now + step
        host, monitor = name(i), hosts[0] if single_monitor else name(j)
        match what:
            case "report":
                verdict = Verdict.MATCH if flag else Verdict.MISMATCH
                events.append(Verified(host, monitor, verdict, now, len(events), "root"))
            case "tick":
                events.append(Tick(now, previous))
            case "enrolled":
                events.append(Enrolled(host, now))
            case "maintenance":
                events.append(Maintenance(host, flag, now))
            case _:
                events.append(ReEnrolled(host, now))
    return rows, events, config


def play(rows: Mapping[str, HostRecord], events: list[Event], config: PolicyConfig) -> list[Effect]:
    """Feed every event, checking after each what must hold whatever happened; return all effects."""
    monitors_of = assign_monitors(rows, 2)
    effects: list[Effect] = []
    for event in events:
        out = decide(rows, event, config, monitors_of)
        changes = [e for e in out.effects if isinstance(e, StateChanged)]
        for e in changes:
            assert (e.old, e.new) in TRANSITIONS
            assert (rows[e.host].state, out.rows[e.host].state) == (e.old, e.new)
        moved = [h for h, new in out.rows.items() if new.state is not rows[h].state]
        assert sorted(moved) == sorted(e.host for e in changes), "one StateChanged per row that changed state"
        assert all(new != rows[h] for h, new in out.rows.items()), "only changed rows are returned"
        if isinstance(event, Verified):
            monitor = rows.get(event.monitor)
            if monitor is None or monitor.state is not S.TRUSTED or event.monitor == event.subject:
                assert out.rows == {}
                assert [type(e) for e in out.effects] == [Ignored]
        for host, old in rows.items():
            if old.state is S.UNTRUSTED and event != ReEnrolled(host, getattr(event, "at", -1.0)):
                assert host not in out.rows, "only re-enrolment changes an untrusted row"
        rows = {**rows, **out.rows}
        for new in rows.values():
            if new.state is S.TRUSTED:
                assert new.verified is not None and new.verified.verdict is Verdict.MATCH
        effects.extend(out.effects)
    return effects


@settings(max_examples=200, deadline=None)
@given(stories())
def test_any_story_keeps_the_policy_invariants(
    story: tuple[dict[str, HostRecord], list[Event], PolicyConfig],
) -> None:
    play(*story)


@settings(max_examples=200, deadline=None)
@given(stories(kind=PolicyKind.QUORUM, single_monitor=True))
def test_under_quorum_one_monitor_alone_never_makes_anyone_untrusted(
    story: tuple[dict[str, HostRecord], list[Event], PolicyConfig],
) -> None:
    effects = play(*story)
    assert not [e for e in effects if isinstance(e, StateChanged) and e.new is S.UNTRUSTED]


@settings(max_examples=300, deadline=None)
@given(stories(accused=True))
def test_the_quick_path_for_a_confirming_match_decides_as_the_general_path_does(
    story: tuple[dict[str, HostRecord], list[Event], PolicyConfig],
) -> None:
    rows, events, config = story
    monitors_of = assign_monitors(rows, 2)
    for event in events:
        quick, general = decide(rows, event, config, monitors_of), policy._decide(rows, event, config, monitors_of)
        assert quick == general
        rows = {**rows, **general.rows}


def test_a_confirming_match_only_records_the_measurement_and_the_same_one_twice_changes_nothing() -> None:
    rows = region()
    first = decide(rows, match("h1", "h2", 5.0), QUORUM, MONITORS)
    assert first.effects == () and list(first.rows) == ["h1"]
    assert first.rows["h1"] == replace(rows["h1"], verified=VerifiedMeasurement(5.0, "h2", 50, "root", Verdict.MATCH))
    rows = {**rows, **first.rows}
    assert decide(rows, match("h1", "h2", 5.0), QUORUM, MONITORS) == policy.Outcome({}, ())

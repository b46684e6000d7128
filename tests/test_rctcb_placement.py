"""Placement: where the VMs of an untrustworthy host go, told as short stories, then as properties."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smig.errors import ConfigError
from smig.model import HostRecord, PlacedVM, Resources, TrustState, Verdict, VerifiedMeasurement
from smig.rctcb.placement import InFlight, Move, PlacementConfig, Plan, SendSlots, eligible, plan_evacuation

NOW = 1_000.0
CFG = PlacementConfig()
NO_AHEAD = PlacementConfig(prepare_ahead=0)  # a move begins only when it may send
NOTHING = Resources(0, 0)


def host(
    name: str,
    state: TrustState = TrustState.TRUSTED,
    *,
    vcpus: int = 8,
    memory_mib: int = 8192,
    load: Resources = NOTHING,
    verified_at: float | None = NOW - 1,
) -> HostRecord:
    verified = None if verified_at is None else VerifiedMeasurement(verified_at, "mon", 1, "root", Verdict.MATCH)
    return HostRecord(
        host=name,
        region="r1",
        address=f"{name}.example",
        agent_key="",
        manifest="",
        state=state,
        state_since=0.0,
        capacity=Resources(vcpus, memory_mib),
        load=load,
        verified=verified,
    )


def region(*rows: HostRecord) -> dict[str, HostRecord]:
    return {r.host: r for r in rows}


def vm(name: str, on: str = "bad", *, vcpus: int = 1, mib: int = 1024, priority: int = 0, group: str = "") -> PlacedVM:
    return PlacedVM(name, on, Resources(vcpus, mib), priority, group)


def targets(moves: Sequence[Move]) -> dict[str, str]:
    return {m.vm.name: m.target for m in moves}


def plan(
    evacuees: Sequence[PlacedVM],
    hosts: Mapping[str, HostRecord],
    placed: Sequence[PlacedVM] = (),
    in_flight: Sequence[InFlight] = (),
    config: PlacementConfig = CFG,
) -> Plan:
    return plan_evacuation(evacuees, hosts, list(placed) or list(evacuees), in_flight, NOW, config)


# -- stories -------------------------------------------------------------------------------------


def test_four_evacuees_spread_two_and_two_over_equal_targets() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), host("t1"), host("t2"))
    evacuees = [vm(f"vm{i}") for i in range(4)]
    result = plan(evacuees, hosts, config=PlacementConfig(max_outbound_per_host=4))
    assert Counter(m.target for m in result.start) == {"t1": 2, "t2": 2}
    assert result.waiting == () and result.no_capacity == ()
    assert all(m.source == "bad" for m in result.start)


@pytest.mark.parametrize(
    "row",
    [
        host("t", TrustState.UNTRUSTED),
        host("t", TrustState.SUSPECT),
        host("t", TrustState.UNKNOWN),
        host("t", TrustState.ENROLLING),
        host("t", TrustState.MAINTENANCE),
        host("t", verified_at=None),
        host("t", verified_at=NOW - CFG.freshness_s - 0.001),
    ],
    ids=["untrusted", "suspect", "unknown", "enrolling", "maintenance", "never-verified", "stale"],
)
def test_a_host_not_trusted_and_fresh_is_never_a_target(row: HostRecord) -> None:
    result = plan([vm("a")], region(host("bad", TrustState.UNTRUSTED), row))
    assert not eligible(row, NOW, CFG.freshness_s)
    assert result.start == result.waiting == ()
    assert [n.vm.name for n in result.no_capacity] == ["a"]
    assert "other than its source 'bad'" in result.no_capacity[0].reason


def test_verified_exactly_at_the_edge_of_the_window_is_still_fresh() -> None:
    assert eligible(host("t", verified_at=NOW - CFG.freshness_s), NOW, CFG.freshness_s)


def test_the_source_is_never_a_target_even_when_it_is_trusted() -> None:
    # An operator draining a healthy host: it stays TRUSTED, but its VMs must leave it.
    result = plan([vm("a", on="t1")], region(host("t1")))
    assert [n.vm.name for n in result.no_capacity] == ["a"]
    result = plan([vm("a", on="t1")], region(host("t1"), host("t2")))
    assert targets(result.start) == {"a": "t2"}


def test_in_flight_reservations_use_up_room_on_their_target() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), host("t1", memory_mib=4096), host("t2", memory_mib=4096))
    running = [InFlight("x", "elsewhere", "t1", Resources(1, 3072))]
    result = plan([vm("a", mib=2048)], hosts, in_flight=running)
    assert targets(result.start) == {"a": "t2"}
    running.append(InFlight("y", "elsewhere", "t2", Resources(1, 3072)))
    result = plan([vm("a", mib=2048)], hosts, in_flight=running)
    assert result.no_capacity[0].reason == "no trusted host with 1 vCPUs and 2048 MiB free"


def test_load_counts_against_capacity() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), host("t1", load=Resources(7, 1024)), host("t2"))
    result = plan([vm("a", vcpus=2)], hosts)
    assert targets(result.start) == {"a": "t2"}


def test_anti_affinity_keeps_a_group_off_hosts_that_run_or_receive_it() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), host("t1"), host("t2"), host("t3"), host("t4"))
    evacuees = [vm("db1", group="db"), vm("db2", group="db")]
    placed = [*evacuees, vm("db0", on="t1", group="db"), vm("db9", on="src2", group="db")]
    running = [InFlight("db9", "src2", "t2", Resources(1, 1024))]
    result = plan(evacuees, hosts, placed, running)
    # t1 runs db0, t2 receives db9; db1 takes t3 (lowest id of the two equals), so db2 gets t4.
    assert targets(result.start) == {"db1": "t3", "db2": "t4"}
    result = plan([*evacuees, vm("db3", group="db")], hosts, [*placed, vm("db3", group="db")], running)
    assert result.no_capacity[0].vm.name == "db3"
    assert result.no_capacity[0].reason == "anti-affinity group 'db' excludes every trusted host with room"


def test_priority_wins_scarce_capacity_and_the_rest_is_no_capacity() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), host("t1", vcpus=4, memory_mib=4096))
    evacuees = [vm("low", vcpus=2, mib=3072), vm("mid", vcpus=2, mib=3072, priority=1), vm("top", mib=2048, priority=5)]
    result = plan(evacuees, hosts)
    assert targets(result.start) == {"top": "t1"}
    assert [n.vm.name for n in result.no_capacity] == ["mid", "low"]
    assert result.no_capacity[0].reason == "no trusted host with 2 vCPUs and 3072 MiB free"


def test_at_most_two_leave_one_source_at_once_and_the_rest_wait_with_a_target() -> None:
    hosts = region(host("bad", TrustState.UNTRUSTED), *(host(f"t{i}") for i in range(5)))
    result = plan([vm(f"vm{i}") for i in range(5)], hosts, config=NO_AHEAD)
    assert [m.vm.name for m in result.start] == ["vm0", "vm1"]
    assert [m.vm.name for m in result.waiting] == ["vm2", "vm3", "vm4"]
    assert len(set(targets(result.start + result.waiting).values())) == 5  # waiting moves keep their own target


def test_at_most_five_run_in_the_region_counting_those_already_running() -> None:
    hosts = region(*(host(f"bad{i}", TrustState.UNTRUSTED) for i in range(4)), *(host(f"t{i}") for i in range(4)))
    evacuees = [vm(f"vm{i}{j}", on=f"bad{i}") for i in range(4) for j in range(2)]
    result = plan(evacuees, hosts, config=NO_AHEAD)
    assert len(result.start) == 5 and len(result.waiting) == 3
    running = [InFlight("old", "bad9", "t9", Resources(1, 1024))] * 3
    result = plan(evacuees, hosts, in_flight=running, config=NO_AHEAD)
    assert len(result.start) == 2 and len(result.waiting) == 6


def test_at_most_two_arrive_at_one_target_at_once() -> None:
    hosts = region(*(host(f"bad{i}", TrustState.UNTRUSTED) for i in range(3)), host("t1", vcpus=64, memory_mib=65536))
    running = [InFlight("old", "bad9", "t1", Resources(1, 1024))]
    result = plan([vm(f"vm{i}", on=f"bad{i}") for i in range(3)], hosts, in_flight=running, config=NO_AHEAD)
    assert [m.vm.name for m in result.start] == ["vm0"]
    assert [m.vm.name for m in result.waiting] == ["vm1", "vm2"]


def test_prepare_ahead_begins_that_many_more_moves_but_never_more_send_at_once() -> None:
    # Two may send from a source at once; two more prepare their target meanwhile, so each can send
    # the moment a slot frees instead of waiting seconds for a destination to boot.
    hosts = region(host("bad", TrustState.UNTRUSTED), *(host(f"t{i}") for i in range(6)))
    result = plan([vm(f"vm{i}") for i in range(6)], hosts)  # the default: 2 sending, 2 ahead
    assert [m.vm.name for m in result.start] == ["vm0", "vm1", "vm2", "vm3"]
    assert [m.vm.name for m in result.waiting] == ["vm4", "vm5"]
    begun = [InFlight(m.vm.name, m.source, m.target, m.vm.needs, sending=False) for m in result.start]
    slots = SendSlots(begun, CFG)
    assert [slots.take(m.source, m.target) for m in result.start] == [True, True, False, False]
    # Moves still preparing count against the begun limit, not against the sending slots.
    assert plan([vm("vm9")], hosts, in_flight=begun).waiting
    sending = [replace(f, sending=True) for f in begun[:2]]
    assert not SendSlots(sending, CFG).take("bad", "t5")
    assert SendSlots(sending, PlacementConfig(max_outbound_per_host=3)).take("bad", "t5")


def test_send_slots_keep_the_inbound_and_region_limits() -> None:
    sending = [InFlight("a", "bad1", "t1", Resources(1, 1024)), InFlight("b", "bad2", "t1", Resources(1, 1024))]
    slots = SendSlots([*sending, InFlight("c", "bad3", "t1", Resources(1, 1024), sending=False)], CFG)
    assert not slots.take("bad3", "t1")  # t1 receives two already
    assert slots.take("bad3", "t2")
    region_of_one = SendSlots(sending[:1], PlacementConfig(max_per_region=1))
    assert not region_of_one.take("bad9", "t9")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"freshness_s": 0},
        {"freshness_s": float("nan")},
        {"freshness_s": float("inf")},
        {"max_outbound_per_host": 0},
        {"max_per_region": -1},
        {"max_inbound_per_host": 1.5},
        {"max_per_region": True},
        {"prepare_ahead": -1},
        {"prepare_ahead": 0.5},
    ],
)
def test_unusable_config_is_refused_with_a_message(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"placement .* must be"):
        PlacementConfig(**kwargs)  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------------

GROUPS = ("", "", "a", "b")
# Biased towards hosts that can take VMs, so most examples exercise placement rather than "nowhere to go".
HOST_ROWS = st.tuples(
    st.sampled_from([TrustState.TRUSTED] * 6 + list(TrustState)),
    st.integers(0, 12),  # vCPUs
    st.integers(0, 16),  # memory, in 512 MiB
    st.integers(0, 4),  # load, vCPUs (capped at capacity)
    st.integers(0, 6),  # load, memory in 512 MiB (capped at capacity)
    st.sampled_from([None, -1, 0, 1, 5, 10, 11, 20]),  # age of the last verification, s
)
VM_ROWS = st.tuples(st.integers(0, 7), st.integers(1, 3), st.integers(1, 4), st.integers(0, 3), st.sampled_from(GROUPS))
FATES = st.tuples(st.sampled_from(("stays", "evacuate", "evacuate", "migrating")), st.integers(0, 7))
Scenario = tuple[list[PlacedVM], dict[str, HostRecord], list[PlacedVM], list[InFlight]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """A region of 1-8 hosts; some of its VMs evacuate, others are already migrating."""
    hosts: dict[str, HostRecord] = {}
    for i, (state, vcpus, mem, load_cpu, load_mem, age) in enumerate(draw(st.lists(HOST_ROWS, min_size=1, max_size=8))):
        hosts[f"h{i}"] = host(
            f"h{i}",
            state,
            vcpus=vcpus,
            memory_mib=512 * mem,
            load=Resources(min(load_cpu, vcpus), 512 * min(load_mem, mem)),
            verified_at=None if age is None else NOW - age,
        )
    names = list(hosts)
    placed = [
        PlacedVM(f"vm{i}", names[on % len(names)], Resources(cpu, 512 * mem), prio, group)
        for i, (on, cpu, mem, prio, group) in enumerate(draw(st.lists(VM_ROWS, max_size=12)))
    ]
    fates = draw(st.lists(FATES, min_size=len(placed), max_size=len(placed)))
    evacuees = [v for v, (fate, _) in zip(placed, fates, strict=True) if fate == "evacuate"]
    in_flight = [
        InFlight(v.name, v.host, names[to % len(names)], v.needs)
        for v, (fate, to) in zip(placed, fates, strict=True)
        if fate == "migrating"
    ]
    return evacuees, hosts, placed, in_flight


configs = st.builds(
    PlacementConfig,
    max_outbound_per_host=st.integers(1, 3),
    max_per_region=st.integers(1, 6),
    max_inbound_per_host=st.integers(1, 3),
    prepare_ahead=st.integers(0, 2),
)


def trusted_and_fresh(row: HostRecord) -> bool:
    """The eligibility rule restated, so a fault in `eligible` cannot hide from the properties."""
    return row.state is TrustState.TRUSTED and row.verified_at is not None and NOW - row.verified_at <= CFG.freshness_s


def used_at_end(
    hosts: Mapping[str, HostRecord], in_flight: Sequence[InFlight], moves: Sequence[Move]
) -> dict[str, Resources]:
    used = {h: row.load for h, row in hosts.items()}
    for f in in_flight:
        if f.target in used:
            used[f.target] += f.needs
    for m in moves:
        used[m.target] += m.vm.needs
    return used


def groups_at_end(
    placed: Sequence[PlacedVM], in_flight: Sequence[InFlight], moves: Sequence[Move]
) -> dict[str, list[str]]:
    group_of = {v.name: v.anti_affinity for v in placed}
    groups: dict[str, list[str]] = {}
    for h, g in [(v.host, v.anti_affinity) for v in placed] + [(f.target, group_of[f.vm]) for f in in_flight]:
        if g:
            groups.setdefault(h, []).append(g)
    for m in moves:
        if m.vm.anti_affinity:
            groups.setdefault(m.target, []).append(m.vm.anti_affinity)
    return groups


@settings(max_examples=200, deadline=None)
@given(scenarios(), configs)
def test_placement_properties(scenario: Scenario, config: PlacementConfig) -> None:
    evacuees, hosts, placed, in_flight = scenario
    result = plan_evacuation(evacuees, hosts, placed, in_flight, NOW, config)
    moves = result.start + result.waiting
    ok = {h for h, row in hosts.items() if trusted_and_fresh(row)}

    # Every evacuee exactly once, and the plan does not depend on the order of its inputs.
    assert sorted(v.name for v in evacuees) == sorted(
        [m.vm.name for m in moves] + [n.vm.name for n in result.no_capacity]
    )
    shuffled = dict(reversed(list(hosts.items())))
    assert plan_evacuation(evacuees[::-1], shuffled, placed[::-1], in_flight[::-1], NOW, config) == result

    # Targets are trusted, fresh, not the source, and never overfilled by what this plan adds.
    used = used_at_end(hosts, in_flight, moves)
    before = used_at_end(hosts, in_flight, ())
    for m in moves:
        assert m.target in ok and m.target != m.source == m.vm.host
    for h in {m.target for m in moves}:
        assert used[h].fits_in(hosts[h].capacity), (h, used[h], before[h])

    # No anti-affinity group repeats on a host because of this plan.
    groups = groups_at_end(placed, in_flight, moves)
    for m in moves:
        if m.vm.anti_affinity:
            assert groups[m.target].count(m.vm.anti_affinity) == 1

    # What starts keeps within every limit raised by prepare_ahead (counting what already runs);
    # waiting only when such a limit binds.
    def slots(x: Move | InFlight) -> list[tuple[str, str]]:
        return [("out", x.source), ("in", x.target), ("region", "")]

    limit = {
        "out": config.max_outbound_per_host + config.prepare_ahead,
        "in": config.max_inbound_per_host + config.prepare_ahead,
        "region": config.max_per_region + config.prepare_ahead,
    }
    already = Counter(s for f in in_flight for s in slots(f))
    started = Counter(s for m in result.start for s in slots(m))
    assert all(already[s] + n <= limit[s[0]] for s, n in started.items())
    for m in result.waiting:
        assert any(already[s] + started[s] >= limit[s[0]] for s in slots(m))

    # No capacity only when no eligible host other than the source has room and no group clash at the end.
    if not ok:
        assert not moves
    for n in result.no_capacity:
        for h in ok - {n.vm.host}:
            free = hosts[h].capacity - used[h]
            assert not n.vm.needs.fits_in(free) or n.vm.anti_affinity in groups.get(h, []), (n, h)


ENDS = st.tuples(st.sampled_from(["s1", "s2", "s3"]), st.sampled_from(["t1", "t2", "t3"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ENDS, st.booleans()), max_size=10), st.lists(ENDS, max_size=10), configs)
def test_send_slots_properties(
    begun: list[tuple[tuple[str, str], bool]], asks: list[tuple[str, str]], config: PlacementConfig
) -> None:
    # Granted slots plus the moves sending already stay within every limit; moves still preparing
    # count for nothing; a slot is refused only when a limit binds.
    in_flight = [InFlight(f"v{i}", s, t, Resources(1, 1), sending) for i, ((s, t), sending) in enumerate(begun)]
    slots = SendSlots(in_flight, config)
    sending = Counter(k for f in in_flight if f.sending for k in (("out", f.source), ("in", f.target), ("region", "")))
    limit = {"out": config.max_outbound_per_host, "in": config.max_inbound_per_host, "region": config.max_per_region}
    before = Counter(sending)
    grants: Counter[tuple[str, str]] = Counter()
    for source, target in asks:
        keys = [("out", source), ("in", target), ("region", "")]
        granted = slots.take(source, target)
        assert granted == all(sending[k] < limit[k[0]] for k in keys)
        if granted:
            sending.update(keys)
            grants.update(keys)
    assert all(n <= max(0, limit[k[0]] - before[k]) for k, n in grants.items())


def brute_force_targets(
    evacuees: Sequence[PlacedVM],
    hosts: Mapping[str, HostRecord],
    placed: Sequence[PlacedVM],
    in_flight: Sequence[InFlight],
) -> dict[str, str | None]:
    """The placement rule as the docstring states it, by scoring every host for every VM: the
    allowed host left with the largest free memory fraction, then vCPU fraction, then lowest id."""
    targets = [h for h, row in hosts.items() if trusted_and_fresh(row)]
    free = {h: hosts[h].capacity - hosts[h].load for h in targets}
    groups: dict[str, set[str]] = {h: set() for h in targets}
    group_of = {v.name: v.anti_affinity for v in placed}
    for h, g in [(v.host, v.anti_affinity) for v in placed] + [(f.target, group_of.get(f.vm, "")) for f in in_flight]:
        if g and h in groups:
            groups[h].add(g)
    for f in in_flight:
        if f.target in free:
            free[f.target] -= f.needs

    def key(h: str, needs: Resources) -> tuple[Fraction, Fraction, str]:
        cap, after = hosts[h].capacity, free[h] - needs
        mem = Fraction(after.memory_mib, cap.memory_mib) if cap.memory_mib else Fraction(0)
        cpu = Fraction(after.vcpus, cap.vcpus) if cap.vcpus else Fraction(0)
        return -mem, -cpu, h

    chosen: dict[str, str | None] = {}
    for v in sorted(evacuees, key=lambda v: (-v.priority, v.name)):
        allowed = [
            h
            for h in targets
            if h != v.host and v.needs.fits_in(free[h]) and not (v.anti_affinity and v.anti_affinity in groups[h])
        ]
        best = min(allowed, key=lambda h: key(h, v.needs)) if allowed else None
        chosen[v.name] = best
        if best is not None:
            free[best] -= v.needs
            if v.anti_affinity:
                groups[best].add(v.anti_affinity)
    return chosen


@settings(max_examples=300, deadline=None)
@given(scenarios(), configs)
def test_the_fast_search_chooses_what_scoring_every_host_chooses(scenario: Scenario, config: PlacementConfig) -> None:
    evacuees, hosts, placed, in_flight = scenario
    result = plan_evacuation(evacuees, hosts, placed, in_flight, NOW, config)
    got: dict[str, str | None] = {m.vm.name: m.target for m in result.start + result.waiting}
    got.update({n.vm.name: None for n in result.no_capacity})
    assert got == brute_force_targets(evacuees, hosts, placed, in_flight)


def test_a_large_region_is_planned_as_scoring_every_host_would() -> None:
    # The benchmark's region cut down to 180 hosts of one capacity: long runs of hosts per group.
    from smig.bench.placement import region as bench_region

    rows, placed, evacuees = bench_region(seed=3, now=NOW)
    evacuees = evacuees[:60]
    keep = {f"h{i:04d}" for i in range(0, 1000, 8)} | {v.host for v in evacuees}
    rows = {h: r for h, r in rows.items() if h in keep}
    placed = [v for v in placed if v.host in keep]
    result = plan_evacuation(evacuees, rows, placed, (), NOW, CFG)
    got = {m.vm.name: m.target for m in result.start + result.waiting}
    assert len(got) == 60 and not result.no_capacity
    assert got == brute_force_targets(evacuees, rows, placed, ())

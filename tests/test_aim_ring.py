"""The adjacency ring: who measures whom, how it re-stitches around untrusted hosts, and how little
it moves when a host joins or leaves."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from smig.aim.ring import assign_monitors, reassignments, ring_order, subjects_of
from smig.errors import ConfigError

REGION = [f"host-{i:02d}" for i in range(50)]


def test_nobody_monitors_itself_and_each_subject_gets_k_distinct_monitors() -> None:
    for k in (1, 2, 3, 5):
        assignment = assign_monitors(REGION, k)
        assert set(assignment) == set(REGION)
        for subject, monitors in assignment.items():
            assert subject not in monitors
            assert len(set(monitors)) == len(monitors) == k
            assert set(monitors) <= set(REGION)


def test_monitors_are_the_next_hosts_clockwise_nearest_first() -> None:
    ring = ring_order(REGION)
    assignment = assign_monitors(REGION, 3)
    assert tuple(assignment) == ring, "the assignment iterates in ring order"
    for i, subject in enumerate(ring):
        assert assignment[subject] == tuple(ring[(i + step) % len(ring)] for step in (1, 2, 3))


def test_assignment_is_deterministic_and_ignores_input_order() -> None:
    shuffled = list(REGION)
    random.Random(7).shuffle(shuffled)
    assert assign_monitors(REGION) == assign_monitors(shuffled) == assign_monitors(tuple(reversed(REGION)))
    assert assign_monitors(iter(REGION)) == assign_monitors(REGION)


def test_ring_order_follows_sha256_of_the_id_not_its_name() -> None:
    # Pinned: a change of hash (say to Python's salted hash()) would reshuffle every region.
    assert ring_order(["a", "b", "c", "d"]) == ("d", "c", "b", "a")


def test_untrusted_hosts_are_still_monitored_but_monitor_nobody() -> None:
    untrusted = set(REGION[::7])
    assignment = assign_monitors(REGION, 2, not_monitors=untrusted)
    assert set(assignment) == set(REGION), "untrusted hosts are still subjects"
    for subject, monitors in assignment.items():
        assert len(monitors) == 2 and subject not in monitors
        assert not untrusted & set(monitors)
    for host in untrusted:
        assert subjects_of(assignment, host) == ()


def test_the_ring_is_restitched_over_a_run_of_untrusted_hosts() -> None:
    ring = ring_order(REGION)
    run = set(ring[10:14])
    assignment = assign_monitors(REGION, 2, not_monitors=run)
    # Whoever had monitors inside the run now reaches past it to the first trusted hosts.
    assert assignment[ring[8]] == (ring[9], ring[14])
    assert assignment[ring[9]] == (ring[14], ring[15])
    for inside in ring[10:14]:
        assert assignment[inside] == (ring[14], ring[15])
    # ring[14] now carries its two trusted predecessors and the four untrusted hosts between them.
    assert set(subjects_of(assignment, ring[14])) == {ring[8], ring[9], *run}


def test_excluded_ids_that_left_the_region_are_ignored() -> None:
    assert assign_monitors(REGION, not_monitors={"gone-long-ago"}) == assign_monitors(REGION)


def test_with_nobody_excluded_every_monitor_carries_exactly_k_subjects() -> None:
    for k in (1, 2, 3):
        assignment = assign_monitors(REGION, k)
        load = Counter(m for monitors in assignment.values() for m in monitors)
        assert set(load.values()) == {k} and set(load) == set(REGION)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_host_leaving_changes_exactly_its_subjects_and_itself(k: int) -> None:
    # Bound: with nobody excluded and more than k + 1 hosts, a host monitors exactly its k
    # predecessors, so its leaving changes those k subjects' sets, plus its own row: k + 1.
    before = assign_monitors(REGION, k)
    for leaver in REGION:
        after = assign_monitors([h for h in REGION if h != leaver], k)
        changed = reassignments(before, after)
        assert changed == {leaver, *subjects_of(before, leaver)}
        assert len(changed) == k + 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_host_joining_changes_exactly_its_new_subjects_and_itself(k: int) -> None:
    before = assign_monitors(REGION, k)
    for i in range(50):
        joiner = f"new-{i}"
        after = assign_monitors([*REGION, joiner], k)
        changed = reassignments(before, after)
        assert changed == {joiner, *subjects_of(after, joiner)}
        assert len(changed) == k + 1


def test_churn_with_untrusted_hosts_is_confined_to_the_leavers_subjects() -> None:
    # With exclusions the bound becomes: the leaver, its k trusted predecessors, and the untrusted
    # hosts between them -- exactly the subjects it monitored, nobody else.
    untrusted = set(REGION[::5])
    before = assign_monitors(REGION, 2, not_monitors=untrusted)
    for leaver in REGION:
        after = assign_monitors([h for h in REGION if h != leaver], 2, not_monitors=untrusted)
        assert reassignments(before, after) == {leaver, *subjects_of(before, leaver)}


def test_a_host_turning_untrusted_hands_its_subjects_to_the_next_trusted_hosts() -> None:
    ring = ring_order(REGION)
    before = assign_monitors(REGION, 2)
    fallen = ring[20]
    after = assign_monitors(REGION, 2, not_monitors={fallen})
    # Its own monitors are unchanged: it is still measured, and more than ever needs to be.
    assert reassignments(before, after) == set(subjects_of(before, fallen)) == {ring[18], ring[19]}
    assert after[fallen] == before[fallen]


def test_a_region_of_one_host_has_nobody_to_measure_it() -> None:
    assert assign_monitors(["solo"]) == {"solo": ()}


def test_a_region_of_two_hosts_measure_each_other() -> None:
    assert assign_monitors(["a", "b"], 2) == {"a": ("b",), "b": ("a",)}
    assert assign_monitors(["a", "b"], 2, not_monitors={"b"}) == {"a": (), "b": ("a",)}


def test_a_region_of_three_hosts_with_k_two_is_fully_meshed() -> None:
    assignment = assign_monitors(["a", "b", "c"], 2)
    assert {s: set(m) for s, m in assignment.items()} == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}
    one_left = assign_monitors(["a", "b", "c"], 2, not_monitors={"a", "b"})
    assert one_left == {"a": ("c",), "b": ("c",), "c": ()}


def test_small_regions_never_change_more_than_k_plus_one_subjects() -> None:
    hosts = [f"h{i}" for i in range(8)]
    for k in (1, 2, 3):
        for n in range(len(hosts)):
            changed = reassignments(assign_monitors(hosts[:n], k), assign_monitors(hosts[: n + 1], k))
            assert len(changed) <= k + 1


def test_an_empty_region_has_no_assignment() -> None:
    assert assign_monitors([]) == {}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least one monitor"):
        assign_monitors(REGION, 0)
    with pytest.raises(ConfigError, match="host-03"):
        assign_monitors([*REGION, "host-03"])
    with pytest.raises(ConfigError, match="not the string"):
        assign_monitors("host-01")

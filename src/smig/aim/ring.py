"""The adjacency ring of AIM: which hosts measure which.

A hypervisor cannot be trusted to measure itself, so every host of a region (a *subject*) is
measured by ``k`` of its neighbours (its *monitors*). The RC-TCB decides who those are with
:func:`assign_monitors`, a pure function of the region's host ids:

- Hosts sit on a ring in the order of the SHA-256 of their id. The order is the same in every
  process and every run (Python's ``hash()`` is salted per process), and it has nothing to do with
  how the ids were named or listed, so nobody picks their neighbours by picking a name.
- A subject's monitors are the next ``k`` eligible hosts clockwise after it, nearest first; a host
  never monitors itself.
- Hosts in ``not_monitors`` (UNTRUSTED ones, say) are still subjects, but the ring is re-stitched
  around them: they are skipped when monitors are chosen, because a report from them counts for
  nothing.

Successor-on-a-hash-ring keeps churn small. With nobody excluded and more than ``k + 1`` hosts,
every host monitors exactly its ``k`` nearest predecessors; a host joining or leaving therefore
changes the monitor set of exactly ``k + 1`` subjects (those ``k`` predecessors and the host
itself), and never more than ``k + 1`` in smaller regions. Excluded hosts add to that only the
excluded subjects that sit in the arc just before the host, which the ring skipped to reach it.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

from smig.errors import ConfigError


def _ring_key(host: str) -> tuple[bytes, str]:
    # The id breaks ties only in the (astronomically unlikely) case of a SHA-256 collision, so
    # that the order stays total and deterministic even then.
    return hashlib.sha256(host.encode("utf-8")).digest(), host


def ring_order(hosts: Iterable[str]) -> tuple[str, ...]:
    """The hosts in ring order (clockwise), starting from the smallest hash.

    Raises :class:`~smig.errors.ConfigError` if ``hosts`` is a single string or lists an id twice.
    """
    if isinstance(hosts, str):
        # A bare string is iterable too, and would silently become a region of one-letter hosts.
        raise ConfigError(f"hosts must be a collection of host ids, not the string {hosts!r}")
    listed = list(hosts)
    duplicates = sorted(h for h, n in Counter(listed).items() if n > 1)
    if duplicates:
        raise ConfigError(f"host ids must be unique in a region; listed more than once: {', '.join(duplicates)}")
    return tuple(sorted(listed, key=_ring_key))


def assign_monitors(
    hosts: Iterable[str], k: int = 2, *, not_monitors: Collection[str] = ()
) -> dict[str, tuple[str, ...]]:
    """Give every host (subject) its monitors: the next ``k`` eligible hosts clockwise after it.

    Returns a mapping from each subject to its monitors, nearest first; the mapping iterates in
    ring order. Every host is a subject, including those in ``not_monitors``; no host in
    ``not_monitors`` is anyone's monitor. Ids in ``not_monitors`` that are not in ``hosts`` are
    ignored (a host may be excluded and gone). When fewer than ``k`` eligible hosts other than
    the subject exist, the subject gets all of them, possibly none.

    Raises :class:`~smig.errors.ConfigError` if ``k < 1``, if ``hosts`` is a single string, or if
    a host id is listed twice.
    """
    if k < 1:
        raise ConfigError(f"each host needs at least one monitor; k={k} is not a valid monitor count")
    ring = ring_order(hosts)
    excluded = frozenset(not_monitors)
    # Positions on the ring of the hosts that may monitor, ascending; found by bisection so that a
    # long run of excluded hosts costs nothing per subject (the simulator runs thousands of hosts).
    eligible = [i for i, host in enumerate(ring) if host not in excluded]
    assignment: dict[str, tuple[str, ...]] = {}
    for i, subject in enumerate(ring):
        others = len(eligible) - (0 if subject in excluded else 1)
        first = bisect_right(eligible, i)
        # Walking from the first eligible host after the subject, the subject itself (if eligible)
        # would come up only after every other eligible host; taking at most ``others`` steps
        # therefore never reaches it.
        assignment[subject] = tuple(ring[eligible[(first + step) % len(eligible)]] for step in range(min(k, others)))
    return assignment


def subjects_of(assignment: Mapping[str, Sequence[str]], monitor: str) -> tuple[str, ...]:
    """The subjects that ``monitor`` measures under ``assignment``, in the assignment's order."""
    return tuple(subject for subject, monitors in assignment.items() if monitor in monitors)


def reassignments(before: Mapping[str, Sequence[str]], after: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """The subjects whose set of monitors differs between two assignments.

    A subject present in only one of them (a host that joined or left) counts as changed. Only the
    set matters, not the order: the RC-TCB needs to know whom to re-measure and whose reports to
    stop accepting, not who is nearest.
    """
    subjects = before.keys() | after.keys()
    return frozenset(
        s for s in subjects if s not in before or s not in after or frozenset(before[s]) != frozenset(after[s])
    )

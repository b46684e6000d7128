"""Placement: *where* the VMs of an untrustworthy host go, and which of those moves start now.

Pure functions over plain data with the time passed in, so the RC-TCB service, the simulator
and the tests run the same decisions. :func:`plan_evacuation` turns the evacuees, the region's
IVT rows, every VM of the region and the migrations already running into a :class:`Plan`:

- ``start``: moves to begin now (their target is prepared at once);
- ``waiting``: moves whose target is reserved, held back by a concurrency limit (the
  orchestrator re-plans once running migrations finish);
- ``no_capacity``: VMs with nowhere trusted to go, each with the reason, to be raised as an event.

A target is only ever a host whose row is TRUSTED and verified within the freshness window
(:func:`eligible`), never the VM's own source.

The concurrency limits bound the migrations *sending* at once (:class:`SendSlots`). A move may
begin, and have its target prepare an incoming slot, ``prepare_ahead`` places past each limit: a
destination takes seconds to boot its QEMU, and a slot prepared while earlier migrations still
run lets the next one send the moment a sending slot frees.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from smig.errors import ConfigError
from smig.model import HostRecord, PlacedVM, Resources, TrustState

__all__ = [
    "InFlight",
    "Move",
    "NoCapacity",
    "PlacementConfig",
    "Plan",
    "SendSlots",
    "eligible",
    "plan_evacuation",
]


@dataclass(frozen=True)
class PlacementConfig:
    """How placement chooses targets and how many migrations may run at once.

    ``freshness_s``: a target's last verified measurement must be at most this old.
    ``max_outbound_per_host``: migrations leaving one source at once (KubeVirt's
    ``parallelOutboundMigrationsPerNode``). ``max_per_region``: migrations running at once in the
    region (KubeVirt's ``parallelMigrationsPerCluster``). ``max_inbound_per_host``: migrations
    arriving at one target at once. ``prepare_ahead``: how many moves past each of those limits
    may begin anyway, preparing their target while they wait to send (0: a move begins only when it
    may send).

    Raises :class:`~smig.errors.ConfigError` if a value cannot be used.
    """

    freshness_s: float = 10.0
    max_outbound_per_host: int = 2
    max_per_region: int = 5
    max_inbound_per_host: int = 2
    prepare_ahead: int = 2

    def __post_init__(self) -> None:
        fresh = self.freshness_s
        if isinstance(fresh, bool) or not isinstance(fresh, int | float) or not math.isfinite(fresh) or fresh <= 0:
            raise ConfigError(
                f"placement freshness_s must be a positive, finite number of seconds, got {fresh!r}; "
                "set it to at least the AIM measurement interval (default 10.0)"
            )
        for name in ("max_outbound_per_host", "max_per_region", "max_inbound_per_host"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                # Zero would hold every move in `waiting` forever: the evacuation would never start.
                raise ConfigError(
                    f"placement {name} must be a whole number of at least 1, got {value!r}; "
                    "it bounds how many migrations run at once"
                )
        ahead = self.prepare_ahead
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
            raise ConfigError(
                f"placement prepare_ahead must be a whole number of at least 0, got {ahead!r}; "
                "it is how many moves may prepare their target while waiting to send"
            )


@dataclass(frozen=True)
class InFlight:
    """A migration already begun: ``needs`` is reserved on ``target`` and it counts against the
    limits. ``sending``: past preparing its target (the source sends, or the VM is being settled)."""

    vm: str
    source: str
    target: str
    needs: Resources
    sending: bool = True


@dataclass(frozen=True)
class Move:
    """Migrate ``vm`` from ``source`` to ``target``."""

    vm: PlacedVM
    source: str
    target: str


@dataclass(frozen=True)
class NoCapacity:
    """No trusted host can take ``vm``; ``reason`` says what was missing."""

    vm: PlacedVM
    reason: str


@dataclass(frozen=True)
class Plan:
    """The outcome of one placement round; every evacuee is in exactly one of the three tuples.

    ``start`` and ``waiting`` are in placement order: highest priority first, then by VM name.
    """

    start: tuple[Move, ...]
    waiting: tuple[Move, ...]
    no_capacity: tuple[NoCapacity, ...]


def eligible(row: HostRecord, now: float, freshness_s: float) -> bool:
    """Whether ``row``'s host may receive VMs at ``now``: TRUSTED, and verified at most ``freshness_s`` ago.

    A verification time later than ``now`` (clock skew between RC-TCB replicas) counts as fresh.
    """
    verified_at = row.verified_at
    return row.state is TrustState.TRUSTED and verified_at is not None and now - verified_at <= freshness_s


def plan_evacuation(
    evacuees: Sequence[PlacedVM],
    hosts: Mapping[str, HostRecord],
    placed: Sequence[PlacedVM],
    in_flight: Sequence[InFlight],
    now: float,
    config: PlacementConfig,
) -> Plan:
    """Choose a trusted target for each evacuee and decide which moves start now.

    ``evacuees`` are VMs to move off their current host (``PlacedVM.host`` is the source); VM
    names are unique in a region. ``hosts`` are the region's IVT rows by host id. ``placed`` is
    every VM of the region where it runs now, evacuees and in-flight VMs included: it supplies
    the anti-affinity groups already on each host and the group of each in-flight VM.
    ``in_flight`` are migrations already running.

    Evacuees are placed by ``(-priority, name)``, each on the fitting, anti-affinity-respecting
    eligible host left with the largest free memory fraction (then vCPU fraction, then lowest
    host id). A placed move starts unless the source's outbound, the target's inbound or the
    region's count of begun moves is at its limit plus ``prepare_ahead``; then it waits with its
    target reserved. The result
    depends only on the inputs' contents, not on their order. Raises nothing.
    """
    ledger = _Ledger(hosts, placed, in_flight, now, config)
    start: list[Move] = []
    waiting: list[Move] = []
    no_capacity: list[NoCapacity] = []
    for vm in sorted(evacuees, key=lambda v: (-v.priority, v.name)):
        target, reason = ledger.choose(vm)
        if target is None:
            no_capacity.append(NoCapacity(vm, reason))
            continue
        move = Move(vm, vm.host, target)
        if ledger.reserve(move):
            start.append(move)
        else:
            waiting.append(move)
    return Plan(tuple(start), tuple(waiting), tuple(no_capacity))


class _Ledger:
    """The running account of one planning round: free room, groups and running counts per host.

    Mutable, but local to a single :func:`plan_evacuation` call.
    """

    def __init__(
        self,
        hosts: Mapping[str, HostRecord],
        placed: Sequence[PlacedVM],
        in_flight: Sequence[InFlight],
        now: float,
        config: PlacementConfig,
    ) -> None:
        self._config = config
        # Sorted so that every scan, and so every tie, is independent of the mapping's order.
        self._targets = sorted(h for h, row in hosts.items() if eligible(row, now, config.freshness_s))
        self._capacity = {h: hosts[h].capacity for h in self._targets}
        self._free = {h: hosts[h].capacity - hosts[h].load for h in self._targets}
        self._groups: dict[str, set[str]] = {h: set() for h in self._targets}
        group_of = {vm.name: vm.anti_affinity for vm in placed}
        for vm in placed:
            self._add_group(vm.host, vm.anti_affinity)
        for m in in_flight:
            if m.target in self._free:
                self._free[m.target] -= m.needs
            self._add_group(m.target, group_of.get(m.vm, ""))
        # Every begun move counts, and each limit is raised by prepare_ahead.
        self._begun = _Slots(in_flight, config, extra=config.prepare_ahead)
        # Targets grouped by capacity, each group kept sorted by _order. Within a group the
        # spread key orders hosts the same way whatever the VM needs, so a group's best allowed
        # host is the first allowed one in that order: a VM looks at a few hosts per group instead
        # of computing the key of every host in the region (1,000 evacuees over 1,000 hosts took
        # 8 s that way; `smig bench placement`).
        self._classes: dict[Resources, list[tuple[int, int, str]]] = {}
        for h in self._targets:
            self._classes.setdefault(self._capacity[h], []).append(self._order(h))
        for order in self._classes.values():
            order.sort()

    def _add_group(self, host: str, group: str) -> None:
        if group and host in self._groups:
            self._groups[host].add(group)

    def _order(self, host: str) -> tuple[int, int, str]:
        """The spread key's order among hosts of one capacity: most free memory, then most free
        vCPUs, then host id (a dimension the capacity lacks does not count, as in the key)."""
        cap, free = self._capacity[host], self._free[host]
        return (-free.memory_mib if cap.memory_mib > 0 else 0, -free.vcpus if cap.vcpus > 0 else 0, host)

    def _allowed(self, vm: PlacedVM, host: str) -> bool:
        return (
            host != vm.host
            and vm.needs.fits_in(self._free[host])
            and not (vm.anti_affinity and vm.anti_affinity in self._groups[host])
        )

    def choose(self, vm: PlacedVM) -> tuple[str | None, str]:
        """The best target for ``vm`` and ``""``, or ``None`` and why there is none; reserves the target.

        The best is the allowed host with the least :meth:`_spread_key`: each capacity group's
        first allowed host in :meth:`_order`, then the least key among those."""
        best: str | None = None
        best_key: tuple[Fraction, Fraction, str] | None = None
        for cap, order in self._classes.items():
            for free_mem, _, host in order:
                if cap.memory_mib > 0 and -free_mem < vm.needs.memory_mib:
                    break  # sorted by free memory: no host further on has room either
                if self._allowed(vm, host):
                    key = self._spread_key(host, vm.needs)
                    if best_key is None or key < best_key:
                        best, best_key = host, key
                    break
        if best is None:
            candidates = [h for h in self._targets if h != vm.host]
            roomy = [h for h in candidates if vm.needs.fits_in(self._free[h])]
            return None, self._why_not(vm, candidates, roomy)
        order = self._classes[self._capacity[best]]
        order.pop(bisect.bisect_left(order, self._order(best)))
        self._free[best] -= vm.needs
        bisect.insort(order, self._order(best))
        self._add_group(best, vm.anti_affinity)
        return best, ""

    def _spread_key(self, host: str, needs: Resources) -> tuple[Fraction, Fraction, str]:
        # Exact fractions: float rounding must not decide between two equally free hosts.
        after = self._free[host] - needs
        cap = self._capacity[host]
        mem = Fraction(after.memory_mib, cap.memory_mib) if cap.memory_mib > 0 else Fraction(0)
        cpu = Fraction(after.vcpus, cap.vcpus) if cap.vcpus > 0 else Fraction(0)
        return -mem, -cpu, host

    def _why_not(self, vm: PlacedVM, candidates: list[str], roomy: list[str]) -> str:
        if not candidates:
            return (
                f"no trusted host verified within the last {self._config.freshness_s:g}s "
                f"other than its source {vm.host!r}"
            )
        if not roomy:
            return f"no trusted host with {vm.needs.vcpus} vCPUs and {vm.needs.memory_mib} MiB free"
        return f"anti-affinity group {vm.anti_affinity!r} excludes every trusted host with room"

    def reserve(self, move: Move) -> bool:
        """Count ``move`` as begun and return True, or return False if a limit holds it back."""
        return self._begun.take(move.source, move.target)


class _Slots:
    """The three concurrency limits (per source, per target, per region), each raised by
    ``extra``, over ``moves`` already counted; :meth:`take` counts one more or refuses."""

    def __init__(self, moves: Sequence[InFlight], config: PlacementConfig, *, extra: int) -> None:
        self._limits = (
            config.max_outbound_per_host + extra,
            config.max_inbound_per_host + extra,
            config.max_per_region + extra,
        )
        self._outbound = Counter(m.source for m in moves)
        self._inbound = Counter(m.target for m in moves)
        self._running = len(moves)

    def take(self, source: str, target: str) -> bool:
        """Count ``source`` → ``target`` and return True, or return False if a limit is reached."""
        out, into, region = self._limits
        if self._outbound[source] >= out or self._inbound[target] >= into or self._running >= region:
            return False
        self._outbound[source] += 1
        self._inbound[target] += 1
        self._running += 1
        return True


class SendSlots(_Slots):
    """Who may start sending now: the concurrency limits over the migrations sending already.

    Built from the moves in flight; :meth:`take` grants a slot (and counts it) or refuses. Local to
    one round of the orchestrator, like the ledger of one plan.
    """

    def __init__(self, in_flight: Sequence[InFlight], config: PlacementConfig) -> None:
        super().__init__([m for m in in_flight if m.sending], config, extra=0)

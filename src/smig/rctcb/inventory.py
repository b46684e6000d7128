"""What runs where: the VMs a host's agent reports, weighed against what the IVT already knows.

An agent tells the RC-TCB which VMs its host runs, so that an evacuation knows what to move and a
target knows what to prepare (each VM's spec). That is a host's word about itself, so it counts
only as far as it cannot hurt:

- a host that is not in good standing (SUSPECT, UNTRUSTED, UNKNOWN) cannot change its inventory:
  the IVT keeps what it reported while it was trusted, which is what gets evacuated. A host
  about to be evacuated could otherwise hide its VMs, or claim others';
- a VM with a migration order in flight belongs to the orchestrator, which moves its placement
  when the order lands: neither side's report of it counts meanwhile;
- a VM placed on another host is not taken over because this host says it runs it; that is
  refused, and recorded, as the sign of a copy that should not exist.

:func:`merge_inventory` is the pure rule; :func:`apply_inventory` writes its outcome (placements,
the host's load, one audit entry) through the region in one transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from smig.errors import HostNotFound
from smig.model import HostRecord, PlacedVM, Resources, TrustState
from smig.rctcb.region import Region

__all__ = ["InventoryResult", "apply_inventory", "merge_inventory"]

# States whose inventory reports count. ENROLLING and MAINTENANCE hosts hold no one's VMs on
# trust, but their own list is what an operator would move: take it.
REPORTING_STATES = frozenset({TrustState.TRUSTED, TrustState.ENROLLING, TrustState.MAINTENANCE})


@dataclass(frozen=True)
class InventoryResult:
    """What a host's report did: the VMs now placed there, and those whose report did not count."""

    placed: tuple[PlacedVM, ...]
    refused: tuple[tuple[str, str], ...]  # (vm, why)
    frozen: bool = False  # the whole report was ignored: the host is not in good standing

    @property
    def load(self) -> Resources:
        total = Resources(0, 0)
        for vm in self.placed:
            total = total + vm.needs
        return total


def merge_inventory(
    host: str,
    state: TrustState,
    reported: Sequence[PlacedVM],
    placed: Sequence[PlacedVM],
    moving: frozenset[str],
) -> InventoryResult:
    """The VMs ``host`` holds after its report ``reported``, given every placement in ``placed``
    and the VMs with an active order (``moving``)."""
    mine = [vm for vm in placed if vm.host == host]
    if state not in REPORTING_STATES:
        why = f"{host} is {state.value}: its inventory stays as it was while trusted"
        return InventoryResult(tuple(mine), tuple((vm.name, why) for vm in reported), frozen=True)
    where = {vm.name: vm.host for vm in placed}
    kept = {vm.name: vm for vm in mine if vm.name in moving}
    refused: list[tuple[str, str]] = []
    for vm in reported:
        if vm.name in moving:
            if vm.name not in kept:
                refused.append((vm.name, "it is being migrated; the orchestrator places it when it lands"))
            continue
        elsewhere = where.get(vm.name)
        if elsewhere is not None and elsewhere != host:
            refused.append((vm.name, f"the IVT places it on {elsewhere}: a second copy is not adopted"))
            continue
        kept[vm.name] = dataclasses.replace(vm, host=host)
    return InventoryResult(tuple(kept[name] for name in sorted(kept)), tuple(refused))


def apply_inventory(region: Region, host: str, reported: Sequence[PlacedVM], now: float) -> InventoryResult:
    """Merge ``host``'s report into the IVT; placements, load and an ``inventory.*`` audit entry
    are written in one transaction. Raises HostNotFound, StoreError."""
    with region.writing() as (tx, rows, changed):
        row: HostRecord | None = rows.get(host)
        if row is None:
            raise HostNotFound(f"no IVT row for host {host!r}: enrol it first", host=host)
        moving = frozenset(o.vm for o in region.store.orders(True))
        result = merge_inventory(host, row.state, reported, region.store.placements(), moving)
        body: dict[str, object] = {
            "vms": [vm.name for vm in result.placed],
            "refused": [{"vm": vm, "why": why} for vm, why in result.refused],
        }
        if result.frozen:
            tx.audit("inventory.frozen", host, body, now)
            return result
        before = region.store.placements(host)
        if list(before) != list(result.placed) or row.load != result.load:
            tx.set_placements(host, result.placed)
            changed[host] = dataclasses.replace(row, load=result.load)
            tx.audit("inventory.changed", host, body, now)
        elif result.refused:
            tx.audit("inventory.refused", host, body, now)
    return result

"""The inventory rule (pure): what a host's report of its own VMs may change, and what it may not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smig.model import PlacedVM, Resources, TrustState
from smig.rctcb.inventory import REPORTING_STATES, merge_inventory

HOSTS = ("h1", "h2", "h3")
NAMES = [f"vm{i}" for i in range(8)]


def vm(name: str, host: str, memory: int = 256) -> PlacedVM:
    return PlacedVM(name, host, Resources(1, memory), spec=f'{{"name": "{name}"}}')


placements = st.dictionaries(st.sampled_from(NAMES), st.sampled_from(HOSTS)).map(
    lambda d: [vm(n, h) for n, h in sorted(d.items())]
)


@given(
    placed=placements,
    reported=st.lists(st.sampled_from(NAMES), unique=True),
    moving=st.frozensets(st.sampled_from(NAMES)),
    state=st.sampled_from(list(TrustState)),
)
def test_a_report_never_takes_another_hosts_vm_nor_moves_one_in_flight(
    placed: list[PlacedVM], reported: list[str], moving: frozenset[str], state: TrustState
) -> None:
    result = merge_inventory("h1", state, [vm(n, "h1", 512) for n in reported], placed, moving)
    where = {v.name: v.host for v in placed}
    mine_before = {v.name for v in placed if v.host == "h1"}
    mine_after = {v.name for v in result.placed}
    assert all(v.host == "h1" for v in result.placed)
    if state not in REPORTING_STATES:
        # A host not in good standing changes nothing about itself.
        assert result.frozen and mine_after == mine_before
        return
    for name in mine_after - mine_before:  # what it gained was free and not in flight
        assert name not in where and name not in moving
    for name in moving:  # a VM in flight stays where the IVT has it
        assert (name in mine_after) == (name in mine_before)
    for name in reported:
        if where.get(name, "h1") == "h1" and name not in moving:
            assert name in mine_after
    refused = {n for n, _ in result.refused}
    in_flight_elsewhere = {n for n in reported if n in moving and n not in mine_before}
    anothers = {n for n in reported if where.get(n, "h1") != "h1" and n not in moving}
    assert refused == in_flight_elsewhere | anothers
    assert result.load == Resources(len(result.placed), sum(v.needs.memory_mib for v in result.placed))


def test_a_stopped_vm_leaves_the_inventory_and_a_new_one_joins() -> None:
    result = merge_inventory("h1", TrustState.TRUSTED, [vm("b", "h1")], [vm("a", "h1")], frozenset())
    assert [v.name for v in result.placed] == ["b"] and result.refused == () and not result.frozen

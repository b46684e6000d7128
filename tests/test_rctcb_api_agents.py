"""An agent speaking for its own host through the real API: enrolling or re-syncing, and reporting
the VMs it runs. A host's word counts only for itself, only with its enrolled key, and never
while the host is not in good standing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smig.aim.keys import generate_key, public_key_pem
from smig.ivt.base import StoredOrder
from smig.model import PlacedVM, Resources, TrustState
from smig.rctcb.api import create_app
from tests.test_rctcb_api import Lab, new_lab, run


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield from new_lab(tmp_path)


def _enrol_body(lab: Lab, host: str, **changes: Any) -> dict[str, Any]:
    key = public_key_pem(lab.keys[host]).decode() if host in lab.keys else public_key_pem(generate_key()).decode()
    body = {"agent_key": key, "address": f"https://{host}.lab:7443", "capacity": {"vcpus": 4, "memory_mib": 4096}}
    return {**body, **changes}


def _vm(name: str, memory: int = 256) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mib": memory, "spec": {"name": name, "memory_mib": memory}}


def test_an_agent_resyncs_with_the_row_the_operator_enrolled_and_only_with_its_key(lab: Lab) -> None:
    async def story() -> None:
        async with lab.agent("h1") as h1, lab.operator() as op:
            r = await h1.put("/v1/hosts/h1/agent", json=_enrol_body(lab, "h1"))
            assert r.status_code == 200, r.text
            assert (r.json()["address"], r.json()["state"]) == ("https://h1.lab:7443", "trusted")
            assert r.json()["capacity"] == {"vcpus": 4, "memory_mib": 4096}
            again = await h1.put("/v1/hosts/h1/agent", json=_enrol_body(lab, "h1"))
            assert again.json() == r.json()  # a restarted agent changes nothing
            before = lab.snapshot()
            stranger = _enrol_body(lab, "h1", agent_key=public_key_pem(generate_key()).decode())
            r = await h1.put("/v1/hosts/h1/agent", json=stranger)
            assert (r.status_code, r.json()["reason"]) == (409, "key-mismatch")
            r = await h1.put("/v1/hosts/h2/agent", json=_enrol_body(lab, "h2"))
            assert (r.status_code, r.json()["reason"]) == (403, "not-yours")
            # Pointing its orders at a neighbour's agent: the address must be one its certificate names.
            r = await h1.put("/v1/hosts/h1/agent", json=_enrol_body(lab, "h1", address="https://h2.lab:7443"))
            assert (r.status_code, r.json()["reason"]) == (403, "address-not-yours")
            r = await op.put("/v1/hosts/h1/agent", json=_enrol_body(lab, "h1"))
            assert (r.status_code, r.json()["reason"]) == (403, "wrong-role")
            assert lab.snapshot() == before
        kinds = [e.kind for e in lab.store.audit_entries()]
        assert kinds.count("agent.resynced") == 1 and kinds[-4:] == ["api.rejected"] * 4

    run(story())


def test_an_unknown_host_enrols_itself_only_where_the_region_has_a_default_manifest(lab: Lab) -> None:
    async def story() -> None:
        async with lab.agent("h9") as h9:
            r = await h9.put("/v1/hosts/h9/agent", json=_enrol_body(lab, "h9"))
            assert (r.status_code, r.json()["reason"]) == (409, "operator-enrolment")
            assert "h9" not in lab.region.rows()
        lab.app = create_app(lab.region, ca_cert=lab.ca.cert, clock=lab.clock, default_manifest="d" * 64)
        async with lab.agent("h9") as h9:
            r = await h9.put("/v1/hosts/h9/agent", json=_enrol_body(lab, "h9"))
            assert r.status_code == 200, r.text
            # Never TRUSTED on its own word: ENROLLING until trusted monitors verify it.
            assert (r.json()["state"], r.json()["manifest"]) == ("enrolling", "d" * 64)

    run(story())


def test_inventory_places_what_a_host_runs_and_refuses_what_is_not_its_to_claim(lab: Lab) -> None:
    async def story() -> None:
        async with lab.agent("h1") as h1, lab.agent("h2") as h2:
            r = await h1.put("/v1/hosts/h1/vms", json={"vms": [_vm("web"), _vm("db", 512)]})
            assert r.status_code == 200, r.text
            assert r.json() == {"host": "h1", "placed": ["db", "web"], "refused": [], "frozen": False}
            assert lab.region.rows()["h1"].load == Resources(2, 768)
            placed = {vm.name: vm for vm in lab.store.placements("h1")}
            assert '"memory_mib": 512' in placed["db"].spec
            # h2 claims h1's VM: a second copy is never adopted.
            r = await h2.put("/v1/hosts/h2/vms", json={"vms": [_vm("web"), _vm("cache")]})
            assert r.json()["placed"] == ["cache"] and r.json()["refused"][0]["vm"] == "web"
            assert [vm.name for vm in lab.store.placements("h1")] == ["db", "web"]
            # h1 reports only db: web stopped.
            r = await h1.put("/v1/hosts/h1/vms", json={"vms": [_vm("db", 512)]})
            assert r.json()["placed"] == ["db"] and lab.region.rows()["h1"].load == Resources(1, 512)
            # A spec naming another VM is malformed.
            bad = {**_vm("x"), "spec": {"name": "y"}}
            r = await h1.put("/v1/hosts/h1/vms", json={"vms": [bad]})
            assert (r.status_code, r.json()["reason"]) == (422, "bad-vm")
            r = await h1.put("/v1/hosts/h2/vms", json={"vms": []})
            assert (r.status_code, r.json()["reason"]) == (403, "not-yours")

    run(story())


def test_an_untrusted_host_cannot_hide_its_vms_and_a_moving_vm_belongs_to_the_orchestrator(lab: Lab) -> None:
    async def story() -> None:
        async with lab.agent("h1") as h1:
            await h1.put("/v1/hosts/h1/vms", json={"vms": [_vm("web"), _vm("db")]})
            order = {"id": "db-1", "vm": {"name": "db"}, "state": "migrating"}
            with lab.store.transaction() as tx:
                tx.put_order(StoredOrder("db-1", "db", "migrating", True, order))
            r = await h1.put("/v1/hosts/h1/vms", json={"vms": [_vm("web")]})
            assert r.json()["placed"] == ["db", "web"]  # db is in flight: h1 saying it is gone does not count
            with lab.region.writing() as (_, rows, changed):
                changed["h1"] = dataclasses.replace(rows["h1"], state=TrustState.UNTRUSTED)
            r = await h1.put("/v1/hosts/h1/vms", json={"vms": []})
            assert r.status_code == 200 and r.json()["frozen"] is True
            # Nor may it move where the RC-TCB sends its orders.
            r = await h1.put("/v1/hosts/h1/agent", json=_enrol_body(lab, "h1"))
            assert (r.status_code, r.json()["reason"]) == (409, "frozen")
            assert lab.region.rows()["h1"].address == ""
            assert [vm.name for vm in lab.store.placements("h1")] == ["db", "web"]
        kinds = [e.kind for e in lab.store.audit_entries()]
        assert kinds[-2:] == ["inventory.frozen", "api.rejected"]
        assert all(isinstance(vm, PlacedVM) for vm in lab.store.placements())

    run(story())


def test_operators_and_agents_read_where_every_vm_runs(lab: Lab) -> None:
    async def story() -> None:
        async with lab.agent("h1") as h1, lab.agent("h2") as h2, lab.operator() as op:
            await h1.put("/v1/hosts/h1/vms", json={"vms": [_vm("web")]})
            await h2.put("/v1/hosts/h2/vms", json={"vms": [_vm("db", 512)]})
            expected = {
                "vms": [
                    {"name": "web", "host": "h1", "vcpus": 1, "memory_mib": 256},
                    {"name": "db", "host": "h2", "vcpus": 1, "memory_mib": 512},
                ]
            }
            assert (await op.get("/v1/vms")).json() == expected
            assert (await h2.get("/v1/vms")).json() == expected

    run(story())

"""The API routes a host's agent calls about its own host: enrol itself, report its VMs.

Both are a host speaking for itself, so each is allowed only to the agent whose certificate names
that host (an agent ``h1`` cannot enrol ``h2`` or report VMs on it), and each counts only as far
as the trust model lets a host's word count:

    PUT /v1/hosts/{host}/agent   [agent: itself]  enrol, or re-sync after a restart
    PUT /v1/hosts/{host}/vms     [agent: itself]  the VMs the host runs (see smig.rctcb.inventory)
    GET /v1/vms                  [agent, operator] every placement: which VM runs where

Enrolling: a host the operator enrolled already (the lab and a careful operator do, vouching for
the region's first hosts) re-syncs: same key → 200 with its row, its address and capacity
updated; a different key → 409, because a new key is a new identity and takes the operator's
re-enrolment. An unknown host enrols itself in ENROLLING, measured against the region's default
manifest, only if the service has one configured (``[rctcb] manifest``); otherwise 409 tells the
operator to enrol it. Either way a host never starts TRUSTED on its own word.
"""

# No `from __future__ import annotations`: FastAPI must see the route's dependency type, made in
# add_agent_routes, when it reads the signatures.
import asyncio
import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from typing import Annotated
from urllib.parse import urlsplit

from cryptography import x509
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field

from smig.errors import ConfigError, HostExists, HostNotFound
from smig.model import PlacedVM, Resources, valid_vm_name
from smig.rctcb.api_events import Broadcaster
from smig.rctcb.api_identity import ApiError, Identity, client_chain
from smig.rctcb.api_models import HOST_PATTERN, Capacity, HostOut, _In, host_out
from smig.rctcb.inventory import REPORTING_STATES, apply_inventory
from smig.rctcb.region import Region

__all__ = ["AgentEnrolIn", "InventoryIn", "InventoryOut", "add_agent_routes"]


class AgentEnrolIn(_In):
    agent_key: str = Field(min_length=1, max_length=16384, description="the agent's Ed25519 public key, PEM")
    address: str = Field(min_length=1, max_length=256, description="the base URL of the agent's orders API")
    capacity: Capacity
    region: str = Field("", max_length=256)


class VMIn(_In):
    name: str = Field(min_length=1, max_length=63)
    vcpus: int = Field(ge=1)
    memory_mib: int = Field(ge=1)
    spec: dict[str, object] = Field(description="the VM's spec, as a target needs it to prepare")
    priority: int = 0
    anti_affinity: str = Field("", max_length=63)


class InventoryIn(_In):
    vms: list[VMIn] = Field(max_length=4096)


class RefusedOut(BaseModel):
    vm: str
    why: str


class InventoryOut(BaseModel):
    host: str
    placed: list[str]
    refused: list[RefusedOut]
    frozen: bool


def _address_is_its_own(address: str, chain: Sequence[str | bytes] | None, host: str) -> None:
    """The address's host part must be a name or IP address in the caller's certificate: the
    RC-TCB's orders for ``host`` then reach a server holding ``host``'s key, and no other."""
    name = urlsplit(address).hostname
    if not address.startswith("https://") or not name:
        raise ApiError(422, "bad-address", f"the agent's address must be an https:// URL, not {address!r}")
    names: set[str] = set()
    if chain:
        try:
            leaf = x509.load_pem_x509_certificate(chain[0] if isinstance(chain[0], bytes) else chain[0].encode())
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = set(sans.get_values_for_type(x509.DNSName))
            names |= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        except (ValueError, x509.ExtensionNotFound):
            names = set()
    if name not in names:
        raise ApiError(
            403,
            "address-not-yours",
            f"{host}'s certificate does not name {name!r} (it names {', '.join(sorted(names)) or 'nothing'}): "
            "an agent may only give an address its own certificate covers",
        )


def _itself(who: Identity, host: str, what: str) -> None:
    # The route requires the agent role already; this is the "only itself" half.
    if who.name != host:
        raise ApiError(403, "not-yours", f"agent {who.name!r} may {what} only for its own host, not for {host!r}")


class PlacementOut(BaseModel):
    name: str
    host: str
    vcpus: int
    memory_mib: int


class PlacementsOut(BaseModel):
    vms: list[PlacementOut]


def add_agent_routes(
    router: FastAPI,
    region: Region,
    clock: Callable[[], float],
    events: Broadcaster,
    agent: Callable[..., object],
    reader: Callable[..., object],
    *,
    default_manifest: str = "",
) -> None:
    """Add the routes above; ``agent`` and ``reader`` are the dependencies that yield the caller's
    Identity for the agent role and for the reading roles."""
    Caller = Annotated[Identity, Depends(agent)]
    Reader = Annotated[Identity, Depends(reader)]

    @router.get("/v1/vms")
    async def placements(_: Reader) -> PlacementsOut:
        """Every VM the IVT places, and where."""
        vms = await asyncio.to_thread(region.store.placements)
        return PlacementsOut(
            vms=[
                PlacementOut(name=v.name, host=v.host, vcpus=v.needs.vcpus, memory_mib=v.needs.memory_mib) for v in vms
            ]
        )

    @router.put("/v1/hosts/{host}/agent")
    async def agent_enrol(host: str, body: AgentEnrolIn, who: Caller, request: Request) -> HostOut:
        """An agent enrols its host, or re-syncs with the row the operator enrolled. Its address
        must be one its own certificate names: a host cannot point its orders at a neighbour."""
        _itself(who, host, "enrol")
        _address_is_its_own(body.address, client_chain(request.scope), host)
        if not _valid_host(host):
            raise ApiError(422, "bad-host", f"{host!r} is not a valid host id")
        capacity = Resources(body.capacity.vcpus, body.capacity.memory_mib)
        now = clock()

        def run() -> HostOut:
            row = region.rows().get(host)
            if row is None:
                if not default_manifest:
                    raise ApiError(
                        409,
                        "operator-enrolment",
                        f"host {host!r} is not enrolled and this region has no default manifest: an "
                        "operator must enrol it (POST /v1/hosts, or `[rctcb] manifest` in the service configuration)",
                    )
                try:
                    decision = region.enroll(
                        host,
                        agent_key=body.agent_key,
                        manifest=default_manifest,
                        capacity=capacity,
                        now=now,
                        region=body.region,
                        address=body.address,
                    )
                except HostExists:  # enrolled by someone else between our read and write: re-sync
                    return run()
                except ConfigError as e:
                    raise ApiError(400, "bad-key", e.message) from e
                events_out.extend(decision.effects)
                return host_out(decision.rows.get(host) or region.rows()[host])
            if row.agent_key.strip() != body.agent_key.strip():
                raise ApiError(
                    409,
                    "key-mismatch",
                    f"host {host!r} is enrolled with another agent key; a new key takes an operator's "
                    "re-enrolment (POST /v1/hosts/{host}/reenrol after approving the new key)",
                )
            if (row.address, row.capacity, row.region or body.region) == (body.address, capacity, body.region):
                return host_out(row)
            if row.state not in REPORTING_STATES:
                # Where the RC-TCB sends a doubtful host's orders is not that host's to change.
                raise ApiError(
                    409,
                    "frozen",
                    f"host {host!r} is {row.state.value}: its address and capacity stay as they were "
                    "while it was trusted",
                )
            with region.writing() as (tx, rows, changed):
                current = rows[host]
                changed[host] = dataclasses.replace(current, address=body.address, capacity=capacity)
                body_out = {"address": body.address, "capacity": dataclasses.asdict(capacity)}
                tx.audit("agent.resynced", host, body_out, now)
            return host_out(changed[host])

        events_out: list[object] = []
        out = await asyncio.to_thread(run)
        events.publish(events_out)  # type: ignore[arg-type]
        return out

    @router.put("/v1/hosts/{host}/vms")
    async def inventory(host: str, body: InventoryIn, who: Caller) -> InventoryOut:
        """The VMs ``host`` runs, as its agent sees them; see smig.rctcb.inventory for what counts."""
        _itself(who, host, "report VMs")
        reported = []
        for vm in body.vms:
            if not valid_vm_name(vm.name) or vm.spec.get("name") != vm.name:
                raise ApiError(422, "bad-vm", f"VM {vm.name!r}: a bad name, or a spec naming another VM")
            reported.append(
                PlacedVM(
                    vm.name,
                    host,
                    Resources(vm.vcpus, vm.memory_mib),
                    vm.priority,
                    vm.anti_affinity,
                    json.dumps(vm.spec, sort_keys=True),
                )
            )
        try:
            result = await asyncio.to_thread(apply_inventory, region, host, reported, clock())
        except HostNotFound as e:
            raise ApiError(404, "unknown-host", e.message) from e
        return InventoryOut(
            host=host,
            placed=[vm.name for vm in result.placed],
            refused=[RefusedOut(vm=vm, why=why) for vm, why in result.refused],
            frozen=result.frozen,
        )


def _valid_host(host: str) -> bool:
    return re.fullmatch(HOST_PATTERN, host) is not None

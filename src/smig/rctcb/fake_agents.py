"""An in-memory region of host agents: the recorded side of the orchestrator's tests.

:class:`FakeRegionAgents` models what the real agents promise (:mod:`smig.rctcb.agents`): which
host runs, receives or holds each VM, outgoing migrations that go ``active → completed`` after a
number of ``progress`` polls (the source's VM then goes absent and the target's incoming slot
runs), idempotence per order id, and scripted faults per host or VM: refuse, stall, fail mid-way,
unreachable. It records every call and checks its invariant after each: a VM running on two hosts
at once raises AssertionError at once, in the call that caused it.

It lives outside the RC-TCB, so a test keeps the same object across a "restart" of the RC-TCB;
:meth:`FakeRegionAgents.to_json` / :meth:`from_json` carry it across a real process boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smig.errors import DestinationUnreachable, HypervisorError, MigrationError, VMNotFound
from smig.model import PlacedVM
from smig.rctcb.agents import MigrationPhase, MigrationView, VMWhere

__all__ = ["FakeRegionAgents", "Faults"]

_MIB = 1 << 20


@dataclass
class Faults:
    """Scripted misbehaviour. Host-wide entries use the VM name ``"*"``.

    ``refuse``: (source, vm) whose ``migrate`` raises. ``stall``: (host, vm) whose migrations, out
    of or into that host, never advance. ``fail_after``: (host, vm) → polls after which such a
    migration fails (the target's slot dies with it). ``unreachable``: hosts whose agent answers nothing but ``fence``
    (which goes through the BMC).
    """

    refuse: set[tuple[str, str]] = field(default_factory=set)
    stall: set[tuple[str, str]] = field(default_factory=set)
    fail_after: dict[tuple[str, str], int] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)

    def hits(self, table: set[tuple[str, str]] | dict[tuple[str, str], int], host: str, vm: str) -> bool:
        return (host, vm) in table or (host, "*") in table


class FakeRegionAgents:
    """Every host's agent, in memory; also the :class:`~smig.rctcb.agents.AgentDirectory`."""

    def __init__(self, *, polls_to_complete: int = 2) -> None:
        self.polls_to_complete = polls_to_complete  # default per VM; see `polls`
        self.polls: dict[str, int] = {}
        self.faults = Faults()
        self.hosts: dict[str, dict[str, str]] = {}  # host → vm → VMWhere value
        self.slots: dict[str, str] = {}  # "host/vm" → order id of its incoming slot
        self.migrations: dict[str, dict[str, Any]] = {}  # "source/vm" → its latest outgoing migration
        self.sizes: dict[str, int] = {}  # vm → memory in MiB
        # vm → `where` answers its target gives INCOMING after the migration completed, before it
        # runs the VM (a real QEMU stays "inmigrate" while it loads the device state)
        self.arriving: dict[str, int] = {}
        self._landing: dict[str, int] = {}  # "host/vm" → such answers still to give
        self.calls: list[tuple[str, str, str, str]] = []  # (host, method, vm, order id)
        self.peak_sending: dict[str, int] = {}  # source → most migrations it had active at once

    # -- the test's side -------------------------------------------------------------------------

    def add_host(self, host: str) -> None:
        self.hosts.setdefault(host, {})

    def run(self, vm: PlacedVM) -> None:
        """``vm`` runs on ``vm.host`` (as if it had been launched there)."""
        self.add_host(vm.host)
        self.hosts[vm.host][vm.name] = VMWhere.RUNNING.value
        self.sizes[vm.name] = vm.needs.memory_mib
        self._check(vm.name)

    def running_on(self, vm: str) -> list[str]:
        return sorted(h for h, vms in self.hosts.items() if vms.get(vm) == VMWhere.RUNNING.value)

    def agent(self, host: str) -> _FakeAgent:
        self.add_host(host)
        return _FakeAgent(self, host)

    def to_json(self) -> dict[str, Any]:
        f = self.faults
        return {
            "polls_to_complete": self.polls_to_complete, "polls": self.polls, "hosts": self.hosts,
            "slots": self.slots, "migrations": self.migrations, "sizes": self.sizes,
            "calls": [list(c) for c in self.calls],
            "faults": {
                "refuse": sorted(map(list, f.refuse)), "stall": sorted(map(list, f.stall)),
                "fail_after": [[h, v, n] for (h, v), n in sorted(f.fail_after.items())],
                "unreachable": sorted(f.unreachable),
            },
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FakeRegionAgents:
        fake = cls(polls_to_complete=data["polls_to_complete"])
        fake.polls, fake.hosts, fake.slots = data["polls"], data["hosts"], data["slots"]
        fake.migrations, fake.sizes = data["migrations"], data["sizes"]
        fake.calls = [(h, m, v, o) for h, m, v, o in data["calls"]]
        f = data["faults"]
        fake.faults = Faults(
            {(h, v) for h, v in f["refuse"]},
            {(h, v) for h, v in f["stall"]},
            {(h, v): n for h, v, n in f["fail_after"]},
            set(f["unreachable"]),
        )
        return fake

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)  # atomic: a process killed mid-write leaves the previous state

    @classmethod
    def load(cls, path: Path) -> FakeRegionAgents:
        return cls.from_json(json.loads(path.read_text()))

    # -- the model -------------------------------------------------------------------------------

    def _check(self, vm: str) -> None:
        running = self.running_on(vm)
        assert len(running) <= 1, f"VM {vm!r} runs on {running} at once"

    def _enter(self, host: str, method: str, vm: str, order_id: str = "") -> None:
        self.calls.append((host, method, vm, order_id))
        if host in self.faults.unreachable and method != "fence":
            raise HypervisorError(f"the agent of {host} does not answer", host=host, vm=vm)

    def _set(self, host: str, vm: str, where: VMWhere) -> None:
        if where is VMWhere.ABSENT:
            self.hosts[host].pop(vm, None)
            self.slots.pop(f"{host}/{vm}", None)
        else:
            self.hosts[host][vm] = where.value
        self._check(vm)

    def prepare_incoming(self, host: str, vm: PlacedVM, order_id: str) -> str:
        self._enter(host, "prepare_incoming", vm.name, order_id)
        self.sizes.setdefault(vm.name, vm.needs.memory_mib)
        held = self.hosts[host].get(vm.name)
        if held in (VMWhere.RUNNING.value, VMWhere.PAUSED.value):
            raise HypervisorError(f"{vm.name} already runs on {host}", host=host, vm=vm.name)
        self._set(host, vm.name, VMWhere.INCOMING)  # a slot of an older order is replaced
        self.slots[f"{host}/{vm.name}"] = order_id
        return f"fake://{host}/{vm.name}/{order_id}"

    def migrate(self, host: str, vm: str, address: str, order_id: str) -> None:
        self._enter(host, "migrate", vm, order_id)
        key = f"{host}/{vm}"
        current = self.migrations.get(key)
        if current is not None and current["order"] == order_id:
            return  # already started (or finished) for this order
        if self.faults.hits(self.faults.refuse, host, vm):
            raise MigrationError(f"{host} refuses to migrate {vm}", host=host, vm=vm)
        if self.hosts[host].get(vm) != VMWhere.RUNNING.value:
            raise VMNotFound(f"{vm} does not run on {host}", host=host, vm=vm)
        if current is not None and current["status"] == MigrationPhase.ACTIVE.value:
            raise MigrationError(f"{vm} is already migrating for order {current['order']}", host=host, vm=vm)
        target, _, rest = address.removeprefix("fake://").partition("/")
        if self.slots.get(f"{target}/{vm}") != rest.partition("/")[2]:
            raise DestinationUnreachable(f"no incoming slot at {address}", host=host, vm=vm)
        self.migrations[key] = {"order": order_id, "target": target, "status": "active", "polls": 0}
        active = sum(k.startswith(f"{host}/") and m["status"] == "active" for k, m in self.migrations.items())
        self.peak_sending[host] = max(self.peak_sending.get(host, 0), active)

    def progress(self, host: str, vm: str, order_id: str) -> MigrationView:
        self._enter(host, "progress", vm, order_id)
        m = self.migrations.get(f"{host}/{vm}")
        if m is None or m["order"] != order_id:
            return MigrationView(MigrationPhase.NONE)
        total = self.sizes.get(vm, 0) * _MIB
        ends = (host, m["target"])
        if m["status"] == MigrationPhase.ACTIVE.value and not any(
            self.faults.hits(self.faults.stall, h, vm) for h in ends
        ):
            m["polls"] += 1
            fail_at = min(
                (self.faults.fail_after[(h, v)] for h in ends for v in (vm, "*") if (h, v) in self.faults.fail_after),
                default=None,
            )
            if fail_at is not None and m["polls"] >= fail_at:
                m["status"] = MigrationPhase.FAILED.value
                self._set(m["target"], vm, VMWhere.ABSENT)  # the destination process died
            elif m["polls"] >= self.polls.get(vm, self.polls_to_complete):
                m["status"] = MigrationPhase.COMPLETED.value
                self._set(host, vm, VMWhere.ABSENT)  # switch-over: the source stops first...
                if self.arriving.get(vm):
                    self._landing[f"{m['target']}/{vm}"] = self.arriving[vm]  # ...the target loads...
                else:
                    self._set(m["target"], vm, VMWhere.RUNNING)  # ...then the target runs
        need = self.polls.get(vm, self.polls_to_complete)
        done = total if m["status"] == "completed" else min(total, total * m["polls"] // max(need, 1))
        error = "the destination closed the connection" if m["status"] == "failed" else None
        return MigrationView(MigrationPhase(m["status"]), done, total - done, error)

    def cancel(self, host: str, vm: str, order_id: str) -> None:
        self._enter(host, "cancel", vm, order_id)
        m = self.migrations.get(f"{host}/{vm}")
        if m is not None and m["order"] == order_id and m["status"] == MigrationPhase.ACTIVE.value:
            m["status"] = MigrationPhase.CANCELLED.value

    def abort_incoming(self, host: str, vm: str, order_id: str) -> None:
        self._enter(host, "abort_incoming", vm, order_id)
        if self.hosts[host].get(vm) == VMWhere.INCOMING.value and self.slots.get(f"{host}/{vm}") == order_id:
            self._set(host, vm, VMWhere.ABSENT)
            for m in self.migrations.values():  # a migration into a dropped slot fails
                if m["order"] == order_id and m["target"] == host and m["status"] == "active":
                    m["status"] = MigrationPhase.FAILED.value

    def where(self, host: str, vm: str) -> VMWhere:
        self._enter(host, "where", vm)
        key = f"{host}/{vm}"
        if key in self._landing and self.hosts[host].get(vm) == VMWhere.INCOMING.value:
            self._landing[key] -= 1
            if self._landing[key] < 0:  # loaded: it runs from now on
                del self._landing[key]
                self._set(host, vm, VMWhere.RUNNING)
        return VMWhere(self.hosts[host].get(vm, VMWhere.ABSENT.value))

    def fence(self, host: str, vm: str) -> None:
        self._enter(host, "fence", vm)
        self._set(host, vm, VMWhere.ABSENT)
        m = self.migrations.get(f"{host}/{vm}")
        if m is not None and m["status"] == MigrationPhase.ACTIVE.value:
            m["status"] = MigrationPhase.FAILED.value

    def start_from_disk(self, host: str, vm: PlacedVM, order_id: str) -> None:
        self._enter(host, "start_from_disk", vm.name, order_id)
        if self.hosts[host].get(vm.name) == VMWhere.RUNNING.value:
            return  # idempotent
        self.sizes.setdefault(vm.name, vm.needs.memory_mib)
        self._set(host, vm.name, VMWhere.RUNNING)  # asserts if a copy runs elsewhere: one disk, one VM


class _FakeAgent:
    """One host's agent: :class:`~smig.rctcb.agents.AgentClient` over the shared model."""

    def __init__(self, region: FakeRegionAgents, host: str) -> None:
        self._r = region
        self.host = host

    async def prepare_incoming(self, vm: PlacedVM, order_id: str) -> str:
        return self._r.prepare_incoming(self.host, vm, order_id)

    async def migrate(self, vm: str, target_address: str, order_id: str) -> None:
        self._r.migrate(self.host, vm, target_address, order_id)

    async def progress(self, vm: str, order_id: str, wait_s: float = 0.0) -> MigrationView:
        # A fake migration moves on per poll, not with time: there is nothing to wait for.
        return self._r.progress(self.host, vm, order_id)

    async def cancel(self, vm: str, order_id: str) -> None:
        self._r.cancel(self.host, vm, order_id)

    async def abort_incoming(self, vm: str, order_id: str) -> None:
        self._r.abort_incoming(self.host, vm, order_id)

    async def where(self, vm: str) -> VMWhere:
        return self._r.where(self.host, vm)

    async def fence(self, vm: str) -> None:
        self._r.fence(self.host, vm)

    async def start_from_disk(self, vm: PlacedVM, order_id: str) -> None:
        self._r.start_from_disk(self.host, vm, order_id)

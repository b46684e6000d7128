"""What the orchestrator asks of the per-host agents: a small, async interface, one client per host.

The orchestrator never talks to a hypervisor itself; it gives orders to the agent of the host
concerned, following Nova's migration phases split by side:

======================  ===========  ====================================================
call                    runs on      notes
======================  ===========  ====================================================
``prepare_incoming``    target       returns the address the source sends to
``migrate``             source       starts the live migration, returns at once
``progress``            source       where that migration stands; may wait for it to end
``cancel``              source       the VM keeps running on the source
``abort_incoming``      target       rollback of ``prepare_incoming``; never stops a running VM
``where``               any          what this host holds of the VM: the ground truth after a crash
``fence``               source       stops the VM's processes out of band (BMC): works on an
                                     untrusted host whose hypervisor would not obey
``start_from_disk``     target       cold restart from the VM's disk, after fencing
======================  ===========  ====================================================

Every call that changes something takes an ``order_id`` and is **idempotent** per order id: the
orchestrator writes each step down before it takes it, and after a crash it re-issues the step it
had written, not knowing whether the agent already did it. ``progress`` of an order the source
already finished reports it finished (``completed``, ``failed``, ``cancelled``), never ``none``.

Errors: an agent that cannot be reached, or whose hypervisor fails, raises
:class:`~smig.errors.HypervisorError`; a migration the source will not run or that cannot reach
its target raises :class:`~smig.errors.MigrationError` (``DestinationUnreachable`` when the source
cannot reach the target); a VM the host does not hold raises :class:`~smig.errors.VMNotFound`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from smig.errors import HypervisorError
from smig.model import PlacedVM

__all__ = ["AgentClient", "AgentDirectory", "MigrationPhase", "MigrationView", "VMWhere"]


class MigrationPhase(StrEnum):
    """Where an outgoing migration stands, as its source reports it."""

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NONE = "none"  # the source knows no migration of that order


@dataclass(frozen=True)
class MigrationView:
    """One look at an outgoing migration."""

    status: MigrationPhase
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    error: str | None = None


class VMWhere(StrEnum):
    """What one host holds of one VM."""

    RUNNING = "running"
    INCOMING = "incoming"  # a prepared destination, waiting for (or receiving) the migration
    PAUSED = "paused"  # a process that could be resumed: not safe to restart the VM elsewhere
    ABSENT = "absent"  # no process of that VM on this host (never started, migrated away, fenced)


class AgentClient(Protocol):
    """The agent of one host, as the RC-TCB reaches it. Raises as the module docstring says."""

    async def prepare_incoming(self, vm: PlacedVM, order_id: str) -> str:
        """Get ready to receive ``vm``; the opaque address the source must send to."""
        ...

    async def migrate(self, vm: str, target_address: str, order_id: str) -> None:
        """Start sending ``vm`` to ``target_address``; returns once started."""
        ...

    async def progress(self, vm: str, order_id: str, wait_s: float = 0.0) -> MigrationView:
        """Where the outgoing migration of ``order_id`` stands. ``wait_s``: answer as soon as it is
        no longer active, but wait at most that long (a long poll: the end is seen when it comes,
        not at the caller's next poll)."""
        ...

    async def cancel(self, vm: str, order_id: str) -> None:
        """Cancel the outgoing migration of ``order_id``; the VM keeps running here."""
        ...

    async def abort_incoming(self, vm: str, order_id: str) -> None:
        """Drop the incoming slot of ``order_id``; a VM already running here is left alone."""
        ...

    async def where(self, vm: str) -> VMWhere:
        """What this host holds of ``vm`` now."""
        ...

    async def fence(self, vm: str) -> None:
        """Stop every process of ``vm`` on this host out of band; done when it returns."""
        ...

    async def start_from_disk(self, vm: PlacedVM, order_id: str) -> None:
        """Boot ``vm`` here from its disk (cold restart); returns once it runs."""
        ...


class AgentDirectory(Protocol):
    """How the orchestrator finds the agent of a host."""

    def agent(self, host: str) -> AgentClient:
        """The client of ``host``'s agent (no I/O: connecting happens on the first call)."""
        ...


class NoAgents:
    """The directory of a region whose hosts run no agent the RC-TCB can reach yet: every call
    fails, so the service plans and records evacuations but cannot carry them out."""

    def agent(self, host: str) -> AgentClient:
        raise HypervisorError(
            f"no agent is configured for host {host!r}: the RC-TCB can plan its evacuation but not carry it out",
            host=host,
        )

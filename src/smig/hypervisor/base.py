"""The hypervisor driver interface.

A driver runs VMs on one host. Live migration follows Nova's phases, each on a named side and
each with its own rollback, so that the two sides can live in different processes or hosts:

====================  ===========  ==========================================
phase                 runs on      rollback
====================  ===========  ==========================================
prepare_incoming      destination  abort_incoming
start_migration       source       cancel_migration (the VM keeps running)
migration_progress    source       -
finish_incoming       destination  abort_incoming + resume_source
finish_outgoing       source       -
====================  ===========  ==========================================

:func:`smig.hypervisor.migration.live_migrate` drives the phases for a pair of drivers.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

from smig.model import (
    IncomingVM,
    MigrationParams,
    MigrationProgress,
    MigrationStats,
    Transport,
    VMInfo,
    VMSpec,
    VMStatus,
)


class Capability(StrEnum):
    """What a backend can do; callers check before they ask."""

    LIVE_MIGRATION = "live-migration"
    TLS_MIGRATION = "tls-migration"
    TCP_TRANSPORT = "tcp-transport"
    UNIX_TRANSPORT = "unix-transport"
    BANDWIDTH_LIMIT = "bandwidth-limit"
    CANCEL_MIGRATION = "cancel-migration"
    AUTO_CONVERGE = "auto-converge"


class HypervisorDriver(Protocol):
    """Runs VMs on one host and moves them live to or from another."""

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    async def launch(self, spec: VMSpec) -> VMInfo:
        """Start a VM and wait until its guest is up.

        Raises: VMExists, LaunchError, ImageError."""
        ...

    async def stop(self, name: str) -> None:
        """Stop a VM and remove its runtime files. Raises: VMNotFound."""
        ...

    async def list(self) -> list[VMInfo]:
        """Every VM this host holds."""
        ...

    async def status(self, name: str) -> VMStatus:
        """A VM's state and its guest's last heartbeat. Raises: VMNotFound."""
        ...

    async def spec(self, name: str) -> VMSpec:
        """What the VM is, so a destination can prepare for it. Raises: VMNotFound."""
        ...

    # -- destination side ---------------------------------------------------------------

    async def prepare_incoming(self, spec: VMSpec, params: MigrationParams, *, port: int | None = None) -> IncomingVM:
        """Start a process that waits for ``spec``'s migration.

        Raises: PortInUse, TLSError, LaunchError."""
        ...

    async def finish_incoming(self, incoming: IncomingVM) -> VMInfo:
        """Confirm the migrated guest runs here and record it. Raises: MigrationError."""
        ...

    async def abort_incoming(self, incoming: IncomingVM) -> None:
        """Roll back :meth:`prepare_incoming`: stop the waiting process, remove its files."""
        ...

    async def incoming_alive(self, incoming: IncomingVM) -> bool:
        """Whether the slot still waits for, receives, or has received its VM; False once the
        receiving side gave up (the migration into it failed or was cancelled)."""
        ...

    # -- source side ---------------------------------------------------------------------

    async def start_migration(self, name: str, destination: IncomingVM, params: MigrationParams) -> None:
        """Begin sending VM ``name`` to a prepared destination.

        Raises: VMNotFound, VMStateError, TLSError, MigrationError."""
        ...

    async def migration_progress(self, name: str) -> MigrationProgress:
        """Where the outgoing migration of ``name`` stands."""
        ...

    async def cancel_migration(self, name: str) -> None:
        """Cancel the outgoing migration of ``name``; the VM keeps running here."""
        ...

    async def resume_source(self, name: str) -> None:
        """Make sure ``name`` runs here again after a migration that did not end well."""
        ...

    async def finish_outgoing(self, name: str, incoming: IncomingVM, params: MigrationParams) -> MigrationStats:
        """After a completed migration: read the final stats, stop the source process."""
        ...


def transports_of(caps: frozenset[Capability]) -> frozenset[Transport]:
    """The transports a driver with these capabilities supports."""
    out = set()
    if Capability.TCP_TRANSPORT in caps:
        out.add(Transport.TCP)
    if Capability.UNIX_TRANSPORT in caps:
        out.add(Transport.UNIX)
    return frozenset(out)

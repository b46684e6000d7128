"""Live migration of one VM between two drivers, phase by phase, each with its rollback.

Whatever happens (a refused connection, a TLS failure, a timeout, a cancellation, Ctrl-C), the
VM ends up running on exactly one side: the destination if the migration completed and the
guest runs there, the source otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from smig.errors import MigrationCancelled, MigrationCommitted, MigrationError, MigrationTimeout, SmigError
from smig.hypervisor.base import Capability, HypervisorDriver
from smig.hypervisor.migration_status import classify_failure
from smig.model import IncomingVM, MigrationParams, MigrationProgress, MigrationStats, MigrationStatus

log = logging.getLogger(__name__)

ProgressCallback = Callable[[MigrationProgress], None]


def check_capabilities(source: HypervisorDriver, target: HypervisorDriver, params: MigrationParams) -> None:
    """Refuse before starting if either side cannot do what ``params`` asks.

    Raises:
        MigrationError: a capability is missing.
    """
    need = {Capability.LIVE_MIGRATION}
    if params.tls:
        need.add(Capability.TLS_MIGRATION)
    if params.bandwidth_mibps is not None:
        need.add(Capability.BANDWIDTH_LIMIT)
    if params.auto_converge:
        need.add(Capability.AUTO_CONVERGE)
    need.add(Capability.TCP_TRANSPORT if params.transport.value == "tcp" else Capability.UNIX_TRANSPORT)
    for side, driver in (("source", source), ("destination", target)):
        missing = need - driver.capabilities
        if missing:
            raise MigrationError(f"the {side} driver cannot do {', '.join(sorted(m.value for m in missing))}")


async def live_migrate(
    source: HypervisorDriver,
    target: HypervisorDriver,
    name: str,
    params: MigrationParams,
    *,
    on_progress: ProgressCallback | None = None,
    port: int | None = None,
    cancel: asyncio.Event | None = None,
) -> MigrationStats:
    """Move VM ``name`` from ``source`` to ``target`` while it runs.

    Raises:
        VMNotFound, VMStateError: the VM cannot be migrated as it is.
        PortInUse, TLSError, DestinationUnreachable, MigrationError: the migration failed;
            the VM still runs on the source.
        MigrationTimeout: ``params.timeout_s`` passed; cancelled, the VM runs on the source.
        MigrationCancelled: ``cancel`` was set; the VM runs on the source.

    A cancel (or the time limit) that the source refuses as too late (MigrationCommitted: Xen's
    handover has begun) lets the migration run to its end instead.
    """
    check_capabilities(source, target, params)
    spec = await source.spec(name)
    incoming = await target.prepare_incoming(spec, params, port=port)
    loop = asyncio.get_running_loop()
    try:
        await source.start_migration(name, incoming, params)
        deadline = None if params.timeout_s is None else loop.time() + params.timeout_s
        committed = False  # a cancel came too late: from then on the migration runs to its end
        while True:
            progress = await source.migration_progress(name)
            if on_progress is not None:
                on_progress(progress)
            if progress.status is MigrationStatus.COMPLETED:
                break
            if progress.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
                raise classify_failure(progress.error or progress.status.value, vm=name)
            cancelled = cancel is not None and cancel.is_set()
            late = deadline is not None and loop.time() >= deadline
            if (cancelled or late) and not committed:
                try:
                    await source.cancel_migration(name)
                except MigrationCommitted as e:
                    # Cutting it now could leave the VM running nowhere: it runs to its end.
                    log.warning("%s; waiting for it", e)
                    committed = True
                    continue
                except SmigError as e:
                    log.warning("cancelling the migration of %s: %s (the roll-back tries again)", name, e)
            if cancelled and not committed:
                raise MigrationCancelled(f"migration of {name} cancelled on request", vm=name)
            if late and not committed:
                raise MigrationTimeout(
                    f"migration of {name} did not complete within {params.timeout_s:.0f}s "
                    f"({progress.transferred_bytes >> 20} MiB sent, {progress.remaining_bytes >> 20} MiB left); "
                    "raise --timeout or --bandwidth, or lower the guest's dirty rate",
                    vm=name,
                )
            await asyncio.sleep(params.poll_interval_s)
        await target.finish_incoming(incoming)
    except BaseException:
        # Shielded: a Ctrl-C or task cancellation must still leave the VM in one place.
        await asyncio.shield(_roll_back(source, target, name, incoming))
        raise
    return await source.finish_outgoing(name, incoming, params)


async def _roll_back(source: HypervisorDriver, target: HypervisorDriver, name: str, incoming: IncomingVM) -> None:
    try:
        progress = await source.migration_progress(name)
        if progress.status not in (
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.CANCELLED,
            MigrationStatus.NONE,
        ):
            await source.cancel_migration(name)
    except SmigError as e:
        log.warning("could not cancel the migration of %s: %s", name, e)
    await target.abort_incoming(incoming)
    await source.resume_source(name)
    log.info("migration of %s rolled back; it runs on its source", name)

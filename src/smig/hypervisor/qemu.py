"""The QEMU driver: real QEMU processes, driven over QMP, under KVM where it boots Linux, TCG
otherwise.

Where each VM's files live is :mod:`smig.hypervisor.qemu_files`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from smig.errors import (
    ConfigError,
    LaunchError,
    MigrationError,
    PortInUse,
    QMPError,
    TLSError,
    VMExists,
    VMNotFound,
    VMStateError,
)
from smig.guest.image import GuestImage, ImageBuilder
from smig.hypervisor import accel as accel_mod
from smig.hypervisor import heartbeat, process
from smig.hypervisor.base import Capability
from smig.hypervisor.migration_status import classify_failure, progress_from_query, stats_from_query
from smig.hypervisor.qemu_argv import InstancePaths, qemu_argv
from smig.hypervisor.qemu_files import VMFiles
from smig.hypervisor.qemu_migration import TLS_IN, TLS_OUT, free_port, set_migration_options
from smig.hypervisor.qmp import QMPCommandError, Session, connect, session
from smig.model import (
    Accel,
    Heartbeat,
    IncomingVM,
    MigrationParams,
    MigrationProgress,
    MigrationStats,
    TLSConfig,
    Transport,
    VMInfo,
    VMSpec,
    VMState,
    VMStatus,
)

log = logging.getLogger(__name__)
STATUS_HEARTBEAT_WAIT_S = 5.0

_RUNSTATES = {
    "running": VMState.RUNNING,
    "paused": VMState.PAUSED,
    "finish-migrate": VMState.PAUSED,
    "prelaunch": VMState.PAUSED,
    "suspended": VMState.PAUSED,
    "inmigrate": VMState.INCOMING,
    "postmigrate": VMState.MIGRATED,
}


@dataclass(frozen=True)
class QemuConfig:
    """How this host's QEMU driver runs."""

    home: Path
    cache: Path
    binary: str = "qemu-system-x86_64"
    accel: Accel | None = None  # None: decide from host facts and a boot probe
    listen_host: str = "127.0.0.1"
    tls: TLSConfig | None = None  # this host's migration credentials
    boot_timeout_s: float = 90.0
    probe_timeout_s: float = 30.0
    # Extra environment for QEMU processes; the lab's library-injection attack sets LD_PRELOAD here.
    environment: Mapping[str, str] = field(default_factory=dict)


class QemuDriver:
    """A :class:`~smig.hypervisor.base.HypervisorDriver` for QEMU."""

    capabilities = frozenset(
        {
            Capability.LIVE_MIGRATION,
            Capability.TLS_MIGRATION,
            Capability.TCP_TRANSPORT,
            Capability.UNIX_TRANSPORT,
            Capability.BANDWIDTH_LIMIT,
            Capability.CANCEL_MIGRATION,
            Capability.AUTO_CONVERGE,
        }
    )

    def __init__(self, config: QemuConfig) -> None:
        self.config = config
        self._files = VMFiles(config.home)
        self._accel: tuple[Accel, str] | None = None
        # Outgoing migrations this driver started: name -> (instance, pid) of the source.
        self._outgoing: dict[str, tuple[str, int]] = {}
        # One query session per outgoing migration, kept open while it is followed: QEMU
        # mishandles a monitor socket reconnected every few milliseconds.
        self._followers: dict[str, tuple[asyncio.AbstractEventLoop, Session]] = {}

    def _image(self) -> GuestImage:
        return ImageBuilder(self.config.cache).load()

    # -- accelerator ---------------------------------------------------------------------

    async def accelerator(self) -> tuple[Accel, str]:
        """The accelerator this host uses and why; runs the KVM boot probe once if needed."""
        if self._accel is not None:
            return self._accel
        facts = accel_mod.gather_facts()
        decision = accel_mod.decide(facts, override=self.config.accel)
        if decision.needs_probe:
            cache = accel_mod.ProbeCache(self.config.cache / "accel.json")
            binary = Path(shutil.which(self.config.binary) or self.config.binary)
            key = cache.key(binary, self._image().digest)
            booted = cache.get(key)
            if booted is None:
                log.info("probing whether a Linux guest boots under KVM (up to %.0fs)", self.config.probe_timeout_s)
                booted = await self.probe_boot(Accel.KVM, self.config.probe_timeout_s)
                cache.put(key, booted)
            decision = accel_mod.decide(facts, override=self.config.accel, probe_booted=booted)
        self._accel = (decision.accel, decision.reason)
        return self._accel

    async def probe_boot(self, accel: Accel, timeout_s: float) -> bool:
        """Boot a throwaway guest under ``accel``; True if it sends a heartbeat in time."""
        spec = VMSpec(name=f"probe-{accel.value}-{secrets.token_hex(2)}", memory_mib=128)
        paths = self._files.new_instance(spec.name)
        try:
            pid = await self._spawn(spec, accel, paths, incoming=False)
            try:
                return await heartbeat.wait_for(paths.heartbeat, timeout_s) is not None
            finally:
                await process.terminate(pid, str(paths.directory))
        except LaunchError:
            return False
        finally:
            shutil.rmtree(self._files.vm_dir(spec.name), ignore_errors=True)

    # -- processes -----------------------------------------------------------------------

    async def _spawn(self, spec: VMSpec, accel: Accel, paths: InstancePaths, *, incoming: bool) -> int:
        image = self._image()
        argv = qemu_argv(self.config.binary, spec, accel, image.kernel, image.initrd, paths, incoming=incoming)
        log.debug("starting %s", " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **self.config.environment} if self.config.environment else None,
            )
        except FileNotFoundError as e:
            raise LaunchError(f"{self.config.binary} is not installed (run `make setup`)", vm=spec.name) from e
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise LaunchError(f"QEMU did not start: {err.decode().strip()}", vm=spec.name)
        pid = process.read_pidfile(paths.pidfile)
        if pid is None:
            raise LaunchError(f"QEMU started but wrote no pidfile at {paths.pidfile}", vm=spec.name)
        return pid

    async def _kill_instance(self, name: str, instance: str, pid: int | None = None) -> None:
        paths = self._files.paths(name, instance)
        pid = pid or process.read_pidfile(paths.pidfile)
        if pid is None or not process.is_ours(pid, str(paths.directory)):
            # It exited on its own (a failed incoming migration, a guest that panicked): its logs
            # say why, so they outlive its directory.
            kept = self._files.keep_logs(name, instance)
            if kept is not None:
                log.warning("%s: QEMU instance %s had exited; its logs are in %s", name, instance, kept)
        else:
            with suppress(QMPError):  # a QEMU that will not answer is signalled below
                async with session(paths.qmp, vm=name, timeout_s=2.0) as qmp:
                    await qmp.quit()
            if not await process.wait_gone(pid, 3.0):
                await process.terminate(pid, str(paths.directory))
        shutil.rmtree(paths.directory, ignore_errors=True)

    # -- life cycle ----------------------------------------------------------------------

    async def launch(self, spec: VMSpec) -> VMInfo:
        if spec.memory_mib < 64:
            raise ConfigError(f"{spec.memory_mib} MiB is too little memory for the guest (64 at least)")
        if spec.working_set_mib >= spec.memory_mib - 32:
            raise ConfigError(
                f"dirty working set {spec.working_set_mib} MiB does not fit a {spec.memory_mib} MiB guest"
            )
        async with self._files.locked(spec.name):
            try:
                current = self._files.record(spec.name)
            except VMNotFound:
                current = None
            if current is not None:
                if process.is_ours(
                    int(current["pid"]), str(self._files.paths(spec.name, current["instance"]).directory)
                ):
                    raise VMExists(f"VM {spec.name!r} already runs (pid {current['pid']})", vm=spec.name)
                self._files.forget(spec.name)
            accel, _ = await self.accelerator()
            image = self._image()
            paths = self._files.new_instance(spec.name)
            try:
                pid = await self._spawn(spec, accel, paths, incoming=False)
                hb = await self._await_boot(spec.name, pid, paths)
                log.info("%s booted under %s: boot id %s", spec.name, accel.value, hb)
            except BaseException:
                await self._kill_instance(spec.name, paths.directory.name)
                raise
            self._files.write_record(spec, paths.directory.name, pid, accel, image.digest)
            return VMInfo(spec=spec, pid=pid, accel=accel, state=VMState.RUNNING, instance=paths.directory.name)

    async def _await_boot(self, name: str, pid: int, paths: InstancePaths) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout_s
        while loop.time() < deadline:
            hb = heartbeat.read_last(paths.heartbeat)
            if hb is not None:
                return hb.boot_id
            if not process.alive(pid):
                raise LaunchError(f"QEMU exited while the guest booted; see {paths.console}", vm=name)
            await asyncio.sleep(0.1)
        raise LaunchError(
            f"guest sent no heartbeat within {self.config.boot_timeout_s:.0f}s; see {paths.console}", vm=name
        )

    async def stop(self, name: str) -> None:
        record = self._files.record(name)
        async with self._files.locked(name):
            vm_dir = self._files.vm_dir(name)
            for child in list(vm_dir.iterdir()):
                if child.is_dir():
                    pid = int(record["pid"]) if child.name == record["instance"] else None
                    await self._kill_instance(name, child.name, pid)
            (vm_dir / "vm.json").unlink(missing_ok=True)
            await self._drop_follower(name)
            self._outgoing.pop(name, None)
        shutil.rmtree(vm_dir, ignore_errors=True)

    async def list(self) -> list[VMInfo]:
        if not self._files.vms.exists():
            return []
        out = []
        for vm_dir in sorted(self._files.vms.iterdir()):
            if (vm_dir / "vm.json").exists():
                try:
                    out.append(await self._info(vm_dir.name))
                except VMNotFound:
                    continue
        return out

    async def stop_stray_incoming(self, keep: frozenset[tuple[str, str]] = frozenset()) -> tuple[tuple[str, str], ...]:
        """Stop every QEMU of this home that waits for an incoming migration (``inmigrate``) and is
        neither a VM's current instance nor in ``keep`` (``(vm, instance)`` pairs still wanted).

        What an agent killed between starting a destination and recording it leaves behind: a
        process no order knows. Returns the ``(vm, instance)`` pairs stopped."""
        stopped: set[tuple[str, str]] = set()
        if not self._files.vms.exists():
            return ()
        for vm_dir in sorted(self._files.vms.iterdir()):
            try:
                current = self._files.record(vm_dir.name).get("instance")
            except (VMNotFound, ConfigError):
                current = None
            for inst in sorted(p for p in vm_dir.iterdir() if p.is_dir()):
                if inst.name == current or (vm_dir.name, inst.name) in keep:
                    continue
                paths = self._files.paths(vm_dir.name, inst.name)
                pid = process.read_pidfile(paths.pidfile)
                if pid is None or not process.is_ours(pid, str(paths.directory)):
                    continue
                try:
                    async with session(paths.qmp_aux, vm=vm_dir.name, timeout_s=2.0) as qmp:
                        status = str((await qmp.execute("query-status")).get("status"))
                except QMPError:
                    continue
                if status == "inmigrate":
                    log.warning("%s: stopping a stray incoming QEMU (instance %s, pid %d)", vm_dir.name, inst.name, pid)
                    await self._kill_instance(vm_dir.name, inst.name, pid)
                    stopped.add((vm_dir.name, inst.name))
        return tuple(sorted(stopped))

    async def spec(self, name: str) -> VMSpec:
        return VMSpec(**self._files.record(name)["spec"])

    async def _info(self, name: str) -> VMInfo:
        record = self._files.record(name)
        spec = VMSpec(**record["spec"])
        paths = self._files.paths(name, record["instance"])
        pid = int(record["pid"])
        state = VMState.STOPPED
        if process.is_ours(pid, str(paths.directory)):
            try:
                async with session(paths.qmp_aux, vm=name, timeout_s=5.0) as qmp:
                    reply = await qmp.execute("query-status")
                state = _RUNSTATES.get(str(reply.get("status")), VMState.UNKNOWN)
            except QMPError:
                state = VMState.UNKNOWN
        return VMInfo(spec=spec, pid=pid, accel=Accel(record["accel"]), state=state, instance=record["instance"])

    async def status(self, name: str) -> VMStatus:
        info = await self._info(name)
        path = self._files.paths(name, info.instance).heartbeat
        hb = heartbeat.read_last(path)
        if hb is None and info.state is VMState.RUNNING:
            # Just migrated in or just booted: the guest's next line is a period away, but a TCG
            # guest's first timer tick after a migration has been seen to take over a second here.
            hb = await heartbeat.wait_for(path, max(STATUS_HEARTBEAT_WAIT_S, 2 * info.spec.heartbeat_ms / 1000 + 1.0))
        return VMStatus(info=info, heartbeat=hb)

    async def wait_heartbeat(self, name: str, timeout_s: float, *, after: int = -1) -> Heartbeat | None:
        """Wait for the guest's next heartbeat with a counter above ``after``; None on timeout.

        Follows the VM across a migration: the record is re-read each time.
        """
        return await heartbeat.wait_for(
            lambda: self._files.paths(name, self._files.record(name)["instance"]).heartbeat, timeout_s, after=after
        )

    # -- migration: destination side -----------------------------------------------------

    async def prepare_incoming(self, spec: VMSpec, params: MigrationParams, *, port: int | None = None) -> IncomingVM:
        tls = self._tls(params, spec.name)
        accel, _ = await self.accelerator()
        tries = 1 if port is not None or params.transport is Transport.UNIX else 3
        for attempt in range(tries):
            paths = self._files.new_instance(spec.name)
            if params.transport is Transport.UNIX:
                uri = f"unix:{paths.migrate_socket}"
            else:
                uri = f"tcp:{self.config.listen_host}:{port or free_port(self.config.listen_host)}"
            try:
                pid = await self._spawn(spec, accel, paths, incoming=True)
                async with session(paths.qmp, vm=spec.name) as qmp:
                    await set_migration_options(qmp, params, tls, tls_id=TLS_IN, endpoint="server", accel=accel)
                    try:
                        await qmp.execute("migrate-incoming", uri=uri)
                    except QMPCommandError as e:
                        if "in use" in e.desc:
                            raise PortInUse(
                                f"cannot listen for the migration on {uri}: address already in use", vm=spec.name
                            ) from e
                        raise MigrationError(f"destination cannot listen on {uri}: {e.desc}", vm=spec.name) from e
            except PortInUse:
                await self._kill_instance(spec.name, paths.directory.name)
                if attempt + 1 == tries:
                    raise
                continue
            except BaseException:
                await self._kill_instance(spec.name, paths.directory.name)
                raise
            return IncomingVM(
                spec=spec,
                uri=uri,
                pid=pid,
                instance=paths.directory.name,
                accel=accel,
                tls_hostname=tls.hostname if tls else None,
            )
        raise AssertionError("unreachable")

    async def finish_incoming(self, incoming: IncomingVM) -> VMInfo:
        name = incoming.spec.name
        paths = self._files.paths(name, incoming.instance)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        state = "unknown"
        qmp: Session | None = None
        try:
            # One session for the whole wait: QEMU resets connections that arrive while it is
            # still tearing down the previous one, so a reconnect per poll fails now and then.
            while loop.time() < deadline:
                if not process.is_ours(incoming.pid, str(paths.directory)):
                    raise MigrationError(f"the destination QEMU of {name} exited after the migration", vm=name)
                try:
                    if qmp is None or not qmp.connected:
                        qmp = await connect(paths.qmp_aux, vm=name)
                    state = str((await qmp.execute("query-status")).get("status"))
                except QMPError as e:
                    log.debug("destination monitor of %s: %s; retrying", name, e)
                    if qmp is not None:
                        await qmp.close()
                    qmp = None
                    await asyncio.sleep(0.1)
                    continue
                if state == "running":
                    break
                await asyncio.sleep(0.02)
            else:
                raise MigrationError(f"{name} did not start running on the destination (state {state})", vm=name)
        finally:
            if qmp is not None:
                await qmp.close()
        async with self._files.locked(name):
            self._files.write_record(
                incoming.spec, incoming.instance, incoming.pid, incoming.accel, self._image().digest
            )
        return VMInfo(
            spec=incoming.spec,
            pid=incoming.pid,
            accel=incoming.accel,
            state=VMState.RUNNING,
            instance=incoming.instance,
        )

    async def incoming_alive(self, incoming: IncomingVM) -> bool:
        # The destination QEMU is the slot: it waits, receives, then runs the guest.
        return process.is_ours(incoming.pid, f"/{incoming.instance}/")

    async def abort_incoming(self, incoming: IncomingVM) -> None:
        await self._kill_instance(incoming.spec.name, incoming.instance, incoming.pid)
        vm_dir = self._files.vm_dir(incoming.spec.name)
        if not (vm_dir / "vm.json").exists() and not any(p.is_dir() for p in vm_dir.iterdir()):
            shutil.rmtree(vm_dir, ignore_errors=True)

    # -- migration: source side ----------------------------------------------------------

    def _source(self, name: str) -> tuple[InstancePaths, int]:
        if name in self._outgoing:
            instance, pid = self._outgoing[name]
        else:
            record = self._files.record(name)
            instance, pid = record["instance"], int(record["pid"])
        return self._files.paths(name, instance), pid

    def _tls(self, params: MigrationParams, name: str) -> TLSConfig | None:
        if not params.tls:
            return None
        if self.config.tls is None:
            raise TLSError("TLS migration asked for, but this host has no TLS credentials configured", vm=name)
        return self.config.tls

    async def start_migration(self, name: str, destination: IncomingVM, params: MigrationParams) -> None:
        tls = self._tls(params, name)
        if tls is not None:
            if not destination.tls_hostname:
                raise TLSError(f"the destination of {name} announced no TLS identity; it must listen with TLS", vm=name)
            # Verify the destination by the name it announced, with this host's own credentials.
            tls = replace(tls, hostname=destination.tls_hostname)
        paths, pid = self._source(name)
        if not process.is_ours(pid, str(paths.directory)):
            raise VMStateError(f"VM {name!r} is not running (its QEMU process {pid} is gone)", vm=name)
        async with session(paths.qmp, vm=name) as qmp:
            status = str((await qmp.execute("query-status")).get("status"))
            if status != "running":
                raise VMStateError(f"VM {name!r} is {status}, not running: it cannot be migrated", vm=name)
            current = await qmp.execute("query-migrate")
            if current.get("status") in ("setup", "active", "cancelling", "pre-switchover", "device"):
                raise VMStateError(f"VM {name!r} is already migrating", vm=name)
            accel = Accel(self._files.record(name)["accel"])
            await set_migration_options(qmp, params, tls, tls_id=TLS_OUT, endpoint="client", accel=accel)
            try:
                await qmp.execute("migrate", uri=destination.uri)
            except QMPCommandError as e:
                raise classify_failure(e.desc, vm=name) from e
        self._outgoing[name] = (paths.directory.name, pid)

    async def _follower(self, name: str) -> Session:
        loop = asyncio.get_running_loop()
        held = self._followers.get(name)
        if held is not None and held[0] is loop and held[1].connected:
            return held[1]
        paths, _ = self._source(name)
        qmp = await connect(paths.qmp_aux, vm=name)
        self._followers[name] = (loop, qmp)
        return qmp

    async def _drop_follower(self, name: str) -> None:
        held = self._followers.pop(name, None)
        if held is not None and held[0] is asyncio.get_running_loop():
            await held[1].close()

    async def migration_progress(self, name: str) -> MigrationProgress:
        try:
            reply = await (await self._follower(name)).execute("query-migrate")
        except QMPError:
            await self._drop_follower(name)  # one retry over a fresh connection
            reply = await (await self._follower(name)).execute("query-migrate")
        return progress_from_query(reply)

    async def cancel_migration(self, name: str) -> None:
        qmp = await self._follower(name)
        await qmp.execute("migrate_cancel")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:
            status = (await qmp.execute("query-migrate")).get("status")
            if status in ("cancelled", "failed", "completed", "none"):
                break
            await asyncio.sleep(0.02)

    async def resume_source(self, name: str) -> None:
        paths, pid = self._source(name)
        await self._drop_follower(name)
        self._outgoing.pop(name, None)
        if not process.is_ours(pid, str(paths.directory)):
            raise VMStateError(f"the source QEMU of {name!r} is gone; the VM must be restarted", vm=name)
        async with session(paths.qmp, vm=name) as qmp:
            status = str((await qmp.execute("query-status")).get("status"))
            if status in ("paused", "postmigrate", "finish-migrate"):
                log.warning("%s was left %s on its source; resuming it", name, status)
                await qmp.execute("cont")

    async def finish_outgoing(self, name: str, incoming: IncomingVM, params: MigrationParams) -> MigrationStats:
        paths, pid = self._source(name)
        final = await (await self._follower(name)).execute("query-migrate")
        await self._drop_follower(name)
        if final.get("status") != "completed":
            raise VMStateError(f"the migration of {name!r} has not completed", vm=name)
        stats = stats_from_query(final, name, pid, incoming, params)
        self._outgoing.pop(name, None)
        await self._kill_instance(name, paths.directory.name, pid)
        async with self._files.locked(name):
            record_path = self._files.vm_dir(name) / "vm.json"
            try:
                points_here = self._files.record(name)["instance"] == paths.directory.name
            except VMNotFound:
                points_here = False
            if points_here:  # the guest now lives on another host: forget it here
                record_path.unlink(missing_ok=True)
        return stats

"""The Xen driver: PV guests through ``xl``, on the same interface as the QEMU driver.

Why ``xl`` and not libvirt's libxl driver: ``xl`` is what every Xen host has (it ships with the
Xen tools); libvirt would add a daemon to dom0 — more code to trust and to measure — and its
libxl migration speaks its own protocol between two libvirtds, which the lab would have to run
as well. ``xl`` keeps the driver a thin layer over the tools Xen's own documentation uses.

All commands go through a :class:`CommandRunner`: the agent in dom0 runs them locally; the lab
can drive a nested host from outside through its exec channel. The driver keeps its own records
in dom0 (``state_dir``): which domains it owns (name and domain id), their specs, and the
migrations under way. A domain is this driver's only if both name and domain id match its record,
so two drivers on one host (a migration within one host) never claim each other's domain.

Live migration: ``xl migrate -s "" NAME "socat - TCP:ADDR:PORT"`` runs the quoted command as its
transport (an empty ``-s`` makes xl run the "host" argument itself), and the destination's
``socat TCP-LISTEN`` hands the connection to ``xl migrate-receive``. So the driver, not ssh,
owns the transport. xl reports no byte counts or downtime: progress is a state (active, then
completed or failed), and the stats carry the total time only (downtime -1: unknown).
Cancelling kills the source's transport, with xl stopped meanwhile: xl then takes its own
failure path and resumes the domain at its end. From xl's commit point on (the target holds the
whole guest and is about to be told to start it) a cancel is refused, since a cut there could
leave the guest running on neither side. TLS: socat's OPENSSL addresses with the migration credentials
(verify both ways, the receiver's name checked), declared only when credentials are configured.

What xl says and takes is read and written by :mod:`smig.hypervisor.xl` (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from smig.errors import (
    ConfigError,
    LaunchError,
    MigrationCommitted,
    MigrationError,
    PortInUse,
    TLSError,
    VMExists,
    VMNotFound,
    VMStateError,
)
from smig.hypervisor.base import Capability
from smig.hypervisor.commands import CommandResult, CommandRunner
from smig.hypervisor.heartbeat import parse_last
from smig.hypervisor.xl import (
    AWAY_SUFFIX,
    COMMIT_POINT,
    CONSOLE_LOG_DIR,
    INCOMING_SUFFIX,
    NO_RETURN,
    TARGET_STARTING,
    Domain,
    check_spec,
    console_log,
    domain_config,
    parse_xl_list,
)
from smig.model import (
    Accel,
    Heartbeat,
    IncomingVM,
    MigrationParams,
    MigrationProgress,
    MigrationStats,
    MigrationStatus,
    TLSConfig,
    VMInfo,
    VMSpec,
    VMState,
    VMStatus,
    valid_vm_name,
)

_PORTS = (49152, 60999)


@dataclass(frozen=True)
class XenConfig:
    """Where the driver keeps its records in dom0, what guests boot, and how migrations connect."""

    kernel: str  # the guest kernel, a path in dom0
    initrd: str
    state_dir: str = "/var/lib/smig/xen"
    migration_address: str = "127.0.0.1"  # dom0's address a destination listens on
    tls: TLSConfig | None = None  # credentials in QEMU's layout, at a path in dom0; None: no TLS
    boot_timeout_s: float = 120.0
    command_timeout_s: float = 120.0
    poll_s: float = 0.5


class XenDriver:
    """Runs Xen PV guests on one host through ``xl``; see the module docstring."""

    def __init__(self, runner: CommandRunner, config: XenConfig) -> None:
        self._run_cmd = runner
        self.config = config
        self._dir = PurePosixPath(config.state_dir)

    @property
    def capabilities(self) -> frozenset[Capability]:
        # Cancel is refused from xl's commit point on (see cancel_migration), so it never leaves
        # the guest owned by neither side.
        caps = {Capability.LIVE_MIGRATION, Capability.TCP_TRANSPORT, Capability.CANCEL_MIGRATION}
        if self.config.tls is not None:
            caps.add(Capability.TLS_MIGRATION)
        return frozenset(caps)

    def _tls(self, name: str) -> TLSConfig:
        if self.config.tls is None:
            raise TLSError(f"TLS asked for {name}'s migration, but this Xen driver has no credentials", vm=name)
        return self.config.tls

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, *argv: str, input: str | None = None, timeout_s: float | None = None) -> CommandResult:
        return await self._run_cmd.run(argv, input=input, timeout_s=timeout_s or self.config.command_timeout_s)

    async def _sh(self, script: str, *args: str, input: str | None = None) -> CommandResult:
        return await self._run("sh", "-c", script, "sh", *args, input=input)

    def _file(self, name: str, kind: str) -> str:
        return str(self._dir / f"{name}.{kind}")

    async def _write(self, path: str, text: str) -> None:
        done = await self._sh('mkdir -p "$(dirname "$1")" && cat > "$1.new" && mv "$1.new" "$1"', path, input=text)
        if not done.ok:
            raise LaunchError(f"cannot write {path} in dom0: {done.why()}")

    async def _read_json(self, path: str) -> dict[str, object] | None:
        done = await self._run("cat", path)
        if not done.ok:
            return None
        try:
            data = json.loads(done.stdout)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def _domains(self) -> dict[str, Domain]:
        done = await self._run("xl", "list")
        if not done.ok:
            raise LaunchError(f"xl list failed: {done.why()}")
        return parse_xl_list(done.stdout)

    async def _record(self, name: str) -> dict[str, object]:
        if not valid_vm_name(name):
            raise ConfigError(f"bad VM name {name!r}: use lower-case letters, digits, '.', '_' or '-'", vm=name)
        record = await self._read_json(self._file(name, "json"))
        if record is None:
            raise VMNotFound(f"no VM named {name!r} on this Xen host", vm=name)
        return record

    async def _owned(self, name: str) -> tuple[VMSpec, Domain]:
        record = await self._record(name)
        domain = (await self._domains()).get(name)
        if domain is None or domain.domid != record.get("domid"):
            raise VMNotFound(f"no VM named {name!r} on this Xen host (its domain is gone)", vm=name)
        return _spec(record), domain

    async def _heartbeat(self, name: str, console: str | None = None) -> Heartbeat | None:
        if console is None:
            record = await self._read_json(self._file(name, "json")) or {}
            console = str(record.get("console") or console_log(name))
        done = await self._run("tail", "-c", "4096", console)
        return parse_last(done.stdout) if done.ok else None

    async def _wait_heartbeat(self, name: str, console: str) -> Heartbeat | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout_s
        while loop.time() < deadline:
            hb = await self._heartbeat(name, console)
            if hb is not None:
                return hb
            await asyncio.sleep(self.config.poll_s)
        return None

    def _info(self, spec: VMSpec, domain: Domain) -> VMInfo:
        return VMInfo(spec=spec, pid=domain.domid, accel=Accel.XEN_PV, state=domain.state, instance=domain.name)

    # -- VMs ------------------------------------------------------------------------------

    async def launch(self, spec: VMSpec) -> VMInfo:
        check_spec(spec)
        if spec.name in await self._domains():
            raise VMExists(f"a Xen domain named {spec.name!r} already runs on this host", vm=spec.name)
        cfg = self._file(spec.name, "cfg")
        await self._write(cfg, domain_config(spec, self.config.kernel, self.config.initrd))
        console = console_log(spec.name)
        await self._empty(console)
        created = await self._run("xl", "create", cfg)
        if not created.ok:
            await self._sh('rm -f "$1"', cfg)
            # xl says little on its own stderr; libxl's log of the domain says why.
            detail = await self._run("tail", "-n", "3", f"/var/log/xen/xl-{spec.name}.log")
            raise LaunchError(
                f"xl create {spec.name} failed (exit {created.rc}): {created.why()}"
                + (f"; libxl: {detail.why()}" if detail.ok and detail.stdout.strip() else ""),
                vm=spec.name,
            )
        domain = (await self._domains()).get(spec.name)
        if domain is None:
            raise LaunchError(f"xl created {spec.name}, and then it was gone", vm=spec.name)
        record = {"spec": asdict(spec), "domid": domain.domid, "console": console}
        await self._write(self._file(spec.name, "json"), json.dumps(record))
        if await self._wait_heartbeat(spec.name, console) is None:
            await self._run("xl", "destroy", spec.name)
            await self._forget(spec.name)
            raise LaunchError(
                f"guest {spec.name} gave no heartbeat within {self.config.boot_timeout_s:g} s "
                f"(its console: {CONSOLE_LOG_DIR}/guest-{spec.name}.log in dom0)",
                vm=spec.name,
            )
        return self._info(spec, (await self._domains()).get(spec.name, domain))

    async def _empty(self, console: str) -> None:
        # xenconsoled appends to a log across the lives of the domains of that name.
        await self._sh(f'mkdir -p {CONSOLE_LOG_DIR} && : > "$1"', console)

    async def _forget(self, name: str) -> None:
        await self._sh('rm -f "$1".json "$1".cfg "$1".out "$1".in', str(self._dir / name))

    async def stop(self, name: str) -> None:
        _, domain = await self._owned(name)
        done = await self._run("xl", "destroy", str(domain.domid))
        if not done.ok and name in await self._domains():
            raise VMStateError(f"xl destroy {name} failed: {done.why()}", vm=name)
        await self._forget(name)

    async def list(self) -> list[VMInfo]:
        records = 'cd "$1" 2>/dev/null || exit 0; cat -- *.json 2>/dev/null | tr "\\n" " "'
        listing = await self._sh(records, str(self._dir))
        if not listing.ok:
            # An empty answer here would tell the RC-TCB every guest is gone.
            raise LaunchError(f"cannot read the driver's records in dom0: {listing.why()}")
        domains = await self._domains()
        out = []
        for line in listing.stdout.replace("}{", "}\n{").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            spec = _spec(record)
            domain = domains.get(spec.name)
            if domain is not None and domain.domid == record.get("domid"):
                out.append(self._info(spec, domain))
        return sorted(out, key=lambda i: i.name)

    async def status(self, name: str) -> VMStatus:
        spec, domain = await self._owned(name)
        return VMStatus(info=self._info(spec, domain), heartbeat=await self._heartbeat(name))

    async def spec(self, name: str) -> VMSpec:
        return _spec(await self._record(name))

    # -- destination side -----------------------------------------------------------------

    async def prepare_incoming(self, spec: VMSpec, params: MigrationParams, *, port: int | None = None) -> IncomingVM:
        check_spec(spec)
        # The VM's own domain may hold its name here (a migration within one host): xl renames
        # the source's away before the received one takes the name. Only a second receive clashes.
        if f"{spec.name}{INCOMING_SUFFIX}" in await self._domains():
            raise VMExists(f"{spec.name!r} is already being received on this Xen host", vm=spec.name)
        port = port or random.randint(*_PORTS)
        address = self.config.migration_address
        await self._empty(console_log(f"{spec.name}{INCOMING_SUFFIX}"))
        log = self._file(spec.name, "in.log")
        listen = f"TCP-LISTEN:{port},bind={address},reuseaddr"
        if params.tls:
            d = self._tls(spec.name).directory
            # The sender must present a certificate of the same CA (verify=1): no one else can
            # push a domain into this host.
            listen = (
                f"OPENSSL-LISTEN:{port},bind={address},reuseaddr,cert={d}/server-cert.pem,"
                f"key={d}/server-key.pem,cafile={d}/ca-cert.pem,verify=1"
            )
        # One connection, handed to xl migrate-receive; -d -d makes socat say when it listens.
        started = await self._sh(
            'mkdir -p "$(dirname "$2")"; setsid socat -d -d "$1" "EXEC:xl migrate-receive" > "$2" 2>&1 < /dev/null '
            "& echo $!",
            listen,
            log,
        )
        if not started.ok or not started.stdout.strip().isdigit():
            raise MigrationError(f"cannot start the migration listener: {started.why()}", vm=spec.name)
        pid = int(started.stdout.strip())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            text = (await self._run("cat", log)).stdout
            if "listening on" in text:
                break
            if "Address already in use" in text:
                raise PortInUse(f"port {port} on {address} is in use on this Xen host", vm=spec.name)
            if not (await self._run("kill", "-0", str(pid))).ok or loop.time() > deadline:
                await self._run("kill", str(pid))
                raise MigrationError(f"the migration listener did not start: {text.strip()[-300:]}", vm=spec.name)
            await asyncio.sleep(0.1)
        await self._write(self._file(spec.name, "in"), json.dumps({"spec": asdict(spec), "pid": pid, "port": port}))
        hostname = self.config.tls.hostname if params.tls and self.config.tls else None
        uri = f"tcp:{address}:{port}"
        return IncomingVM(spec=spec, uri=uri, pid=pid, instance=spec.name, accel=Accel.XEN_PV, tls_hostname=hostname)

    async def finish_incoming(self, incoming: IncomingVM) -> VMInfo:
        name = incoming.spec.name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout_s
        while True:
            domain = (await self._domains()).get(name)
            receiving = (await self._run("kill", "-0", str(incoming.pid))).ok
            if domain is not None and not receiving:
                break
            if loop.time() > deadline:
                raise MigrationError(f"{name} did not start on this Xen host after its migration", vm=name)
            await asyncio.sleep(self.config.poll_s)
        console = await self._adopt(incoming, domain)
        if await self._wait_heartbeat(name, console) is None:
            raise MigrationError(f"{name} arrived but its guest gives no heartbeat here", vm=name)
        return self._info(incoming.spec, domain)

    async def _adopt(self, incoming: IncomingVM, domain: Domain) -> str:
        """Record the received domain as this driver's; returns its console log."""
        name = incoming.spec.name
        # xenconsoled named the log when it attached, while xl still called the domain NAME--incoming.
        console = console_log(f"{name}{INCOMING_SUFFIX}")
        record = {"spec": asdict(incoming.spec), "domid": domain.domid, "console": console, "received_by": incoming.pid}
        await self._write(self._file(name, "json"), json.dumps(record))
        await self._sh('rm -f "$1" "$1.log"', self._file(name, "in"))
        return console

    async def incoming_alive(self, incoming: IncomingVM) -> bool:
        # The listener exits once xl migrate-receive is done: then the slot lives on as the
        # received domain, which holds the VM's name and is not this driver's own source.
        if (await self._run("kill", "-0", str(incoming.pid))).ok:
            return True
        name = incoming.spec.name
        domain = (await self._domains()).get(name)
        if domain is None:
            return False
        record = await self._read_json(self._file(name, "json"))
        if record is None or record.get("received_by") == incoming.pid:
            return True
        return record.get("domid") != domain.domid  # else it is the source, still here (one host)

    async def abort_incoming(self, incoming: IncomingVM) -> None:
        name = incoming.spec.name
        if TARGET_STARTING in (await self._run("cat", self._file(name, "in.log"))).stdout:
            # The sender has handed the guest over and will not resume it: cutting the receiver
            # now could leave it running nowhere. It is let finish, and the guest kept here.
            for _ in range(int(self.config.boot_timeout_s / self.config.poll_s)):
                if not (await self._run("kill", "-0", str(incoming.pid))).ok:
                    break
                await asyncio.sleep(self.config.poll_s)
            domain = (await self._domains()).get(name)
            if domain is not None:
                await self._adopt(incoming, domain)
                return
        # The listener and the xl migrate-receive it started; then a half-received domain.
        await self._sh('pkill -P "$1"; kill "$1"', str(incoming.pid))
        if f"{name}{INCOMING_SUFFIX}" in await self._domains():
            await self._run("xl", "destroy", f"{name}{INCOMING_SUFFIX}")
        await self._sh('rm -f "$1" "$1.log"', self._file(name, "in"))

    # -- source side ----------------------------------------------------------------------

    async def start_migration(self, name: str, destination: IncomingVM, params: MigrationParams) -> None:
        _, domain = await self._owned(name)
        if domain.state is not VMState.RUNNING:
            raise VMStateError(f"{name} is {domain.state.value}, not running: it cannot be migrated", vm=name)
        with contextlib.suppress(VMStateError):
            if (await self._outgoing(name))[1] is None:
                raise MigrationError(f"{name} is already being migrated", vm=name)
        scheme, _, where = destination.uri.partition(":")
        host, _, port = where.rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit():
            raise MigrationError(f"the Xen driver migrates over tcp only, not to {destination.uri!r}", vm=name)
        transport = f"socat - TCP:{host}:{port}"
        if params.tls:
            d = self._tls(name).directory
            if not destination.tls_hostname:
                raise TLSError(f"the destination of {name} was not prepared for TLS", vm=name)
            # The receiver's certificate must be of the same CA and name the expected host.
            transport = (
                f"socat - OPENSSL:{host}:{port},cert={d}/client-cert.pem,key={d}/client-key.pem,"
                f"cafile={d}/ca-cert.pem,verify=1,commonname={destination.tls_hostname}"
            )
        started = await self._sh(
            '(xl -v migrate -s "" "$1" "$2"; echo $? > "$3") > "$4" 2>&1 < /dev/null & echo $!',
            name,
            transport,
            self._file(name, "out.rc"),
            self._file(name, "out.log"),
        )
        if not started.ok:
            raise MigrationError(f"cannot start xl migrate: {started.why()}", vm=name)
        record = {
            "pid": int(started.stdout.strip()),
            "transport": transport,
            "started_at": time.time(),
            "domid": domain.domid,
        }
        await self._sh('rm -f "$1"', self._file(name, "out.rc"))  # written only once xl has exited
        await self._write(self._file(name, "out"), json.dumps(record))

    async def _outgoing(self, name: str, *, wait_s: float = 0.0) -> tuple[dict[str, object], int | None, str]:
        """The record of ``name``'s outgoing migration, xl's exit status once it has one, and the
        tail of its log. With ``wait_s``, waits that long in dom0 for xl to exit: one command
        per poll, not a stream of them, so polling does not load a slow dom0."""
        script = (
            'i=0; while [ ! -s "$2" ] && [ "$i" -lt "$4" ]; do sleep 0.1; i=$((i+1)); done; '
            'cat "$1"; echo; echo "%"; cat "$2" 2>/dev/null; echo "%"; tail -c 2000 "$3" 2>/dev/null'
        )
        base = str(self._dir / name)
        done = await self._sh(script, f"{base}.out", f"{base}.out.rc", f"{base}.out.log", str(int(wait_s * 10)))
        record_text, _, rest = done.stdout.partition("\n%\n")
        rc_text, _, log = rest.partition("%\n")
        try:
            record = json.loads(record_text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise VMStateError(f"no migration of {name} was started here", vm=name)
        rc_text = rc_text.strip()
        return record, int(rc_text) if rc_text.lstrip("-").isdigit() else None, log

    async def migration_progress(self, name: str) -> MigrationProgress:
        try:
            record, rc, log = await self._outgoing(name, wait_s=self.config.poll_s)
        except VMStateError:
            return _progress(MigrationStatus.NONE, 0)
        elapsed = int((time.time() - float(str(record["started_at"]))) * 1000)
        if rc is None:
            return _progress(MigrationStatus.ACTIVE, elapsed)
        if rc == 0 and "Migration successful" in log:
            return _progress(MigrationStatus.COMPLETED, elapsed)
        lines = [line for line in log.splitlines() if line.strip()]
        return _progress(MigrationStatus.FAILED, elapsed, " / ".join(lines[-3:]) or f"xl migrate exited {rc}")

    async def cancel_migration(self, name: str) -> None:
        """Cut the migration's transport, unless xl has reached its commit point.

        xl hands the guest over in a handshake after the last page: once the target has
        acknowledged the transfer, the sender renames its domain away and gives the target
        permission to start. A transport cut from there on can leave the guest running on
        neither side. So xl is stopped (SIGSTOP) while its log is read: before the commit point
        the transport is cut and xl, continued, fails its save and resumes the guest here; from
        it on, xl is continued untouched and the cancel is refused.

        Raises MigrationCommitted: too late to cancel (the migration runs to its end).
        MigrationError: xl did not stop after its transport was cut.
        """
        record, rc, _ = await self._outgoing(name)
        if rc is not None:
            return
        script = (
            'x=$(pgrep -x -P "$1" xl) || exit 3; kill -STOP "$x"; '
            'if grep -q -e "$3" "$2"; then kill -CONT "$x"; exit 4; fi; '
            'if ! pgrep -f -x "$4" >/dev/null; then kill -CONT "$x"; exit 5; fi; '
            'pkill -f -x "$4"; kill -CONT "$x"'
        )
        args = (str(record["pid"]), self._file(name, "out.log"), COMMIT_POINT, str(record["transport"]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.boot_timeout_s
        done = await self._sh(script, *args)
        while done.rc == 5 and loop.time() < deadline:  # xl has not started its transport yet
            await asyncio.sleep(self.config.poll_s)
            done = await self._sh(script, *args)
        if done.rc == 4:
            raise MigrationCommitted(
                f"too late to cancel the migration of {name}: the target has acknowledged the transfer "
                "and xl is handing the guest over; it runs to its end",
                vm=name,
            )
        if done.rc not in (0, 3):  # 3: xl has just exited on its own
            raise MigrationError(f"cannot cancel the migration of {name}: {done.why() or done.rc}", vm=name)
        while (await self._outgoing(name, wait_s=self.config.poll_s))[1] is None:
            if loop.time() > deadline:
                raise MigrationError(f"xl migrate of {name} did not stop after its transport was cut", vm=name)
            await asyncio.sleep(self.config.poll_s)

    async def resume_source(self, name: str) -> None:
        """Resume the guest here after a failed or cancelled migration.

        Raises VMStateError: xl had given the target permission to start it before the handshake
        broke, so it may run there: resuming it here too could run it twice. It is left suspended
        under its away name, for whoever confirms where it runs."""
        record = await self._record(name)
        try:
            log = (await self._outgoing(name))[2]
        except VMStateError:
            log = ""  # no migration record: nothing was handed over
        if NO_RETURN in log:
            raise VMStateError(
                f"{name} was handed to the target (xl gave it permission to start) before the migration "
                "broke: it may run there, so it is not resumed here",
                vm=name,
            )
        domains = await self._domains()
        away = domains.get(f"{name}{AWAY_SUFFIX}")
        if away is not None and away.domid == record.get("domid"):
            await self._run("xl", "rename", away.name, name)
        domain = (await self._domains()).get(name)
        if domain is None or domain.domid != record.get("domid"):
            raise VMNotFound(f"{name} no longer runs on this Xen host", vm=name)
        if domain.state is VMState.PAUSED:
            done = await self._run("xl", "unpause", name)
            if not done.ok:
                raise VMStateError(f"xl unpause {name} failed: {done.why()}", vm=name)
        await self._sh('rm -f "$1" "$1".rc "$1".log', self._file(name, "out"))

    async def finish_outgoing(self, name: str, incoming: IncomingVM, params: MigrationParams) -> MigrationStats:
        record, rc, log = await self._outgoing(name)
        if rc != 0:
            raise MigrationError(f"xl migrate of {name} has not completed: {log.strip()[-300:]}", vm=name)
        total_ms = int((time.time() - float(str(record["started_at"]))) * 1000)
        current = await self._read_json(self._file(name, "json")) or {}
        if current.get("domid") == record["domid"]:  # not already the received VM's (one host, one driver)
            await self._forget(name)
        await self._sh('rm -f "$1".out "$1".out.rc "$1".out.log', str(self._dir / name))
        return MigrationStats(
            vm=name,
            total_ms=total_ms,
            downtime_ms=-1,  # xl does not report it
            setup_ms=0,
            transferred_bytes=0,
            iterations=0,
            throughput_mbps=0.0,
            source_pid=int(str(record["domid"])),
            target_pid=incoming.pid,
            transport=params.transport,
            tls=params.tls,
            uri=incoming.uri,
        )


def _spec(record: dict[str, object]) -> VMSpec:
    spec = record.get("spec")
    if not isinstance(spec, dict):
        raise VMNotFound("a record of this Xen driver has no spec")
    return VMSpec(**spec)


def _progress(status: MigrationStatus, elapsed_ms: int, error: str | None = None) -> MigrationProgress:
    return MigrationProgress(
        status=status,
        elapsed_ms=elapsed_ms,
        transferred_bytes=0,
        remaining_bytes=0,
        total_bytes=0,
        dirty_pages_rate=0,
        page_size=4096,
        expected_downtime_ms=None,
        iterations=0,
        throughput_mbps=0.0,
        error=error,
    )

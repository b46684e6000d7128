"""The QEMU driver's files on one host.

Layout under the driver's home (``$SMIG_HOME``)::

    vms/NAME/vm.json        the VM's spec and its current instance (pid, accelerator)
    vms/NAME/ID/            one QEMU process's files: qmp.sock, qmp-aux.sock, heartbeat.log,
                            console.log, qemu.pid, qemu.log (and migrate.sock when receiving)
    exited/NAME-ID/         the logs of a QEMU that exited on its own, kept when its files go
                            (the newest KEEP_EXITED of them), for whoever asks why

A migration on one machine has two instances of the same VM side by side; ``vm.json`` names
the one that runs the guest.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smig.errors import ConfigError, VMNotFound
from smig.hypervisor.qemu_argv import InstancePaths
from smig.model import Accel, VMSpec, valid_vm_name

_SUN_PATH_MAX = 107
KEEP_EXITED = 20


class VMFiles:
    """The VM records and instance directories under one home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.vms = home / "vms"

    def vm_dir(self, name: str) -> Path:
        if not valid_vm_name(name):
            raise ConfigError(
                f"bad VM name {name!r}: use lower-case letters, digits, '.', '_' or '-' (max 63)", vm=name
            )
        return self.vms / name

    def keep_logs(self, name: str, instance: str) -> Path | None:
        """Copy the logs of instance ``instance`` of ``name`` (a QEMU that exited on its own) to
        ``exited/``, dropping the oldest beyond :data:`KEEP_EXITED`; where they went, or None."""
        paths = self.paths(name, instance)
        logs = [f for f in (paths.console, paths.log, paths.heartbeat) if f.exists()]
        if not logs:
            return None
        kept = self.home / "exited" / f"{name}-{instance}"
        try:
            kept.mkdir(parents=True, exist_ok=True)
            for f in logs:
                shutil.copy2(f, kept / f.name)
            old = sorted(kept.parent.iterdir(), key=lambda d: d.stat().st_mtime)
            for stale in old[: max(0, len(old) - KEEP_EXITED)]:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            return None  # the logs are a courtesy: a full disk must not stop the cleanup
        return kept

    def paths(self, name: str, instance: str) -> InstancePaths:
        return InstancePaths(self.vm_dir(name) / instance)

    def record(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.vm_dir(name) / "vm.json").read_text())
        except FileNotFoundError:
            raise VMNotFound(f"no VM named {name!r} on this host (see `smig vm list`)", vm=name) from None
        if not isinstance(data, dict):
            raise VMNotFound(f"the record of VM {name!r} is unreadable", vm=name)
        return data

    def write_record(self, spec: VMSpec, instance: str, pid: int, accel: Accel, image: str) -> None:
        path = self.vm_dir(spec.name) / "vm.json"
        tmp = path.with_suffix(".tmp")
        record = {"spec": asdict(spec), "instance": instance, "pid": pid, "accel": accel.value, "image": image}
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)

    @asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[None]:
        """Serialise changes to one VM across processes (two CLIs, an agent)."""
        vm_dir = self.vm_dir(name)
        vm_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(vm_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def new_instance(self, name: str) -> InstancePaths:
        paths = self.paths(name, secrets.token_hex(3))
        if len(str(paths.qmp_aux)) > _SUN_PATH_MAX:
            raise ConfigError(
                f"SMIG_HOME {self.home} is too long for QEMU's sockets "
                f"({len(str(paths.qmp_aux))} > {_SUN_PATH_MAX} characters): choose a shorter one"
            )
        paths.directory.mkdir(parents=True)
        return paths

    def forget(self, name: str) -> None:
        vm_dir = self.vm_dir(name)
        (vm_dir / "vm.json").unlink(missing_ok=True)
        for child in vm_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)

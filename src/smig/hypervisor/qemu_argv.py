"""The QEMU command line for a SMIG VM: a pure function of the spec and where files go.

Source and destination of a migration must describe the same machine, so both are built here
from the same :class:`~smig.model.VMSpec`; only ``incoming`` differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smig.model import Accel, VMSpec

#: The machine type both ends of a migration use. Pinned to a versioned type so that two
#: different QEMU builds on two hosts still agree on the guest's hardware.
MACHINE = "pc-i440fx-7.2"


@dataclass(frozen=True)
class InstancePaths:
    """The runtime files of one QEMU process of a VM."""

    directory: Path

    @property
    def qmp(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def qmp_aux(self) -> Path:
        return self.directory / "qmp-aux.sock"

    @property
    def heartbeat(self) -> Path:
        return self.directory / "heartbeat.log"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.directory / "qemu.log"

    @property
    def migrate_socket(self) -> Path:
        return self.directory / "migrate.sock"


def kernel_cmdline(spec: VMSpec) -> str:
    """The guest kernel's command line; ``smig_*`` words reach /init as variables."""
    return (
        "console=ttyS0 quiet panic=-1 "
        f"smig_dirty={spec.dirty_mbps} smig_ws={spec.working_set_mib} smig_hb_ms={spec.heartbeat_ms}"
    )


def qemu_argv(
    binary: str,
    spec: VMSpec,
    accel: Accel,
    kernel: Path,
    initrd: Path,
    paths: InstancePaths,
    *,
    incoming: bool = False,
) -> list[str]:
    """The argv that starts ``spec`` as a daemonized QEMU with two QMP monitors."""
    argv = [
        binary,
        "-name",
        f"guest={spec.name},debug-threads=on",
        "-machine",
        f"{MACHINE},accel={accel.value}",
        "-cpu",
        spec.cpu_model,
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        kernel_cmdline(spec),
        "-chardev",
        f"file,id=console,path={paths.console}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"file,id=heartbeat,path={paths.heartbeat}",
        "-serial",
        "chardev:heartbeat",
        "-chardev",
        f"socket,id=qmp,path={paths.qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=qmp-aux,path={paths.qmp_aux},server=on,wait=off",
        "-mon",
        "chardev=qmp-aux,mode=control",
        "-pidfile",
        str(paths.pidfile),
        "-D",
        str(paths.log),
        "-daemonize",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv

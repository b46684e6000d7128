"""What ``xl`` says and takes, as plain data (pure): its domain list, a guest's configuration, the
specs a Xen PV guest can run, and the lines of ``xl migrate``'s handover the driver acts on.

Xen's PV domain builder loads the guest kernel and initrd into the domain's initial memory:
the Debian cloud kernel needs at least 96 MiB (64 fails with "segment module0 too large").
"""

from __future__ import annotations

from dataclasses import dataclass

from smig.errors import ConfigError
from smig.model import VMSpec, VMState, valid_vm_name

MIN_MEMORY_MIB = 96
CONSOLE_LOG_DIR = "/var/log/xen/console"
INCOMING_SUFFIX = "--incoming"  # what xl names a domain while it is received
# What xl migrate's sender logs once the target holds the whole guest: from here it hands over.
COMMIT_POINT = "migration sender: Target has acknowledged transfer"
NO_RETURN = "migration sender: Giving target permission to start"  # xl's own "point of no return"
TARGET_STARTING = "migration target: Got permission, starting domain"
AWAY_SUFFIX = "--migratedaway"  # what xl names the source's domain once the target has it


@dataclass(frozen=True)
class Domain:
    name: str
    domid: int
    memory_mib: int
    state: VMState


def parse_xl_list(text: str) -> dict[str, Domain]:
    """``xl list``'s table, by domain name (dom0 left out)."""
    out: dict[str, Domain] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 6 or not parts[1].isdigit() or parts[1] == "0":
            continue
        flags = parts[4]
        if parts[0].endswith(INCOMING_SUFFIX):
            state = VMState.INCOMING  # being received: not yet a guest, whatever its flags
        elif "p" in flags:
            state = VMState.PAUSED
        elif any(f in flags for f in "scd"):
            state = VMState.UNKNOWN  # shut down, crashed or dying
        else:
            # Running, blocked, or runnable and waiting for a CPU: the "------" a busy guest shows
            # whenever dom0 has the only CPU, as it does while it runs this very `xl list`.
            state = VMState.RUNNING
        out[parts[0]] = Domain(parts[0], int(parts[1]), int(parts[2]), state)
    return out


def domain_config(spec: VMSpec, kernel: str, initrd: str) -> str:
    """The ``xl`` configuration of a guest (pure)."""
    extra = (
        f"console=hvc0 quiet smig_hb_dev=hvc0 smig_hb_ms={spec.heartbeat_ms} "
        f"smig_dirty={spec.dirty_mbps} smig_ws={spec.working_set_mib}"
    )
    return "\n".join(
        [
            f'name = "{spec.name}"',
            'type = "pv"',
            f'kernel = "{kernel}"',
            f'ramdisk = "{initrd}"',
            f'extra = "{extra}"',
            f"memory = {spec.memory_mib}",
            f"vcpus = {spec.vcpus}",
            'on_crash = "preserve"',  # a crashed guest stays for a post-mortem, and is never restarted twice
            "",
        ]
    )


def check_spec(spec: VMSpec) -> None:
    """Raises ConfigError: a spec this driver cannot run, before anything starts."""
    if not valid_vm_name(spec.name) or len(spec.name) > 48:
        raise ConfigError(f"bad VM name {spec.name!r}: use lower-case letters, digits, '.', '_' or '-'", vm=spec.name)
    if spec.memory_mib < MIN_MEMORY_MIB:
        raise ConfigError(
            f"{spec.memory_mib} MiB is too little memory for a Xen PV guest ({MIN_MEMORY_MIB} at least)", vm=spec.name
        )
    if spec.dirty_mbps and spec.working_set_mib >= spec.memory_mib - 48:
        raise ConfigError(
            f"dirty working set {spec.working_set_mib} MiB does not fit a {spec.memory_mib} MiB guest", vm=spec.name
        )


def console_log(domain_name: str) -> str:
    return f"{CONSOLE_LOG_DIR}/guest-{domain_name}.log"

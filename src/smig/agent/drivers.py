"""The hypervisor driver an agent drives, as its configuration names it (``[agent] hypervisor``).

QEMU: the agent runs on the host and the driver starts QEMU processes in the agent's home. Xen:
the agent runs in dom0 and the driver runs ``xl`` there, locally, over socat's TLS with the
agent's migration credentials when ``[migration] tls`` is on.
"""

from __future__ import annotations

from smig.agent.config import AgentConfig
from smig.agent.executor import ExecutorWaits
from smig.hypervisor.base import HypervisorDriver
from smig.hypervisor.commands import LocalRunner
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.hypervisor.xen import XenConfig, XenDriver
from smig.model import TLSConfig

__all__ = ["executor_waits", "make_driver"]


def make_driver(config: AgentConfig, tls: TLSConfig | None) -> HypervisorDriver:
    """Raises ConfigError: a combination this agent cannot run."""
    if config.hypervisor == "xen":
        return XenDriver(
            LocalRunner(),
            XenConfig(
                kernel=config.xen_kernel,
                initrd=config.xen_initrd,
                state_dir=config.xen_state_dir or str(config.home / "xen"),
                migration_address=config.listen_host,
                tls=tls,
            ),
        )
    return QemuDriver(QemuConfig(home=config.home, cache=config.cache, listen_host=config.listen_host, tls=tls))


def executor_waits(config: AgentConfig) -> ExecutorWaits:
    """Xen's driver asks ``xl`` and the shell several times per answer: a fraction of a second on
    a real dom0, seconds in a nested one under TCG."""
    if config.hypervisor == "xen":
        return ExecutorWaits(settle_wait_s=15.0, abort_grace_s=15.0, slot_glance_s=10.0, poll_interval_s=1.0)
    return ExecutorWaits()

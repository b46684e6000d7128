"""The agent's configuration file: who the host is, where the RC-TCB is, what the agent may listen on.

``smig agent run --config FILE`` reads it; ``smig agent config`` prints the example below. Every
path is explicit, and the agent listens on exactly ``[agent] listen`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smig.aim import procfs
from smig.errors import ConfigError
from smig.tomlconfig import listen_address, load_sections, number

EXAMPLE = """\
# smig agent run --config THIS_FILE
[agent]
host = "h1"                            # this host's id: the CN of its agent certificate
region = "lab"
rctcb = "https://10.77.0.1:8443"       # the RC-TCB's API
listen = "10.77.0.2:7443"              # the one address the agent listens on (the RC-TCB's orders)
home = "/var/lib/smig/h1"              # the QEMU driver's home: VM records, sockets, journals
cache = "/var/cache/smig"              # the guest image and the accelerator verdict
ca = "/etc/smig/ca.pem"                # the region CA
cert = "/etc/smig/h1/cert.pem"         # this agent's certificate (role agent, CN = host, SAN = its address)
key = "/etc/smig/h1/key.pem"
signing_key = "/etc/smig/h1/agent-key.pem"   # Ed25519: signs this host's reports on its subjects
capacity_vcpus = 8
capacity_memory_mib = 16384
hypervisor = "qemu"                    # or "xen": PV guests through xl, this agent running in dom0
role = "host"                          # or "monitor": only measure this host's subjects (see below)

[monitor]
reference = "/etc/smig/reference/manifest.json"  # the approved reference manifest (signed)
reference_key = "/etc/smig/reference/key.pub"     # who must have signed it
mean_interval_s = 1.0
jitter = 0.5
max_cpu_share = 0.25
# How this monitor reaches a subject's hypervisor processes. On one machine (the lab) a host is a
# network namespace and its processes are those in it; this stands for a real neighbour's
# out-of-band access (BMC, DMA, a TPM-anchored measurement agent).
subject_netns = "/run/netns/smig-lab-{host}"
# subject_home = "/var/lib/smig/lab/hosts/{host}"   # instead, where hosts share one network
# subjects = "xen": each subject is a Xen host whose hypervisor is read from outside it (in the
# lab, from its outer QEMU) and judged against xen_syms, a file the approved manifest names. Such
# a monitor runs beside the host, not in its dom0: set role = "monitor" there, and
# [monitor] enabled = false for the agent in dom0.
# subjects = "xen"
# xen_syms = "/etc/smig/reference/xen-syms"
# dom0's toolstack is measured too when dom0's kernel (its package's vmlinuz: where the task list
# is, and the layout of a task) and the tools' package files are named, each by its path in dom0:
# dom0_kernel = "/etc/smig/reference/dom0/vmlinuz"
# dom0_tools = { "/usr/lib/xen-4.17/bin/xenstored" = "/etc/smig/reference/dom0/xenstored" }

# [xen]                                # hypervisor = "xen": what the guests boot, paths in dom0
# kernel = "/var/lib/smig/guest/vmlinuz"
# initrd = "/var/lib/smig/guest/initrd.img"

[migration]
tls = true                             # migrate over mutual TLS with this agent's certificate
bandwidth_mibps = 0                    # 0: the driver's default for the accelerator
downtime_ms = 300
"""

_SECTIONS: dict[str, frozenset[str]] = {
    "agent": frozenset(
        {
            "host",
            "region",
            "rctcb",
            "listen",
            "home",
            "cache",
            "ca",
            "cert",
            "key",
            "signing_key",
            "capacity_vcpus",
            "capacity_memory_mib",
            "address",
            "inventory_interval_s",
            "hypervisor",
            "role",
        }
    ),
    "monitor": frozenset(
        {
            "reference",
            "reference_key",
            "mean_interval_s",
            "jitter",
            "max_cpu_share",
            "subject_netns",
            "subject_home",
            "enabled",
            "subjects",
            "xen_syms",
            "dom0_kernel",
            "dom0_tools",
        }
    ),
    "migration": frozenset({"tls", "bandwidth_mibps", "downtime_ms"}),
    "lab": frozenset({"lie_about", "ignore_orders"}),
    "xen": frozenset({"kernel", "initrd", "state_dir"}),
}


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``smig agent run`` needs."""

    host: str
    region: str
    rctcb: str
    listen_host: str
    listen_port: int
    home: Path
    cache: Path
    ca: Path
    cert: Path
    key: Path
    signing_key: Path
    capacity_vcpus: int
    capacity_memory_mib: int
    reference: Path
    reference_key: Path
    address: str = ""  # the orders API's base URL as the RC-TCB reaches it (default: from listen)
    inventory_interval_s: float = 2.0
    monitoring: bool = True
    mean_interval_s: float = 1.0
    jitter: float = 0.5
    max_cpu_share: float = 0.25
    subject_netns: str = "/run/netns/{host}"
    subject_home: str = ""  # hosts sharing one network (the loopback lab): a subject's driver home
    migration_tls: bool = True
    bandwidth_mibps: float = 0.0
    downtime_ms: int = 300
    # The lab's compromised agents (never set on a real host): a monitor that reports false
    # mismatches about these subjects, and an agent that ignores the RC-TCB's orders.
    lie_about: tuple[str, ...] = ()
    ignore_orders: bool = False
    hypervisor: str = "qemu"  # or "xen"
    role: str = "host"  # or "monitor": measure the assigned subjects, nothing else
    subjects: str = "processes"  # or "xen": nested Xen hosts, measured from outside
    xen_syms: Path | None = None
    dom0_kernel: Path | None = None
    dom0_tools: tuple[tuple[str, Path], ...] = ()  # (path in dom0, the package's file here)
    xen_kernel: str = ""
    xen_initrd: str = ""
    xen_state_dir: str = ""  # default: HOME/xen

    @property
    def orders_url(self) -> str:
        return self.address or f"https://{self.listen_host}:{self.listen_port}"

    def netns_of(self, host: str) -> str:
        return self.subject_netns.format(host=host)

    def hypervisors_of(self, host: str) -> list[int]:
        """The subject's hypervisor processes, as this monitor finds them itself: those in its
        network namespace, or (``subject_home``) those run from its directory."""
        if self.subject_home:
            return procfs.hypervisor_pids(cmdline_contains=self.subject_home.format(host=host).rstrip("/") + "/")
        return procfs.hypervisor_pids(self.netns_of(host))


def _dom0(monitor: Mapping[str, Any], subjects: str) -> tuple[Path | None, tuple[tuple[str, Path], ...]]:
    kernel, tools = monitor.get("dom0_kernel"), monitor.get("dom0_tools")
    if kernel is None and tools is None:
        return None, ()
    if subjects != "xen":
        raise ConfigError('monitor.dom0_kernel and dom0_tools apply to subjects = "xen" only')
    if not kernel or not isinstance(tools, dict) or not tools:
        raise ConfigError(
            "monitor.dom0_kernel and monitor.dom0_tools go together: the kernel's file, and a table of "
            '"path in dom0" = "the package\'s file here"'
        )
    bad = [k for k, v in tools.items() if not k.startswith("/") or not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(
            f"monitor.dom0_tools: {', '.join(bad)}: each key is an absolute path in dom0, each value a file"
        )
    return Path(str(kernel)), tuple((k, Path(v)) for k, v in sorted(tools.items()))


def _required(section: Mapping[str, Any], key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"[{where}] {key} is required (see `smig agent config` for an example)")
    return value


def parse_config(text: str, *, source: str = "the configuration") -> AgentConfig:
    """Raises ConfigError naming the key that is wrong, missing or unknown."""
    data = load_sections(text, _SECTIONS, source)
    agent: dict[str, Any] = data.get("agent", {})
    monitor: dict[str, Any] = data.get("monitor", {})
    migration: dict[str, Any] = data.get("migration", {})
    lab: dict[str, Any] = data.get("lab", {})
    lies = lab.get("lie_about", [])
    if not isinstance(lies, list) or not all(isinstance(h, str) for h in lies):
        raise ConfigError("lab.lie_about must be a list of host ids")
    rctcb = _required(agent, "rctcb", "agent")
    if not rctcb.startswith("https://"):
        raise ConfigError(f"agent.rctcb must be an https:// URL (the RC-TCB speaks only mutual TLS), not {rctcb!r}")
    listen_host, listen_port = listen_address(_required(agent, "listen", "agent"), "agent.listen")
    subject_netns = str(monitor.get("subject_netns", "/run/netns/{host}"))
    if "{host}" not in subject_netns:
        raise ConfigError(f"monitor.subject_netns must contain {{host}}, not {subject_netns!r}")
    xen: dict[str, Any] = data.get("xen", {})
    hypervisor = str(agent.get("hypervisor", "qemu"))
    if hypervisor not in ("qemu", "xen"):
        raise ConfigError(f"agent.hypervisor must be qemu or xen, not {hypervisor!r}")
    if hypervisor == "xen":
        _required(xen, "kernel", "xen")
        _required(xen, "initrd", "xen")
    role = str(agent.get("role", "host"))
    if role not in ("host", "monitor"):
        raise ConfigError(f"agent.role must be host or monitor, not {role!r}")
    subjects = str(monitor.get("subjects", "processes"))
    if subjects not in ("processes", "xen"):
        raise ConfigError(f"monitor.subjects must be processes or xen, not {subjects!r}")
    if subjects == "xen":
        _required(monitor, "xen_syms", "monitor")
    dom0_kernel, dom0_tools = _dom0(monitor, subjects)
    subject_home = str(monitor.get("subject_home", ""))
    if subject_home and "{host}" not in subject_home:
        raise ConfigError(f"monitor.subject_home must contain {{host}}, not {subject_home!r}")
    return AgentConfig(
        host=_required(agent, "host", "agent"),
        region=str(agent.get("region", "")),
        rctcb=rctcb.rstrip("/"),
        listen_host=listen_host,
        listen_port=listen_port,
        home=Path(_required(agent, "home", "agent")),
        cache=Path(_required(agent, "cache", "agent")),
        ca=Path(_required(agent, "ca", "agent")),
        cert=Path(_required(agent, "cert", "agent")),
        key=Path(_required(agent, "key", "agent")),
        signing_key=Path(_required(agent, "signing_key", "agent")),
        capacity_vcpus=int(number(agent, "capacity_vcpus", 2, positive=True)),
        capacity_memory_mib=int(number(agent, "capacity_memory_mib", 4096, positive=True)),
        address=str(agent.get("address", "")),
        inventory_interval_s=number(agent, "inventory_interval_s", 2.0, positive=True),
        reference=Path(_required(monitor, "reference", "monitor")),
        reference_key=Path(_required(monitor, "reference_key", "monitor")),
        monitoring=bool(monitor.get("enabled", True)),
        mean_interval_s=number(monitor, "mean_interval_s", 1.0, positive=True),
        jitter=number(monitor, "jitter", 0.5),
        max_cpu_share=number(monitor, "max_cpu_share", 0.25, positive=True),
        subject_netns=subject_netns,
        subject_home=subject_home,
        migration_tls=bool(migration.get("tls", True)),
        bandwidth_mibps=number(migration, "bandwidth_mibps", 0.0),
        downtime_ms=int(number(migration, "downtime_ms", 300, positive=True)),
        lie_about=tuple(lies),
        ignore_orders=bool(lab.get("ignore_orders", False)),
        hypervisor=hypervisor,
        role=role,
        subjects=subjects,
        xen_syms=Path(monitor["xen_syms"]) if subjects == "xen" else None,
        dom0_kernel=dom0_kernel,
        dom0_tools=dom0_tools,
        xen_kernel=str(xen.get("kernel", "")),
        xen_initrd=str(xen.get("initrd", "")),
        xen_state_dir=str(xen.get("state_dir", "")),
    )


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the agent configuration {path}: {e.strerror or e}") from e
    return parse_config(text, source=str(path))

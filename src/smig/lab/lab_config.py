"""What a lab is made of on disk: its region's credentials and the RC-TCB's and the agents'
configuration files, written the way an operator would for real hosts (see the README)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from smig.aim import reference
from smig.aim.keys import generate_key, public_key_pem, save_private_key
from smig.lab import net
from smig.paths import smig_cache
from smig.rctcb.ca import Role, init_ca, issue_identity

if TYPE_CHECKING:
    from smig.lab.region import LabState

__all__ = ["AGENT_PORT", "RCTCB_PORT", "agent_config", "agent_head", "make_credentials", "rctcb_config"]

RCTCB_PORT = 8443
AGENT_PORT = 7443


def make_credentials(state: LabState) -> None:
    network = state.network
    ca_dir = state.path / "ca"
    init_ca(ca_dir, f"lab-{state.lab}")
    issue_identity(ca_dir, "rctcb", Role.RCTCB, ips=[network.rctcb.address])
    issue_identity(ca_dir, "operator", Role.OPERATOR)
    for host, node in network.hosts.items():
        issue_identity(ca_dir, host, Role.AGENT, ips=[node.address])
        home = state.host_home(host)
        home.mkdir(parents=True, exist_ok=True)
        save_private_key(generate_key(), home / "agent-key.pem")
    ref = state.path / "reference"
    key = generate_key()
    if state.hypervisor == "xen":
        from smig.lab import xen_region

        files = xen_region.reference_files()
    else:
        files = [*reference.installed_qemu_files(), *reference.agent_files()]
    manifest = reference.build(files)
    reference.save(reference.sign(manifest, key), ref / "manifest.json")
    (ref / "key.pub").write_bytes(public_key_pem(key))
    state.manifest = reference.manifest_digest(manifest)


def rctcb_config(state: LabState) -> str:
    ca = state.path / "ca"
    node = state.network.rctcb
    return f"""[rctcb]
listen = "{node.address}:{RCTCB_PORT}"
store = "sqlite:///{state.path / "rctcb" / "ivt.sqlite"}"
ca = "{ca / "ca.pem"}"
cert = "{ca / "issued" / "rctcb" / "cert.pem"}"
key = "{ca / "issued" / "rctcb" / "key.pem"}"
manifest = "{state.manifest}"

[policy]
kind = "{state.policy}"
freshness_s = {max(20.0 if state.hypervisor == "xen" else 10.0, 6 * state.interval_s)}

[agents]
{_fencing(state)}
{_timeouts(state)}
"""


def _timeouts(state: LabState) -> str:
    if state.hypervisor == "xen":
        # An agent in a nested dom0 answers slowly (TCG), and xl moves a guest between two
        # nested hosts in a minute or more.
        return "call_timeout_s = 90.0\ncompletion_timeout_floor_s = 600.0"
    return "call_timeout_s = 30.0\ncompletion_timeout_floor_s = 60.0"


def _fencing(state: LabState) -> str:
    if state.loopback:
        return f'fencing = "home"\nfence_home = "{state.path}/hosts/{{host}}"'
    return f'fencing = "netns"\nfence_netns = "/run/netns/{net.PREFIX}{state.lab}-{{host}}"'


def _subjects(state: LabState) -> str:
    if state.loopback:
        return f'subject_home = "{state.path}/hosts/{{host}}"'
    return f'subject_netns = "/run/netns/{net.PREFIX}{state.lab}-{{host}}"'


def agent_head(state: LabState, host: str, listen: str) -> str:
    """The ``[agent]`` lines every part acting for ``host`` on the lab machine shares: who it is,
    where the RC-TCB is, its credentials."""
    ca = state.path / "ca"
    home = state.host_home(host)
    return f"""[agent]
host = "{host}"
region = "lab-{state.lab}"
rctcb = "{state.rctcb_url}"
listen = "{listen}"
home = "{home}"
cache = "{smig_cache()}"
ca = "{ca / "ca.pem"}"
cert = "{ca / "issued" / host / "cert.pem"}"
key = "{ca / "issued" / host / "key.pem"}"
signing_key = "{home / "agent-key.pem"}"
"""


def agent_config(state: LabState, host: str, *, lie_about: Sequence[str] = (), ignore_orders: bool = False) -> str:
    node = state.network.hosts[host]
    return (
        agent_head(state, host, f"{node.address}:{AGENT_PORT}")
        + f"""capacity_vcpus = 4
capacity_memory_mib = 4096

[monitor]
reference = "{state.path / "reference" / "manifest.json"}"
reference_key = "{state.path / "reference" / "key.pub"}"
mean_interval_s = {state.interval_s}
{_subjects(state)}

[migration]
tls = true
"""
        + (
            f"""
[lab]
lie_about = {json.dumps(list(lie_about))}
ignore_orders = {"true" if ignore_orders else "false"}
"""
            if lie_about or ignore_orders
            else ""
        )
    )

"""The temporary region an ingest run loads: its CA and identities, the service, its agents.

:func:`make_region_files` issues the region's CA, the service's, an operator's and every host
agent's certificates and writes the service's configuration; :class:`Service` runs
``smig rctcb serve`` as a child process; :class:`Agent` is a host's agent, :func:`tls_client` the
HTTPS client of an identity; :func:`enrol` enrols the hosts through the API and
:func:`check_assignments` checks that the service assigns monitors as :func:`subjects_of` does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.keys import public_key_pem
from smig.aim.ring import assign_monitors
from smig.rctcb.ca import Role, client_ssl_context, init_ca, issue_identity
from smig.rctcb.loadgen_http import AgentConnection
from smig.rctcb.loadgen_model import BenchError
from smig.rctcb.server import ServiceConfig, parse_config

log = logging.getLogger(__name__)

OPERATOR = "bench-operator"
_TIMEOUT_S = 120.0


def host_names(n: int) -> list[str]:
    return [f"h{i:05d}" for i in range(n)]


def _config_text(home: Path) -> str:
    ca = home / "rctcb" / "ca"
    # Freshness and grace longer than any run: enrolling thousands of hosts takes longer than the
    # 10 s window, and the load is about a region in its steady state, not one going UNKNOWN.
    return (
        "[rctcb]\n"
        'listen = "127.0.0.1:0"\n'
        f'store = "sqlite:///{home}/rctcb/ivt.sqlite"\n'
        f'ca = "{ca}/ca.pem"\n'
        f'cert = "{ca}/issued/rctcb/cert.pem"\n'
        f'key = "{ca}/issued/rctcb/key.pem"\n'
        "[policy]\n"
        "freshness_s = 86400.0\n"
        "unknown_grace_s = 86400.0\n"
    )


def make_region_files(home: Path, names: Sequence[str]) -> tuple[Path, ServiceConfig]:
    """The CA, every identity and the configuration file; returns the file and what it says."""
    ca = home / "rctcb" / "ca"
    init_ca(ca, "bench")
    issue_identity(ca, "rctcb", Role.RCTCB)
    issue_identity(ca, OPERATOR, Role.OPERATOR)
    for name in names:
        issue_identity(ca, name, Role.AGENT)
    text = _config_text(home)
    path = home / "rctcb.toml"
    path.write_text(text)
    return path, parse_config(text, source=str(path))


class Service:
    """``smig rctcb serve`` as a child process; its output goes to files, so it never blocks on a pipe."""

    def __init__(self, home: Path, config: Path) -> None:
        self.home, self.config = home, config
        self.proc: subprocess.Popen[bytes] | None = None
        self._out, self._err = home / "serve.out", home / "serve.err"

    def spawn(self) -> None:
        smig = Path(sys.executable).parent / "smig"  # this environment's, whichever way it was started
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(smig), "rctcb", "serve", "--config", str(self.config), "--json"],
                env={**os.environ, "SMIG_HOME": str(self.home)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    async def start(self, timeout_s: float = 60.0) -> int:
        """Start it and return its port. Raises BenchError if it exits or stays silent."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._out.read_text()
            if "\n" in text:
                return int(json.loads(text.splitlines()[0])["port"])
            if self.proc.poll() is not None:
                raise BenchError(f"the RC-TCB exited with {self.proc.returncode} at start: {self.stderr_tail()}")
            await asyncio.sleep(0.05)
        raise BenchError(f"the RC-TCB did not say it listens within {timeout_s:g}s: {self.stderr_tail()}")

    def stderr_tail(self, limit: int = 2000) -> str:
        try:
            return self._err.read_text()[-limit:].strip() or "(nothing on stderr)"
        except OSError:
            return "(no stderr)"

    def cpu_s(self) -> float:
        """CPU time the service has used, all its threads (0 once it is gone)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; blocks until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the RC-TCB ignored SIGTERM for %gs; killing it", timeout_s)
            self.proc.kill()
            self.proc.wait()


@dataclass
class Agent:
    """A host's agent: its certificate's connection to the service, its monitor key, its subjects."""

    name: str
    key: Ed25519PrivateKey
    subjects: tuple[str, ...] = ()
    client: AgentConnection | None = None


def agent_connection(url: str, home: Path, name: str) -> AgentConnection:
    """The keep-alive connection agent ``name`` sends its reports over (see loadgen_http)."""
    ca = home / "rctcb" / "ca"
    context = client_ssl_context(ca / "issued" / name / "cert.pem", ca / "issued" / name / "key.pem", ca / "ca.pem")
    address = httpx.URL(url)
    return AgentConnection(address.host, address.port or 443, context, name, _TIMEOUT_S)


def tls_client(url: str, home: Path, name: str, connections: int = 1) -> httpx.AsyncClient:
    ca = home / "rctcb" / "ca"
    context = client_ssl_context(ca / "issued" / name / "cert.pem", ca / "issued" / name / "key.pem", ca / "ca.pem")
    # An agent sends a batch every few rounds and keeps its TLS session in between, as the service
    # allows (75 s keep-alive); httpx would drop an idle connection after 5 s.
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=120.0)
    return httpx.AsyncClient(base_url=url, verify=context, timeout=_TIMEOUT_S, limits=limits, trust_env=False)


async def enrol(operator: httpx.AsyncClient, agents: Sequence[Agent], workers: int) -> None:
    """Enrol every host, vouched for, over ``workers`` concurrent requests."""
    todo = iter(agents)

    async def worker() -> None:
        for agent in todo:
            body = {
                "host": agent.name,
                "agent_key": public_key_pem(agent.key).decode(),
                "manifest": "5e" * 32,
                "capacity": {"vcpus": 64, "memory_mib": 256 * 1024},
                "region": "bench",
                "vouched": True,
            }
            reply = await operator.post("/v1/hosts", json=body)
            if reply.status_code != 201:
                raise BenchError(f"enrolling {agent.name} answered {reply.status_code}: {reply.text[:500]}")

    async with asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(worker())


def subjects_of(names: Sequence[str], k: int) -> dict[str, tuple[str, ...]]:
    """Each monitor's subjects when every host is TRUSTED (the service's own ring, computed here)."""
    subjects: dict[str, list[str]] = {n: [] for n in names}
    for subject, monitors in assign_monitors(names, k).items():
        for m in monitors:
            subjects[m].append(subject)
    return {m: tuple(sorted(s)) for m, s in subjects.items()}


async def check_assignments(operator: httpx.AsyncClient, local: dict[str, tuple[str, ...]], sample: int) -> None:
    names = sorted(local)
    step = max(1, len(names) // sample)
    for name in names[::step]:
        reply = await operator.get(f"/v1/assignments/{name}")
        if reply.status_code != 200 or tuple(reply.json()["subjects"]) != local[name]:
            raise BenchError(f"the service assigns {name} {reply.text[:300]}, the local ring {list(local[name])}")

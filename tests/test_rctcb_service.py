"""The RC-TCB as an operator runs it: `smig rctcb serve` on loopback with mutual TLS, agents and an
operator talking to it with certificates from the region CA, and a restart that loses nothing."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smig.aim.keys import generate_key, public_key_pem
from smig.aim.report import sign_report
from smig.model import Verdict
from smig.rctcb.ca import Role, client_ssl_context, init_ca, issue_identity
from tests.helpers import region_report

SMIG = str(Path(sys.executable).parent / "smig")
HOSTS = ("h1", "h2", "h3", "h4")


class Service:
    def __init__(self, home: Path, config: Path) -> None:
        self.home, self.config = home, config
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> None:
        env = {**os.environ, "SMIG_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            [SMIG, "rctcb", "serve", "--config", str(self.config), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the service did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")
        ready = json.loads(line)
        assert ready["host"] == "127.0.0.1" and ready["pid"] == self.proc.pid
        self.url = f"https://localhost:{ready['port']}"

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        self.proc = None
        return code

    def enrol_all(self) -> dict[str, Ed25519PrivateKey]:
        """Enrol every host of HOSTS, vouched for, through the API as the operator; their agent keys."""
        keys = {h: generate_key() for h in HOSTS}
        with self.client("op") as op:
            for h in HOSTS:
                body = {
                    "host": h,
                    "agent_key": public_key_pem(keys[h]).decode(),
                    "manifest": "m" * 64,
                    "capacity": {"vcpus": 8, "memory_mib": 16384},
                    "vouched": True,
                }
                assert op.post("/v1/hosts", json=body).status_code == 201
        return keys

    def client(self, name: str | None) -> httpx.Client:
        ca = self.home / "rctcb" / "ca"
        if name is None:
            context = ssl.create_default_context(cafile=str(ca / "ca.pem"))
        else:
            issued = ca / "issued" / name
            context = client_ssl_context(issued / "cert.pem", issued / "key.pem", ca / "ca.pem")
        return httpx.Client(base_url=self.url, verify=context, timeout=10)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    home = tmp_path / "home"
    ca = home / "rctcb" / "ca"
    init_ca(ca, "r1")
    issue_identity(ca, "rctcb", Role.RCTCB)
    issue_identity(ca, "op", Role.OPERATOR)
    for h in HOSTS:
        issue_identity(ca, h, Role.AGENT)
    config = tmp_path / "rctcb.toml"
    config.write_text(
        "[rctcb]\n"
        'listen = "127.0.0.1:0"\n'
        f'store = "sqlite:///{home}/rctcb/ivt.sqlite"\n'
        f'ca = "{ca}/ca.pem"\n'
        f'cert = "{ca}/issued/rctcb/cert.pem"\n'
        f'key = "{ca}/issued/rctcb/key.pem"\n'
    )
    svc = Service(home, config)
    svc.start()
    yield svc
    if svc.proc is not None:
        svc.stop()


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) pairs that process ``pid`` listens on over TCP."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}") if os.path.exists(f"/proc/{pid}/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                ip = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(address) == 8 else address
                out.add((ip, int(port, 16)))
    return out


def test_agents_report_over_mutual_tls_and_nothing_is_lost_across_a_restart(service: Service) -> None:
    assert service.proc is not None
    port = int(service.url.rsplit(":", 1)[1])
    assert listening(service.proc.pid) == {("127.0.0.1", port)}, "it listens on the configured address only"
    keys = service.enrol_all()
    with service.client("h1") as h1:
        subjects = h1.get("/v1/assignments/h1").json()["subjects"]
        assert subjects and "h1" not in subjects
        reports = [
            sign_report(region_report("h1", s, 1, time.time() - 0.2), keys["h1"]).to_wire().decode() for s in subjects
        ]
        reply = h1.post("/v1/reports", json={"reports": reports})
        assert reply.status_code == 200, reply.text
        assert reply.json()["accepted"] == len(subjects)
        assert h1.get("/v1/assignments/h2").status_code == 403, "an agent reads only its own assignment"
    # Without a client certificate the TLS handshake succeeds, the API refuses.
    with service.client(None) as anonymous:
        refused = anonymous.get("/v1/hosts")
        assert refused.status_code == 401 and "certificate" in refused.json()["error"]
    assert service.stop() == 0
    service.start()
    with service.client("op") as op:
        rows = {r["host"]: r for r in op.get("/v1/hosts").json()["hosts"]}
        assert all(rows[s]["verified_at"] is not None for s in subjects)
        verified = op.get("/v1/audit/verify").json()
        assert verified["valid"] is True and verified["entries"] > len(HOSTS)
    # The CLI reads the same table.
    env = {**os.environ, "SMIG_HOME": str(service.home)}
    table = json.loads(
        subprocess.run([SMIG, "ivt", "--json"], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert {r["host"] for r in table} == set(HOSTS)


def test_a_foreign_certificate_never_gets_a_conversation(service: Service, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    init_ca(other, "r1")  # the same region name, another key
    files = issue_identity(other, "h1", Role.AGENT)
    context = client_ssl_context(files.cert, files.key, service.home / "rctcb" / "ca" / "ca.pem")
    with httpx.Client(base_url=service.url, verify=context, timeout=10) as mallory, pytest.raises(httpx.HTTPError):
        mallory.get("/v1/hosts")


def test_two_monitors_mismatches_distrust_a_host_and_the_service_plans_its_evacuation(service: Service) -> None:
    keys = service.enrol_all()
    with service.client("op") as op:
        monitors = [m for m in HOSTS if "h1" in op.get(f"/v1/assignments/{m}").json()["subjects"]]
    assert len(monitors) == 2
    for monitor in monitors:
        report = region_report(monitor, "h1", 1, time.time() - 0.2, Verdict.MISMATCH)
        with service.client(monitor) as agent:
            reply = agent.post("/v1/reports", json={"reports": [sign_report(report, keys[monitor]).to_wire().decode()]})
            assert reply.status_code == 200, reply.text
    with service.client("op") as op:
        assert op.get("/v1/hosts/h1").json()["state"] == "untrusted"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kinds = [(e["kind"], e["subject"]) for e in op.get("/v1/audit").json()["entries"]]
            if ("evacuation.planned", "h1") in kinds:
                break
            time.sleep(0.1)
        assert ("evacuation.planned", "h1") in kinds, "an UNTRUSTED host's evacuation is planned by the service"
        assert ("effect.evacuate", "h1") in kinds

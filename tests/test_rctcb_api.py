"""The RC-TCB's HTTP API over a real SQLite IVT, real Ed25519 reports and real X.509 client
certificates: operators enrol and read, agents report, and every refused request answers a 4xx
with a JSON error, leaves exactly one audit entry and changes nothing else.

Requests go through the ASGI app in-process (httpx's ASGI transport); a tiny middleware puts the
client certificate into the scope the way the mutual-TLS server does. The event stream is read
over a real socket from uvicorn, since only a real server streams."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from smig.aim.keys import generate_key, public_key_pem
from smig.aim.report import sign_report
from smig.ivt.base import IVTStore, open_store
from smig.model import Report, Resources, TrustState, Verdict
from smig.rctcb.api import create_app
from smig.rctcb.api_events import Broadcaster
from smig.rctcb.policy import Restitch
from smig.rctcb.region import Region, RegionConfig
from tests.helpers import region_report

T0 = 1_800_000_000.0
HOSTS = ("h1", "h2", "h3", "h4")
BODY_LIMIT = 64 << 10


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- certificates ------------------------------------------------------------------------------


def _when(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


@dataclasses.dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def new(cls, name: str = "SMIG test region CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(T0 - 86400))
            .not_valid_after(_when(T0 + 86400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, role: str, name: str, *, not_after: float = T0 + 3600) -> str:
        """A leaf certificate, PEM: OU = role, CN = name."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role), x509.NameAttribute(NameOID.COMMON_NAME, name)]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(T0 - 3600))
            .not_valid_after(_when(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # An agent's certificate names the address it serves at (see the agent routes).
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"{name}.lab")]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class WithCert:
    """What the mutual-TLS server does: the verified client chain in the scope's TLS extension."""

    def __init__(self, app: FastAPI, pem: str | None) -> None:
        self.app = app
        self.pem = pem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.pem is not None:
            extensions = {**scope.get("extensions", {}), "tls": {"client_cert_chain": [self.pem]}}
            scope = {**scope, "extensions": extensions}
        await self.app(scope, receive, send)


# -- the lab -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Lab:
    store: IVTStore
    region: Region
    app: FastAPI
    clock: Clock
    ca: CA
    keys: dict[str, Ed25519PrivateKey]
    sequence: int = 0

    def client(self, pem: str | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=WithCert(self.app, pem)), base_url="https://rctcb")

    def operator(self) -> httpx.AsyncClient:
        return self.client(self.ca.issue("operator", "alice"))

    def agent(self, host: str) -> httpx.AsyncClient:
        return self.client(self.ca.issue("agent", host))

    def report(self, monitor: str, subject: str, verdict: Verdict = Verdict.MATCH, **changes: Any) -> Report:
        self.sequence += 1
        return region_report(monitor, subject, self.sequence, T0 - 0.4, verdict, **changes)

    def wire(self, report: Report, key: Ed25519PrivateKey | None = None) -> str:
        return sign_report(report, key or self.keys[report.monitor]).to_wire().decode()

    def monitor_of(self, subject: str, other_than: str = "") -> str:
        return next(m for m in self.region.assignment()[subject] if m != other_than)

    def not_monitor_of(self, subject: str) -> str:
        assigned = self.region.assignment()[subject]
        return next(h for h in HOSTS if h != subject and h not in assigned)

    def snapshot(self) -> tuple[object, ...]:
        """Everything a request could change in the IVT: the rows and every last sequence."""
        sequences = tuple(self.store.last_sequence(m, s) for m in HOSTS for s in HOSTS)
        return tuple(self.store.hosts()), sequences, self.region.rows()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield from new_lab(tmp_path)


def new_lab(tmp_path: Path) -> Iterator[Lab]:
    """Four vouched hosts behind the API (the body of the ``lab`` fixture, for other test files)."""
    store = open_store(str(tmp_path / "ivt.sqlite"))
    region = Region(store, RegionConfig(max_age_s=30, max_skew_s=5))
    keys = {h: generate_key() for h in HOSTS}
    for h in HOSTS:
        pem = public_key_pem(keys[h]).decode()
        region.enroll(h, agent_key=pem, manifest="m" * 64, capacity=Resources(8, 16384), now=T0 - 60, vouched=True)
    clock = Clock(T0)
    ca = CA.new()
    app = create_app(region, ca_cert=ca.cert, clock=clock, max_body_bytes=BODY_LIMIT)
    yield Lab(store, region, app, clock, ca, keys)
    store.close()


# -- stories -----------------------------------------------------------------------------------


def test_an_operator_enrols_a_vouched_host_and_lists_the_region(lab: Lab) -> None:
    async def story() -> None:
        key = public_key_pem(generate_key()).decode()
        body = {"host": "h5", "agent_key": key, "manifest": "m" * 64, "capacity": {"vcpus": 4, "memory_mib": 8192}}
        async with lab.operator() as op:
            r = await op.post("/v1/hosts", json={**body, "vouched": True, "address": "10.0.0.5"})
            assert r.status_code == 201, r.text
            assert (r.json()["host"], r.json()["state"], r.json()["address"]) == ("h5", "trusted", "10.0.0.5")
            r = await op.post("/v1/hosts", json=body)
            assert (r.status_code, r.json()["reason"]) == (409, "host-exists")
            r = await op.post("/v1/hosts", json={**body, "host": "h6", "agent_key": "not a key"})
            assert (r.status_code, r.json()["reason"]) == (400, "bad-key")
            listed = (await op.get("/v1/hosts")).json()["hosts"]
            assert [h["host"] for h in listed] == [*HOSTS, "h5"]
            assert all({"host", "state", "verified_at", "capacity", "agent_key"} <= set(h) for h in listed)
            one = (await op.get("/v1/hosts/h5")).json()
            assert one["capacity"] == {"vcpus": 4, "memory_mib": 8192} and one["verified_at"] is None
        assert lab.store.get("h5").state is TrustState.TRUSTED and "h6" not in lab.region.rows()
        kinds = [e.kind for e in lab.store.audit_entries()]
        assert kinds[-1] == "api.rejected" and kinds.count("api.rejected") == 2

    run(story())


def test_an_agent_reads_its_own_assignment_and_no_one_elses(lab: Lab) -> None:
    async def story() -> None:
        mine = sorted(s for s, monitors in lab.region.assignment().items() if "h1" in monitors)
        async with lab.agent("h1") as agent, lab.operator() as op:
            r = await agent.get("/v1/assignments/h1")
            assert r.json() == {"monitor": "h1", "subjects": mine}
            r = await agent.get("/v1/assignments/h2")
            assert (r.status_code, r.json()["reason"]) == (403, "not-yours")
            assert (await op.get("/v1/assignments/h1")).json()["subjects"] == mine

    run(story())


def test_an_agent_submits_a_batch_and_the_row_shows_when_it_was_verified(lab: Lab) -> None:
    async def story() -> None:
        m = lab.monitor_of("h2")
        good = lab.report(m, "h2")
        replay = lab.wire(good)
        async with lab.agent(m) as agent:
            r = await agent.post("/v1/reports", json={"reports": [lab.wire(good), replay, "junk"]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["accepted"], body["rejected"]) == (1, 2)
            assert body["results"][0] == {"accepted": True, "monitor": m, "subject": "h2", "sequence": good.sequence}
            assert [x.get("reason") for x in body["results"]] == [None, "replayed", "malformed"]
            row = (await agent.get("/v1/hosts/h2")).json()
            assert (row["verified_at"], row["verified"]["monitor"], row["state"]) == (T0 - 0.4, m, "trusted")
            r = await agent.post("/v1/noop", json={"reports": [replay] * 3})
            assert r.json() == {"results": [], "accepted": 0, "rejected": 0, "count": 3}
        kinds = [e.kind for e in lab.store.audit_entries()]
        assert kinds.count("report.accepted") == 1 and kinds.count("report.rejected") == 2

    run(story())


def test_every_bad_input_is_a_4xx_with_a_json_error_one_audit_entry_and_no_change(lab: Lab) -> None:
    foreign = CA.new("someone else's CA")

    async def story() -> None:
        m = lab.monitor_of("h1")
        stranger = lab.not_monitor_of("h1")
        good = lab.report(m, "h1")
        async with lab.agent(m) as agent:
            assert (await agent.post("/v1/reports", json={"reports": [lab.wire(good)]})).status_code == 200
        old = lab.report(m, "h1", started_at=T0 - 61, ended_at=T0 - 60)
        earlier = dataclasses.replace(good, sequence=good.sequence - 1)
        R = "/v1/reports"
        cases: list[tuple[str, str | None, str, str, dict[str, Any], int, str]] = [
            # (case, certificate, method, path, request, status, reason)
            ("malformed JSON", m, "POST", R, {"content": b'{"reports": [', "headers": _JSON}, 400, "malformed-json"),
            ("off the schema", "operator", "POST", "/v1/hosts", {"json": {"host": "h7"}}, 422, "invalid-request"),
            ("oversize, declared", m, "POST", R, {"content": b" " * (BODY_LIMIT + 1), "headers": _JSON},
             413, "body-too-large"),
            ("oversize, streamed", m, "POST", R, {"content": _chunks(BODY_LIMIT + 1), "headers": _JSON},
             413, "body-too-large"),
            ("unknown host", "operator", "GET", "/v1/hosts/h9", {}, 404, "unknown-host"),
            ("unknown host's maintenance", "operator", "POST", "/v1/hosts/h9/maintenance", {"json": {"on": True}},
             404, "unknown-host"),
            ("not assigned", stranger, "POST", R, _batch(lab.wire(lab.report(stranger, "h1"))), 403, "not-assigned"),
            ("forged", m, "POST", R, _batch(lab.wire(lab.report(m, "h1"), generate_key())), 403, "forged"),
            ("replayed", m, "POST", R, _batch(lab.wire(good)), 422, "replayed"),
            ("out of order", m, "POST", R, _batch(lab.wire(earlier)), 422, "out-of-order"),
            ("stale", m, "POST", R, _batch(lab.wire(old)), 422, "stale"),
            ("malformed report", m, "POST", R, _batch('{"key_id": 1}'), 422, "malformed"),
            ("another agent's report", stranger, "POST", R, _batch(lab.wire(lab.report(m, "h1"))), 403, "wrong-agent"),
            ("no client certificate", None, "GET", "/v1/hosts", {}, 401, "no-client-certificate"),
            ("a foreign CA's certificate", "foreign", "GET", "/v1/hosts", {}, 403, "foreign-certificate"),
            ("an expired certificate", "expired", "GET", "/v1/hosts", {}, 403, "expired-certificate"),
            ("an agent at an operator endpoint", m, "GET", "/v1/audit", {}, 403, "wrong-role"),
            ("an agent re-enrolling a host", m, "POST", "/v1/hosts/h2/reenrol", {}, 403, "wrong-role"),
            ("no such path", "operator", "GET", "/v2/hosts", {}, 404, "not-found"),
        ]  # fmt: skip
        certs = {
            "operator": lab.ca.issue("operator", "alice"),
            "foreign": foreign.issue("operator", "mallory"),
            "expired": lab.ca.issue("agent", m, not_after=T0 - 1),
            **{h: lab.ca.issue("agent", h) for h in HOSTS},
        }
        for case, who, method, path, request, status, reason in cases:
            before, entries = lab.snapshot(), lab.store.verify_audit()
            async with lab.client(certs[who] if who else None) as client:
                r = await client.request(method, path, **request)
            assert (r.status_code, r.json().get("reason")) == (status, reason), f"{case}: {r.text}"
            assert isinstance(r.json()["error"], str) and r.json()["error"], case
            assert lab.snapshot() == before, f"{case} changed the IVT"
            new = list(lab.store.audit_entries(since=entries))
            assert len(new) == 1, f"{case}: {[e.kind for e in new]}"
            expected_kind = "report.rejected" if path == "/v1/reports" and status in (403, 422) else "api.rejected"
            assert new[0].kind == expected_kind and new[0].body["reason"] == reason, (case, new[0])
        assert lab.store.verify_audit() > 0

    run(story())


def test_operators_take_hosts_in_and_out_of_service_and_let_time_pass(lab: Lab) -> None:
    async def story() -> None:
        async with lab.operator() as op, lab.client(lab.ca.issue("rctcb", "rctcb-1")) as rctcb:
            r = await op.post("/v1/hosts/h4/maintenance", json={"on": True})
            assert r.json()["row"]["state"] == "maintenance"
            assert r.json()["effects"][0] == {**r.json()["effects"][0], "kind": "trust.changed", "new": "maintenance"}
            r = await rctcb.post("/v1/tick", json={"now": T0 + 20})
            assert r.status_code == 200, r.text
            unknown = sorted(e["host"] for e in r.json()["effects"] if e.get("new") == "unknown")
            assert unknown == ["h1", "h2", "h3"]  # no verified report in 10 s; h4 is in maintenance
            assert (await rctcb.post("/v1/tick", json={"now": T0})).json()["reason"] == "tick-backwards"
            r = await op.post("/v1/hosts/h4/reenrol")
            assert r.json()["row"]["state"] == "enrolling"
            page = (await op.get("/v1/audit", params={"since": 2, "limit": 3})).json()
            assert [e["seq"] for e in page["entries"]] == [3, 4, 5] and page["next"] == 5
            verified = (await op.get("/v1/audit/verify")).json()
            assert verified == {"valid": True, "entries": lab.store.verify_audit()}

    run(story())


def test_metrics_count_reports_requests_and_hosts(lab: Lab) -> None:
    async def story() -> None:
        m = lab.monitor_of("h3")
        async with lab.agent(m) as agent, lab.operator() as op:
            await agent.post("/v1/reports", json={"reports": [lab.wire(lab.report(m, "h3")), "junk"]})
            assert (await agent.get("/metrics")).status_code == 403
            r = await op.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float | None:
            return samples.get((name, tuple(sorted(labels.items()))))

        assert value("smig_reports_total", result="accepted", reason="") == 1
        assert value("smig_reports_total", result="rejected", reason="malformed") == 1
        assert value("smig_api_requests_total", path="/v1/reports", status="200") == 1
        assert value("smig_api_requests_total", path="/metrics", status="403") == 1
        assert value("smig_hosts", state="trusted") == 4 and value("smig_hosts", state="untrusted") == 0
        assert value("smig_ingest_seconds_count") == 1

    run(story())


def test_the_openapi_document_lists_every_path(lab: Lab) -> None:
    async def story() -> None:
        async with lab.client(None) as anyone:
            doc = (await anyone.get("/openapi.json")).json()
        assert doc["info"]["title"] == "SMIG RC-TCB"
        assert set(doc["paths"]) >= {
            "/v1/hosts",
            "/v1/hosts/{host}",
            "/v1/assignments/{monitor}",
            "/v1/reports",
            "/v1/noop",
            "/v1/hosts/{host}/maintenance",
            "/v1/hosts/{host}/reenrol",
            "/v1/tick",
            "/v1/audit",
            "/v1/audit/verify",
            "/v1/events",
            "/metrics",
        }

    run(story())


def test_the_event_stream_tells_a_watcher_that_a_host_turned_untrusted(lab: Lab) -> None:
    async def story() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(WithCert(lab.app, lab.ca.issue("operator", "alice")), log_level="warning")
        )
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:  # noqa: ASYNC110 -- uvicorn offers a flag, not an event
                await asyncio.sleep(0.01)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as watcher,
                watcher.stream("GET", "/v1/events") as stream,
            ):
                assert stream.headers["content-type"].startswith("text/event-stream")
                events = await asyncio.wait_for(_untrusted_after_two_mismatches(lab, stream.aiter_lines()), 5)
        finally:
            server.should_exit = True
            await serving
            sock.close()
        changes = [(e["host"], e["new"]) for name, e in events if name == "trust.changed"]
        assert changes == [("h3", "suspect"), ("h3", "untrusted")]
        assert ("effect.evacuate", "h3") in [(name, e.get("host")) for name, e in events]

    run(story())


async def _untrusted_after_two_mismatches(lab: Lab, lines: AsyncIterator[str]) -> list[tuple[str, dict[str, Any]]]:
    assert await anext(lines) == ": subscribed"  # from here on the stream sees every effect
    first = lab.monitor_of("h3")
    second = lab.monitor_of("h3", other_than=first)
    for monitor in (first, second):
        async with lab.agent(monitor) as agent:
            batch = {"reports": [lab.wire(lab.report(monitor, "h3", Verdict.MISMATCH))]}
            assert (await agent.post("/v1/reports", json=batch)).status_code == 200
    events: list[tuple[str, dict[str, Any]]] = []
    name = ""
    async for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
            if name == "effect.evacuate":  # announced right after the change to untrusted
                return events
    raise AssertionError(f"the stream ended before h3 was evacuated: {events}")


def test_a_subscriber_that_falls_behind_is_dropped_not_waited_for() -> None:
    async def story() -> None:
        events = Broadcaster(queue_size=2)
        slow = events.subscribe()
        events.publish([Restitch("one"), Restitch("two")])
        events.publish([Restitch("three")])  # the queue is full: the reader is dropped
        assert len(events) == 0 and events.dropped == 1
        assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None  # its stream ends at once

    run(story())


_JSON = {"content-type": "application/json"}


def _batch(*wires: str) -> dict[str, Any]:
    return {"json": {"reports": list(wires)}}


async def _chunks(size: int) -> AsyncIterator[bytes]:
    """A body with no Content-Length: only counting the streamed bytes catches it."""
    for _ in range(0, size, 4096):
        yield b" " * 4096


def test_an_operator_approves_a_new_manifest_and_reads_the_migration_orders(lab: Lab) -> None:
    from smig.ivt.base import StoredOrder

    with lab.store.transaction() as tx:
        body = {"id": "o-1", "state": "migrating", "source": "h1", "target": "h2"}
        tx.put_order(StoredOrder("o-1", "web", "migrating", True, body))

    async def story() -> None:
        async with lab.operator() as op, lab.agent("h1") as agent:
            r = await op.put("/v1/hosts/h1/manifest", json={"manifest": "n" * 64})
            assert r.status_code == 200 and r.json()["manifest"] == "n" * 64
            assert (await agent.put("/v1/hosts/h1/manifest", json={"manifest": "x"})).status_code == 403
            assert (await op.put("/v1/hosts/h9/manifest", json={"manifest": "x"})).status_code == 404
            orders = (await op.get("/v1/migrations")).json()["orders"]
            assert [o["id"] for o in orders] == ["o-1"]
            assert (await op.get("/v1/migrations/o-1")).json()["target"] == "h2"
            assert (await op.get("/v1/migrations/o-9")).json()["reason"] == "unknown-order"
            assert (await agent.get("/v1/migrations")).status_code == 403

    run(story())
    assert lab.store.get("h1").manifest == "n" * 64
    approved = [e.body for e in lab.store.audit_entries() if e.kind == "manifest.approved"]
    assert approved == [{"old": "m" * 64, "new": "n" * 64}]


def test_a_certificate_accepted_before_is_refused_once_it_expires(lab: Lab) -> None:
    # The edge keeps verified certificates between requests; their validity is checked on each.
    async def story() -> None:
        async with lab.client(lab.ca.issue("operator", "alice", not_after=T0 + 60)) as client:
            assert (await client.get("/v1/hosts")).status_code == 200
            lab.clock.now = T0 + 61
            r = await client.get("/v1/hosts")
            assert (r.status_code, r.json()["reason"]) == (403, "expired-certificate")
            lab.clock.now = T0 + 30
            assert (await client.get("/v1/hosts")).status_code == 200

    run(story())


def test_report_results_are_written_as_their_model_would_write_them(lab: Lab) -> None:
    from smig.rctcb.api import _result_json, _result_out
    from smig.rctcb.region import ReportResult

    accepted = ReportResult(lab.report(lab.monitor_of("h1"), "h1"), "h2")
    refused = ReportResult(None, "h2", "stale", "too old", item=3)
    for result in (accepted, refused):
        assert _result_json(result) == _result_out(result).model_dump(exclude_none=True)

"""The ingest benchmark as `smig bench ingest` runs it: a small region loaded over real HTTPS, every
report counted, both endpoints timed, and nothing left behind."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from smig.rctcb.loadgen import Connections, LoadConfig, run_ingest
from smig.rctcb.loadgen_http import AgentConnection, Reply
from smig.rctcb.loadgen_model import BenchError

SMIG = str(Path(sys.executable).parent / "smig")


def test_a_small_region_is_ingested_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    config = LoadConfig(hosts=40, clients=2, rounds=2, rounds_per_batch=2, root=tmp_path)

    result = asyncio.run(run_ingest(config))

    figures = result.to_json()
    assert figures["rejected"] == 0 and figures["accepted"] == figures["reports"] == 40 * 2 * 2
    assert figures["batches"] == 40 and figures["batch_size"] == 4
    assert figures["verdicts_per_s"] > 0 and figures["baseline_per_s"] > 0
    assert figures["p99_ms"] >= figures["p50_ms"] > 0
    assert figures["baseline_p99_ms"] >= figures["baseline_p50_ms"] > 0
    assert result.baseline.accepted == result.baseline.reports == 160, "the no-op parsed every batch"
    assert result.ingest.tls_handshakes == 0, "the agents' connections were opened before timing"
    assert not Path(f"/proc/{result.server_pid}").exists(), "the service was stopped"
    assert not Path(result.home).exists() and list(tmp_path.iterdir()) == [], "the temporary home was removed"


def test_the_command_explains_itself() -> None:
    done = subprocess.run([SMIG, "bench", "ingest", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for words in ("--quick", "--json", "/v1/noop", "10,000"):
        assert words in done.stdout


def test_each_request_on_its_own_connection_when_asked() -> None:
    config = LoadConfig(hosts=12, clients=2, rounds=2, rounds_per_batch=2, connections=Connections.PER_REQUEST)
    result = asyncio.run(run_ingest(config))
    assert result.ingest.rejected == 0 and result.ingest.accepted == 12 * 2 * 2
    assert result.ingest.tls_handshakes == result.ingest.requests == 12
    assert result.baseline.tls_handshakes == 12


async def _serve(replies: list[bytes]) -> tuple[asyncio.Server, list[bytes]]:
    """A plain TCP server answering each request it reads with the next of ``replies``."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(x for x in head.split(b"\r\n") if x.startswith(b"content-length")).split(b": ")[1])
            seen.append(head + await reader.readexactly(length))
            writer.write(reply)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


def test_the_agent_connection_is_kept_and_refuses_what_it_cannot_read() -> None:
    async def scenario() -> tuple[list[Reply], list[bytes], int, str]:
        ok = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"count":1}'
        chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        server, seen = await _serve([ok, ok, chunked])
        port = server.sockets[0].getsockname()[1]
        conn = AgentConnection("127.0.0.1", port, None, "h00001", 5.0)
        replies = [await conn.post("/v1/noop", b'{"reports":["a"]}') for _ in range(2)]
        with pytest.raises(BenchError) as refused:
            await conn.post("/v1/noop", b"{}")
        server.close()
        return replies, seen, conn.handshakes, str(refused.value)

    replies, seen, handshakes, refused = asyncio.run(scenario())
    assert replies == [Reply(200, b'{"count":1}')] * 2
    assert handshakes == 1, "both requests went over the one kept connection"
    assert seen[0].startswith(b"POST /v1/noop HTTP/1.1\r\n") and seen[0].endswith(b'\r\n\r\n{"reports":["a"]}')
    assert "content-length" in refused and "h00001" in refused

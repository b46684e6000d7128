"""An agent's side of the ingest load: one HTTP/1.1 connection over mutual TLS, kept open.

The load generator shares the machine with the service it measures, so its own cost per request
bounds what it can show: with httpx it spent more CPU per request than the service's no-op
endpoint did, and the no-op baseline measured the client. This client does only what an agent's
POST needs, as load generators such as ``wrk`` do: the request is written as bytes, the response
read by its ``Content-Length``, over asyncio's TLS. It speaks to SMIG's service, not to the web
at large: anything else (a chunked body, an informational status) is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

from smig.rctcb.loadgen_model import BenchError

_MAX_HEAD = 64 << 10


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


class AgentConnection:
    """One agent's keep-alive connection to the service (opened on first use, counted)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, name: str, timeout_s: float) -> None:
        """``context`` None: plain TCP (for tests of the HTTP side alone)."""
        self.host = host
        self.port = port
        self.name = name
        self._context = context
        self._timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.handshakes = 0  # connections opened so far (each a TLS handshake)

    async def post(self, path: str, body: bytes, *, close: bool = False) -> Reply:
        """POST ``body`` (JSON) to ``path``; with ``close`` over a new connection that ends after the reply.

        Raises BenchError: the connection failed, timed out or the reply was not HTTP/1.1 as the
        service writes it."""
        try:
            return await asyncio.wait_for(self._post(path, body, close), self._timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as e:
            await self.aclose()
            raise BenchError(f"POST {path} as {self.name} failed: {type(e).__name__}: {e}") from e

    async def _post(self, path: str, body: bytes, close: bool) -> Reply:
        if close:
            await self.aclose()  # a connection of its own, handshake included, even after a kept one
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._context,
                server_hostname=self.host if self._context is not None else None,
                limit=_MAX_HEAD,
            )
            self.handshakes += 1
        assert self._reader is not None
        ending = "connection: close\r\n" if close else ""
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{ending}\r\n"
        )
        self._writer.write(head.encode("ascii") + body)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if version != "HTTP/1.1" or not rest[:3].isdigit():
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        if "content-length" not in headers:
            raise ValueError(f"reply without content-length (headers: {sorted(headers)})")
        reply = Reply(int(rest[:3]), await self._reader.readexactly(int(headers["content-length"])))
        if close or headers.get("connection") == "close":
            await self.aclose()
        return reply

    async def aclose(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):  # the service closed first: nothing to flush
                await writer.wait_closed()

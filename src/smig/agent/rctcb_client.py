"""The agent's side of the RC-TCB API: one mutual-TLS HTTP client, reused for every call.

Every failure to get an answer (connection refused, reset, timeout) raises
:class:`RctcbUnavailable`, which the agent's loops treat as "try again later" — the RC-TCB or the
network may be gone for a while, and nothing the agent holds is lost meanwhile. An answer the
RC-TCB gives (a 4xx) raises :class:`RctcbRefused` with the RC-TCB's own message.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

import httpx

from smig.errors import SmigError
from smig.model import VMInfo

log = logging.getLogger(__name__)

__all__ = ["RctcbClient", "RctcbRefused", "RctcbUnavailable", "read_events"]


class RctcbUnavailable(SmigError):
    """No answer from the RC-TCB: it is down or unreachable. Retry later."""


class RctcbRefused(SmigError):
    """The RC-TCB answered with an error; ``status`` and ``reason`` are its own."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RctcbClient:
    """Calls the RC-TCB as this host's agent."""

    def __init__(self, base_url: str, host: str, context: ssl.SSLContext, *, timeout_s: float = 10.0) -> None:
        self.base_url = base_url
        self.host = host
        self._http = httpx.AsyncClient(base_url=base_url, verify=context, timeout=timeout_s)

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = await self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise RctcbUnavailable(f"the RC-TCB at {self.base_url} did not answer {method} {path}: {e!r}") from e
        if r.status_code >= 400:
            try:
                payload = r.json()
                message, reason = str(payload.get("error", r.text)), str(payload.get("reason", ""))
            except ValueError:
                message, reason = r.text, ""
            if r.status_code >= 500:
                raise RctcbUnavailable(f"the RC-TCB failed {method} {path} ({r.status_code}): {message}")
            raise RctcbRefused(
                f"the RC-TCB refused {method} {path} ({r.status_code}): {message}", status=r.status_code, reason=reason
            )
        return r.json()

    async def enrol(self, *, agent_key: str, address: str, vcpus: int, memory_mib: int, region: str) -> dict[str, Any]:
        """Enrol this host, or re-sync with its row; the row."""
        body = {
            "agent_key": agent_key,
            "address": address,
            "capacity": {"vcpus": vcpus, "memory_mib": memory_mib},
            "region": region,
        }
        result: dict[str, Any] = await self._call("PUT", f"/v1/hosts/{self.host}/agent", body)
        return result

    async def assignment(self) -> list[str]:
        """The subjects this host must measure."""
        return list((await self._call("GET", f"/v1/assignments/{self.host}"))["subjects"])

    async def row(self, host: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/hosts/{host}")
        return result

    async def submit(self, wires: Sequence[str]) -> dict[str, Any]:
        """Send signed reports (or signed batches); the per-report results.

        A batch none of whose reports counted answers 4xx: that is returned like a success, since
        the results say why per report and resending would not help.
        """
        try:
            result: dict[str, Any] = await self._call("POST", "/v1/reports", {"reports": list(wires)})
            return result
        except RctcbRefused as e:
            if e.status in (403, 422):
                log.warning("%s", e)
                return {"accepted": 0, "rejected": len(wires), "results": []}
            raise

    async def inventory(self, vms: Sequence[VMInfo]) -> dict[str, Any]:
        """Tell the RC-TCB which VMs this host runs."""
        body = {
            "vms": [
                {
                    "name": vm.name,
                    "vcpus": vm.spec.vcpus,
                    "memory_mib": vm.spec.memory_mib,
                    "spec": asdict(vm.spec),
                }
                for vm in vms
            ]
        }
        result: dict[str, Any] = await self._call("PUT", f"/v1/hosts/{self.host}/vms", body)
        return result

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The RC-TCB's event stream, ``(kind, data)`` per event, until it ends.

        Raises RctcbUnavailable when it cannot be opened or breaks off."""
        try:
            async with self._http.stream("GET", "/v1/events", timeout=httpx.Timeout(10.0, read=None)) as r:
                if r.status_code != 200:
                    raise RctcbUnavailable(f"the RC-TCB's event stream answered {r.status_code}")
                async for event in read_events(r.aiter_lines()):
                    yield event
        except httpx.TransportError as e:
            raise RctcbUnavailable(f"the RC-TCB's event stream broke off: {e!r}") from e


async def read_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-sent events from the lines of a ``/v1/events`` stream: ``(kind, data)`` per event;
    comments are skipped, and so is data that is not JSON."""
    kind = ""
    async for line in lines:
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            try:
                yield kind, json.loads(line[5:])
            except ValueError:
                log.debug("unreadable event data: %r", line)

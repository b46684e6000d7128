"""The host agents as the RC-TCB reaches them: orders over HTTPS, fencing out of band.

:class:`HttpAgentClient` is an :class:`~smig.rctcb.agents.AgentClient` over one agent's orders
API (:mod:`smig.agent.orders_api`, which lists the endpoints), with mutual TLS: the RC-TCB
presents its own certificate and checks the agent's against the region CA and the address it
dialled. :class:`HttpAgentDirectory` hands out one client per host and address.

``fence`` never goes to the agent: the host being fenced is the untrusted one, and its agent may
ignore the order. It goes to a :class:`Fencer`, the region's out-of-band hand on the host's
power or processes: :class:`CommandFencer` runs an operator's command (an IPMI or Redfish
script); :class:`NetnsFencer` is the lab's BMC, killing a VM's QEMU processes in the network
namespace that stands for the host.

On the wire an error is ``{"error": message, "reason": word}``; :data:`WIRE_ERRORS` is the one
table of which exception travels as which status and reason, read by both ends. A connection
that fails or times out is a :class:`~smig.errors.HypervisorError` naming the host and URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import httpx

from smig.aim.procfs import hypervisor_pids
from smig.errors import (
    ConfigError,
    DestinationUnreachable,
    HypervisorError,
    LaunchError,
    MigrationError,
    PortInUse,
    QMPError,
    SmigError,
    TLSError,
    VMExists,
    VMNotFound,
    VMStateError,
)
from smig.model import PlacedVM, valid_vm_name
from smig.rctcb.agents import AgentClient, MigrationPhase, MigrationView, VMWhere

__all__ = [
    "WIRE_ERRORS",
    "CommandFencer",
    "Fencer",
    "HomeFencer",
    "HttpAgentClient",
    "HttpAgentDirectory",
    "NetnsFencer",
    "error_from_wire",
    "vm_processes",
    "wire_error",
]

log = logging.getLogger(__name__)

#: Which exception travels as which HTTP status and reason; subclasses before their parents.
WIRE_ERRORS: tuple[tuple[type[SmigError], int, str], ...] = (
    (VMNotFound, 404, "vm-not-found"),
    (VMExists, 409, "vm-exists"),
    (VMStateError, 409, "vm-state"),
    (LaunchError, 500, "launch-failed"),
    (QMPError, 500, "qmp-failed"),
    (PortInUse, 502, "port-in-use"),
    (TLSError, 502, "tls-refused"),
    (DestinationUnreachable, 502, "destination-unreachable"),
    (MigrationError, 409, "migration-refused"),
    (HypervisorError, 500, "hypervisor-error"),
)


def wire_error(e: SmigError) -> tuple[int, str]:
    """The HTTP status and reason an agent answers ``e`` with."""
    for cls, status, reason in WIRE_ERRORS:
        if isinstance(e, cls):
            return status, reason
    if isinstance(e, ConfigError):
        return 400, "bad-request"
    return 500, "agent-error"


def error_from_wire(status: int, reason: str, message: str, *, host: str, vm: str | None) -> SmigError:
    """The exception an agent's error answer stands for; anything unknown is a HypervisorError."""
    for cls, _, known in WIRE_ERRORS:
        if known == reason:
            return cls(message, host=host, vm=vm)
    return HypervisorError(f"the agent of {host} answered {status} ({reason}): {message}", host=host, vm=vm)


class Fencer(Protocol):
    """Stops a VM's processes on a host without the host's cooperation."""

    async def fence(self, host: str, vm: str) -> None:
        """Return once no process of ``vm`` runs on ``host`` (also when none did).

        Raises HypervisorError when that cannot be made sure."""
        ...


class HttpAgentClient:
    """One host's agent over HTTPS (see the module docstring). ``host`` names it in errors (the
    URL's host by default); ``fencer`` carries out :meth:`fence`."""

    def __init__(
        self,
        base_url: str,
        ssl_context: ssl.SSLContext,
        *,
        timeout_s: float = 30.0,
        host: str = "",
        fencer: Fencer | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host = host or urlsplit(base_url).hostname or base_url
        self._timeout_s = timeout_s
        self._fencer = fencer
        self._http = httpx.AsyncClient(base_url=self.base_url, verify=ssl_context, timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, vm: str | None, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise HypervisorError(
                f"the agent of {self.host} did not answer {method} {url} within {self._timeout_s:g}s "
                f"({type(e).__name__})",
                host=self.host,
                vm=vm,
            ) from e
        except httpx.TransportError as e:
            raise HypervisorError(
                f"the agent of {self.host} cannot be reached at {url}: {e or type(e).__name__}", host=self.host, vm=vm
            ) from e
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HypervisorError(
                f"the agent of {self.host} answered {method} {url} with {response.status_code} and no JSON object",
                host=self.host,
                vm=vm,
            )
        if response.status_code >= 400:
            reason, message = str(body.get("reason", "")), str(body.get("error", response.reason_phrase))
            if response.status_code in (401, 403):
                raise HypervisorError(
                    f"the agent of {self.host} at {url} refused the RC-TCB's certificate ({reason}): {message}",
                    host=self.host,
                    vm=vm,
                )
            raise error_from_wire(response.status_code, reason, message, host=self.host, vm=vm)
        return body

    def _malformed(self, what: str, body: object, vm: str) -> HypervisorError:
        return HypervisorError(
            f"the agent of {self.host} sent a malformed {what}: {body!r:.200}", host=self.host, vm=vm
        )

    @staticmethod
    def _order(order_id: str) -> str:
        return f"/v1/orders/{quote(order_id, safe='')}"

    async def prepare_incoming(self, vm: PlacedVM, order_id: str) -> str:
        body = await self._request(
            "PUT", f"{self._order(order_id)}/incoming", vm.name, json={"vm": dataclasses.asdict(vm)}
        )
        address = body.get("address")
        if not isinstance(address, str) or not address:
            raise self._malformed("incoming address", body, vm.name)
        return address

    async def migrate(self, vm: str, target_address: str, order_id: str) -> None:
        payload = {"vm": vm, "target_address": target_address}
        await self._request("PUT", f"{self._order(order_id)}/migration", vm, json=payload)

    async def progress(self, vm: str, order_id: str, wait_s: float = 0.0) -> MigrationView:
        params: dict[str, str | float] = {"vm": vm}
        if wait_s > 0:
            params["wait"] = wait_s
        body = await self._request("GET", f"{self._order(order_id)}/migration", vm, params=params)
        try:
            error = body.get("error")
            return MigrationView(
                MigrationPhase(body["status"]),
                int(body.get("transferred_bytes", 0)),
                int(body.get("remaining_bytes", 0)),
                None if error is None else str(error),
            )
        except (KeyError, ValueError, TypeError):
            raise self._malformed("migration progress", body, vm) from None

    async def cancel(self, vm: str, order_id: str) -> None:
        await self._request("POST", f"{self._order(order_id)}/migration/cancel", vm, json={"vm": vm})

    async def abort_incoming(self, vm: str, order_id: str) -> None:
        await self._request("POST", f"{self._order(order_id)}/incoming/abort", vm, json={"vm": vm})

    async def where(self, vm: str) -> VMWhere:
        body = await self._request("GET", f"/v1/vms/{quote(vm, safe='')}/where", vm)
        try:
            return VMWhere(body["where"])
        except (KeyError, ValueError):
            raise self._malformed("answer to where", body, vm) from None

    async def fence(self, vm: str) -> None:
        if self._fencer is None:
            raise HypervisorError(
                f"cannot fence {vm} on {self.host}: the RC-TCB has no fencing configured "
                "(a BMC command, or the lab's network namespaces)",
                host=self.host,
                vm=vm,
            )
        await self._fencer.fence(self.host, vm)

    async def start_from_disk(self, vm: PlacedVM, order_id: str) -> None:
        await self._request("PUT", f"{self._order(order_id)}/restart", vm.name, json={"vm": dataclasses.asdict(vm)})


class HttpAgentDirectory:
    """:class:`~smig.rctcb.agents.AgentDirectory` over HTTPS: ``address_of(host)`` is the agent's
    base URL (as its IVT row says, e.g. ``https://10.77.0.2:7443``); one client per host and
    address, kept until :meth:`aclose`."""

    def __init__(
        self,
        address_of: Callable[[str], str],
        ssl_context: ssl.SSLContext,
        fencer: Fencer | None,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        self._address_of = address_of
        self._ssl = ssl_context
        self._fencer = fencer
        self._timeout_s = timeout_s
        self._clients: dict[tuple[str, str], HttpAgentClient] = {}

    def agent(self, host: str) -> AgentClient:
        try:
            address = self._address_of(host)
        except (LookupError, ValueError) as e:
            raise HypervisorError(f"no agent address is known for host {host!r}: {e}", host=host) from e
        client = self._clients.get((host, address))
        if client is None:
            client = HttpAgentClient(address, self._ssl, timeout_s=self._timeout_s, host=host, fencer=self._fencer)
            self._clients[(host, address)] = client
        return client

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(c.aclose() for c in clients))


# -- fencing ------------------------------------------------------------------------------------


def _names_vm(argv: Sequence[bytes], vm: str) -> bool:
    """True if ``argv`` is a QEMU process of ``vm``: by its ``-name`` (``guest=NAME,...`` as SMIG's
    driver and libvirt write it, or plain ``NAME``) or by its files under ``.../vms/NAME/``."""
    if not argv or not os.path.basename(argv[0]).startswith((b"qemu-system", b"qemu-kvm")):
        return False
    name, files = vm.encode(), f"/vms/{vm}/".encode()
    for i, arg in enumerate(argv):
        if arg == b"-name" and i + 1 < len(argv):
            first = argv[i + 1].split(b",", 1)[0]
            if first in (name, b"guest=" + name):
                return True
        if files in arg:
            return True
    return False


def vm_processes(vm: str, netns: tuple[int, int], proc: Path = Path("/proc")) -> list[int]:
    """PIDs of ``vm``'s QEMU processes whose network namespace is ``netns`` (``(st_dev, st_ino)``)."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not _names_vm(argv, vm):
                continue
            st = os.stat(entry / "ns" / "net")
        except OSError:
            continue  # gone meanwhile, or a zombie
        if (st.st_dev, st.st_ino) == netns:
            pids.append(int(entry.name))
    return pids


def _check_names(host: str, vm: str) -> None:
    for what, name in (("host", host), ("VM", vm)):
        if not valid_vm_name(name):
            raise HypervisorError(f"refusing to fence: {name!r} is not a valid {what} name", host=host, vm=vm)


class _KillingFencer:
    """Stops a VM by SIGKILL to every QEMU process of it on the host, until none is left."""

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        self._timeout_s = timeout_s

    def _finder(self, host: str, vm: str) -> Callable[[], list[int]]:
        raise NotImplementedError

    async def fence(self, host: str, vm: str) -> None:
        _check_names(host, vm)
        find = self._finder(host, vm)
        deadline = time.monotonic() + self._timeout_s
        killed: set[int] = set()
        while pids := await asyncio.to_thread(find):
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"fencing {vm} on {host}: processes {pids} still run {self._timeout_s:g}s after SIGKILL",
                    host=host,
                    vm=vm,
                )
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                except PermissionError as e:
                    raise HypervisorError(f"fencing {vm} on {host}: not allowed to kill {pid}", host=host, vm=vm) from e
                if pid not in killed:
                    killed.add(pid)
                    log.warning("fenced %s on %s: SIGKILL to QEMU %d", vm, host, pid)
            await asyncio.sleep(0.02)


class NetnsFencer(_KillingFencer):
    """The lab's BMC: SIGKILLs every QEMU process of a VM whose network namespace is the host's.

    ``netns_path_of(host)`` is the namespace's file (``/run/netns/NAME``). Idempotent: succeeds
    at once when no such process runs. Raises HypervisorError when the namespace cannot be read
    (nothing then proves the VM stopped) or a process outlives ``timeout_s``.
    """

    def __init__(self, netns_path_of: Callable[[str], str], *, timeout_s: float = 10.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self._netns_path_of = netns_path_of

    def _finder(self, host: str, vm: str) -> Callable[[], list[int]]:
        path = self._netns_path_of(host)
        try:
            st = os.stat(path)
        except OSError as e:
            raise HypervisorError(
                f"cannot fence {vm} on {host}: its network namespace {path} cannot be read "
                f"({e.strerror or e}), so nothing proves the VM stopped",
                host=host,
                vm=vm,
            ) from e
        netns = (st.st_dev, st.st_ino)
        return lambda: vm_processes(vm, netns)


class HomeFencer(_KillingFencer):
    """The lab's BMC where hosts share this machine's network (the loopback lab): SIGKILLs every
    QEMU process run from the VM's directory under the host's home (``home_of(host)``)."""

    def __init__(self, home_of: Callable[[str], str], *, timeout_s: float = 10.0) -> None:
        super().__init__(timeout_s=timeout_s)
        self._home_of = home_of

    def _finder(self, host: str, vm: str) -> Callable[[], list[int]]:
        fragment = f"{self._home_of(host).rstrip('/')}/vms/{vm}/"
        return lambda: hypervisor_pids(cmdline_contains=fragment)


class CommandFencer:
    """Runs an operator's fencing command (an IPMI or Redfish script) with ``{host}`` and ``{vm}``
    replaced in each argument; exit status 0 means the VM's processes are stopped. The command
    must be idempotent (fencing a VM that is already stopped succeeds). Raises HypervisorError
    on a non-zero exit, a missing program, or after ``timeout_s``."""

    def __init__(self, argv: Sequence[str], *, timeout_s: float = 60.0) -> None:
        if not argv:
            raise ConfigError("the fencing command is empty")
        self._argv = tuple(argv)
        self._timeout_s = timeout_s

    async def fence(self, host: str, vm: str) -> None:
        _check_names(host, vm)
        argv = [a.replace("{host}", host).replace("{vm}", vm) for a in self._argv]
        shown = " ".join(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as e:
            raise HypervisorError(f"cannot run the fencing command `{shown}`: {e}", host=host, vm=vm) from e
        try:
            _, err = await asyncio.wait_for(proc.communicate(), self._timeout_s)
        except BaseException as e:  # a timeout, or the caller gave up: never leave the command behind
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            if isinstance(e, TimeoutError):
                raise HypervisorError(
                    f"the fencing command `{shown}` did not finish within {self._timeout_s:g}s", host=host, vm=vm
                ) from None
            raise
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-500:]
            raise HypervisorError(
                f"fencing {vm} on {host} failed: `{shown}` exited with {proc.returncode}: {tail}", host=host, vm=vm
            )
        log.warning("fenced %s on %s with `%s`", vm, host, shown)

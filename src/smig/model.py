"""Plain data shared by every part of SMIG: VMs, their state, live migrations, and AIM reports.

Frozen dataclasses and enums only; no I/O and nothing from the rest of SMIG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_D = TypeVar("_D")


def frozen_from(cls: type[_D], fields: dict[str, Any]) -> _D:
    """An instance of the frozen dataclass ``cls`` whose fields are exactly ``fields`` (every one,
    no other), made without its ``__init__``. A frozen dataclass sets each field through
    ``object.__setattr__``, which makes building one cost as much as checking it: on the RC-TCB's
    path of every report (thousands a second), the few classes built per report are made here.
    Only for classes with no ``__post_init__``, from values already checked."""
    new = object.__new__(cls)
    new.__dict__.update(fields)
    return new


def valid_vm_name(name: str) -> bool:
    """Names are path and socket components, so they are kept short and plain."""
    return bool(_NAME.match(name))


class Accel(StrEnum):
    """How a guest's code runs: under QEMU with hardware virtualisation or the TCG binary
    translator, or as a Xen paravirtualised guest."""

    KVM = "kvm"
    TCG = "tcg"
    XEN_PV = "xen-pv"


class VMState(StrEnum):
    """A VM as its hypervisor reports it."""

    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"  # a destination process waiting for, or receiving, a migration
    MIGRATED = "migrated"  # a source whose guest now runs elsewhere (QEMU's postmigrate)
    STOPPED = "stopped"  # no hypervisor process
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class VMSpec:
    """What a VM is: everything a host needs to run it, or to receive it by migration."""

    name: str
    memory_mib: int
    vcpus: int = 1
    dirty_mbps: int = 0
    working_set_mib: int = 64
    heartbeat_ms: int = 100
    cpu_model: str = "qemu64"


@dataclass(frozen=True)
class VMInfo:
    """A VM on a host: its spec and the hypervisor process that runs it now."""

    spec: VMSpec
    pid: int
    accel: Accel
    state: VMState
    instance: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Heartbeat:
    """The last heartbeat line a guest wrote: who it is (boot id) and how far it has counted."""

    boot_id: str
    counter: int
    guest_uptime_ms: int


@dataclass(frozen=True)
class VMStatus:
    """A VM's info plus what the guest itself last said."""

    info: VMInfo
    heartbeat: Heartbeat | None


class Transport(StrEnum):
    """How migration bytes travel from source to destination."""

    TCP = "tcp"
    UNIX = "unix"


@dataclass(frozen=True)
class TLSConfig:
    """x509 credentials for migration: a directory in QEMU's layout and the name to verify.

    The directory holds ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (used when
    receiving) and ``client-cert.pem``/``client-key.pem`` (used when sending).
    ``hostname`` is the name the sender expects in the receiver's certificate.
    """

    directory: str
    hostname: str


@dataclass(frozen=True)
class MigrationParams:
    """How a live migration is run.

    ``bandwidth_mibps``: ``None`` lets the driver choose, ``0`` means no cap. QEMU 7.2's own
    cap (128 MiB/s) doubles the time of a small guest and lets a fast-dirtying guest never
    converge, so under KVM the QEMU driver sends uncapped; under TCG it keeps 128 MiB/s, because
    uncapped TCG migrations of a memory-writing guest crashed it after 1 to 4 moves in 20
    (``bench/migration_safety.py``). With ``tls`` each
    side uses its own host's credentials (:class:`TLSConfig`), and the source checks the
    destination's certificate against the name the destination announces.
    """

    transport: Transport = Transport.TCP
    bandwidth_mibps: float | None = None
    downtime_limit_ms: int = 300
    tls: bool = False
    auto_converge: bool = False
    timeout_s: float | None = None
    poll_interval_s: float = 0.02


@dataclass(frozen=True)
class IncomingVM:
    """A destination process waiting for a VM's migration."""

    spec: VMSpec
    uri: str
    pid: int
    instance: str
    accel: Accel
    tls_hostname: str | None = None


class MigrationStatus(StrEnum):
    """QEMU's migration states that SMIG acts on; others map to ACTIVE."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"
    COMPLETED = "completed"


@dataclass(frozen=True)
class MigrationProgress:
    """A snapshot of a running migration, as the source reports it."""

    status: MigrationStatus
    elapsed_ms: int
    transferred_bytes: int
    remaining_bytes: int
    total_bytes: int
    dirty_pages_rate: int
    page_size: int
    expected_downtime_ms: int | None
    iterations: int
    throughput_mbps: float
    error: str | None = None

    @property
    def dirty_rate_bytes(self) -> int:
        return self.dirty_pages_rate * self.page_size


@dataclass(frozen=True)
class MigrationStats:
    """The outcome of a completed live migration."""

    vm: str
    total_ms: int
    downtime_ms: int
    setup_ms: int
    transferred_bytes: int
    iterations: int
    throughput_mbps: float
    source_pid: int
    target_pid: int
    transport: Transport
    tls: bool
    uri: str


class HashAlgorithm(StrEnum):
    """Digest used by AIM; BLAKE3 by default for speed, SHA-256 where policy demands it."""

    BLAKE3 = "blake3"
    SHA256 = "sha256"


class Verdict(StrEnum):
    """A monitor's judgement of its subject: every target equals its reference, or not."""

    MATCH = "match"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Mismatch:
    """One measured thing that differs from its reference.

    ``path`` is the module's file, ``"[anon]"`` for anonymous executable memory, or a kernel
    page such as ``"[vdso]"``; ``offset`` and ``length`` are the changed range within that file
    (file offsets), so an operator can find the patched code. ``pid`` is 0 for files on disk.
    """

    path: str
    offset: int
    length: int
    reason: str
    pid: int = 0


@dataclass(frozen=True)
class TargetDigest:
    """The digest of one measured target (``pid:path@offset+length`` or ``file:path``)."""

    target: str
    digest: str


@dataclass(frozen=True)
class Report:
    """What a monitor says about its subject after one measurement; signed before it is sent.

    ``sequence`` strictly increases per (monitor, subject); times are Unix seconds.
    """

    subject: str
    monitor: str
    sequence: int
    started_at: float
    ended_at: float
    algorithm: HashAlgorithm
    root: str
    verdict: Verdict
    targets: tuple[TargetDigest, ...]
    mismatches: tuple[Mismatch, ...]
    measured_bytes: int


# -- the region: IVT rows, trust, placement ----------------------------------------------------


class TrustState(StrEnum):
    """A hypervisor host's trust, as its IVT row holds it (see docs/design: trust states).

    ``ENROLLING → TRUSTED ⇄ SUSPECT → UNTRUSTED``; any state → ``UNKNOWN`` when no fresh verified
    report arrives in time; ``MAINTENANCE`` is set by an operator. Only TRUSTED and fresh hosts
    are migration targets; leaving UNTRUSTED takes an operator's re-enrolment.
    """

    ENROLLING = "enrolling"
    TRUSTED = "trusted"
    SUSPECT = "suspect"
    UNTRUSTED = "untrusted"
    UNKNOWN = "unknown"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True)
class Resources:
    """vCPUs and RAM: a host's capacity, its load, or what a VM needs."""

    vcpus: int
    memory_mib: int

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.vcpus + other.vcpus, self.memory_mib + other.memory_mib)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.vcpus - other.vcpus, self.memory_mib - other.memory_mib)

    def fits_in(self, other: Resources) -> bool:
        return self.vcpus <= other.vcpus and self.memory_mib <= other.memory_mib


@dataclass(frozen=True)
class VerifiedMeasurement:
    """The last report the RC-TCB accepted about a host: when, by whom, and what it said."""

    at: float  # the report's ended_at, Unix seconds
    monitor: str
    sequence: int
    root: str
    verdict: Verdict


@dataclass(frozen=True)
class PlacedVM:
    """A VM as the region sees it: where it runs and what placing it elsewhere must respect.

    ``priority``: higher moves first and is placed first when capacity runs short.
    ``anti_affinity``: VMs sharing a group name must not share a host ("" for none).
    ``spec``: the VM's :class:`VMSpec` as JSON, as its host's agent reported it while the host was
    trusted: what a target needs to prepare for it ("" when unknown).
    """

    name: str
    host: str
    needs: Resources
    priority: int = 0
    anti_affinity: str = ""
    spec: str = ""


@dataclass(frozen=True)
class HostRecord:
    """One row of the Integrity Validation Table.

    ``agent_key`` is the PEM of the host agent's Ed25519 public key (it signs the host's reports
    on its subjects); ``manifest`` is the digest of the reference manifest the operator approved
    for it. ``suspected_by`` holds the monitors whose mismatch reports are pending confirmation
    (quorum policy); ``strikes`` counts this host's accusations that others contradicted.
    """

    host: str
    region: str
    address: str
    agent_key: str
    manifest: str
    state: TrustState
    state_since: float
    capacity: Resources
    load: Resources = Resources(0, 0)
    verified: VerifiedMeasurement | None = None
    suspected_by: tuple[str, ...] = ()
    strikes: int = 0
    enrolled_at: float = 0.0

    @property
    def verified_at(self) -> float | None:
        return self.verified.at if self.verified is not None else None

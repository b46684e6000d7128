"""The one exception tree of SMIG.

Every error SMIG raises on purpose derives from :class:`SmigError`; backends translate the
errors of the libraries they use at their boundary (``raise X(...) from e``)::

    SmigError
    ├── ConfigError               bad or missing configuration, bad command-line input
    │   └── CertificateRejected   a client certificate proves no identity in this region
    ├── ImageError                the guest image cannot be built or is missing
    ├── HypervisorError           a driver could not do what was asked
    │   ├── VMNotFound            no VM of that name on this host
    │   ├── VMExists              a VM of that name already exists
    │   ├── VMStateError          the VM is not in a state that allows the operation
    │   ├── LaunchError           the hypervisor process did not start or the guest did not boot
    │   └── QMPError              the QMP conversation with QEMU failed
    └── MigrationError            a live migration did not complete (the VM stays on its source)
        ├── PortInUse             the destination cannot listen on the requested address
        ├── DestinationUnreachable  the source cannot reach the destination
        ├── TLSError              TLS credentials are missing or the handshake was refused
        ├── MigrationCancelled    cancelled on request
        └── MigrationTimeout      did not complete within its time limit
    AIMError                      integrity measurement could not be done
    ├── ProcessGone               a measured process exited (not a mismatch: it is measured no more)
    ├── ManifestError             a reference manifest is missing, malformed or wrongly signed
    ├── ReportRejected            a monitor report is forged, replayed, out of order or stale
    └── AttackError               a lab attack could not be applied or undone
    IVTError                      the Integrity Validation Table or its audit log failed
    ├── StoreError                the store cannot be opened, read or written
    ├── HostNotFound              no IVT row for that host
    ├── HostExists                a host of that id is already enrolled
    └── AuditChainBroken          the audit log's hash chain does not verify (``seq``: first bad)
    BenchError                    a benchmark could not measure what it set out to

Each error carries structured fields (``vm``, ``host``) next to a message a person can act on.
"""

from __future__ import annotations


class SmigError(Exception):
    """Root of every error SMIG raises on purpose."""

    def __init__(self, message: str, *, vm: str | None = None, host: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.vm = vm
        self.host = host

    def __str__(self) -> str:
        return self.message


class ConfigError(SmigError):
    """Configuration or command-line input that cannot be used."""


class ImageError(SmigError):
    """The guest image cannot be built, or is not built yet."""


class HypervisorError(SmigError):
    """A hypervisor driver could not do what was asked."""


class VMNotFound(HypervisorError):
    """No VM of that name exists on this host."""


class VMExists(HypervisorError):
    """A VM of that name already exists on this host."""


class VMStateError(HypervisorError):
    """The VM is not in a state that allows the operation."""


class LaunchError(HypervisorError):
    """The hypervisor process did not start, or the guest did not boot in time."""


class QMPError(HypervisorError):
    """The QMP conversation with a QEMU process failed."""


class MigrationError(SmigError):
    """A live migration did not complete; the VM keeps running on its source."""


class PortInUse(MigrationError):
    """The destination cannot listen on the requested address: something else holds it."""


class DestinationUnreachable(MigrationError):
    """The source cannot reach the destination's migration address."""


class TLSError(MigrationError):
    """TLS credentials are missing, or the peer refused them during the handshake."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request."""


class MigrationTimeout(MigrationError):
    """The migration did not complete within its time limit and was cancelled."""


class MigrationCommitted(MigrationError):
    """Too late to cancel: the hypervisor is handing the VM over, and the migration runs to its end."""


class AIMError(SmigError):
    """Integrity measurement could not be done."""


class ProcessGone(AIMError):
    """A process exited while it was being measured; it is not a mismatch."""

    def __init__(self, pid: int, message: str | None = None) -> None:
        super().__init__(message or f"process {pid} exited while it was measured")
        self.pid = pid


class ManifestError(AIMError):
    """A reference manifest is missing, malformed, or its signature does not verify."""


class ReportRejected(AIMError):
    """A monitor report that must change no state: ``reason`` says why (forged, replayed, ...)."""

    def __init__(self, reason: str, message: str, *, host: str | None = None) -> None:
        super().__init__(message, host=host)
        self.reason = reason


class AttackError(AIMError):
    """A lab attack could not be applied, or could not be undone."""


class IVTError(SmigError):
    """The Integrity Validation Table or its audit log could not do what was asked."""


class StoreError(IVTError):
    """The IVT store cannot be opened, read or written (a file, a schema, a lock)."""


class HostNotFound(IVTError):
    """No IVT row for that host."""


class HostExists(IVTError):
    """A host of that id is already enrolled (re-enrol it instead)."""


class AuditChainBroken(IVTError):
    """The audit log's hash chain does not verify: ``seq`` is the first entry that is wrong."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(message)
        self.seq = seq


class CertificateRejected(ConfigError):
    """A client certificate that proves no identity in this region; ``reason`` is one of
    ``bad-certificate``, ``foreign-certificate``, ``expired-certificate``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BenchError(SmigError):
    """A benchmark could not measure what it set out to (a guest that reported nothing, say)."""

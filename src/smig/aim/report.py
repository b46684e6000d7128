"""AIM's signed monitor reports: the canonical encoding, Ed25519 signatures, and the verifier.

A monitor encodes its :class:`~smig.model.Report` into canonical bytes (:func:`encode_report`),
signs them (:func:`sign_report`) and sends the :class:`SignedReport` on the wire
(:meth:`SignedReport.to_wire`). The RC-TCB checks it with :func:`verify_report` before the report
may change any state: a report counts only from a monitor the RC-TCB assigned to the subject,
signed by that monitor's key, with a sequence number above the last one accepted and timestamps
within the freshness window (DESIGN.md, "Trust model").

The canonical encoding is JSON with sorted keys and no whitespace, floats written as Python's
``repr``, enums as their values and tuples as lists. :func:`decode_report` is its exact inverse: it
accepts only bytes that :func:`encode_report` would produce, so one report has one encoding.

The signature covers a fixed context string followed by the payload, so a monitor's key cannot
be tricked into vouching for a report by signing something else that happens to look like one.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smig.errors import ReportRejected
from smig.model import HashAlgorithm, Mismatch, Report, TargetDigest, Verdict, frozen_from

log = logging.getLogger(__name__)

# Domain separation: what a monitor's key signs is this prefix followed by the payload.
SIGNING_CONTEXT = b"smig-aim-report-v1\x00"

_HEX_DIGITS = "0123456789abcdef"


def _is_hex(text: str) -> bool:
    """Lowercase hex of whole bytes. (Stripping the digits leaves nothing only if there is
    nothing else: cheaper than a regex over hundreds of digests, and no `$` that lets a trailing
    newline through.)"""
    return len(text) % 2 == 0 and bool(text) and not text.strip(_HEX_DIGITS)


_REPORT_KEYS = frozenset(
    {
        "subject",
        "monitor",
        "sequence",
        "started_at",
        "ended_at",
        "algorithm",
        "root",
        "verdict",
        "targets",
        "mismatches",
        "measured_bytes",
    }
)
_TARGET_KEYS = frozenset({"target", "digest"})
# By value, for parsing: an Enum's own lookup by value costs as much as the rest of a field's checks.
_ALGORITHMS = {a.value: a for a in HashAlgorithm}
_VERDICTS = {v.value: v for v in Verdict}
_MISMATCH_KEYS = frozenset({"path", "offset", "length", "reason", "pid"})
_WIRE_KEYS = frozenset({"key_id", "payload", "signature"})


# --- the canonical encoding -------------------------------------------------------------------


def _dumps(obj: object) -> bytes:
    # json writes floats with float.__repr__, the shortest string that reads back to the same value.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _time(value: float) -> object:
    # An int where a float belongs (``started_at=100``) is the same time; write it as one, "100.0".
    return float(value) if type(value) is int else value


def _to_obj(report: Report) -> dict[str, object]:
    return {
        "subject": report.subject,
        "monitor": report.monitor,
        "sequence": report.sequence,
        "started_at": _time(report.started_at),
        "ended_at": _time(report.ended_at),
        "algorithm": str(report.algorithm),
        "root": report.root,
        "verdict": str(report.verdict),
        "targets": [{"target": t.target, "digest": t.digest} for t in report.targets],
        "mismatches": [
            {"path": m.path, "offset": m.offset, "length": m.length, "reason": m.reason, "pid": m.pid}
            for m in report.mismatches
        ],
        "measured_bytes": report.measured_bytes,
    }


def _malformed(why: str, host: str | None = None) -> ReportRejected:
    return ReportRejected("malformed", f"malformed report: {why}", host=host)


def _object(value: object, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{what} must be a JSON object, not {type(value).__name__}")
    missing, extra = keys - value.keys(), value.keys() - keys
    if missing or extra:
        parts = [f"missing {sorted(missing)}"] if missing else []
        parts += [f"unexpected {sorted(extra)}"] if extra else []
        raise _malformed(f"{what} has {' and '.join(parts)}")
    return value


def _str(value: object, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a string, not {type(value).__name__}")
    if not empty and not value:
        raise _malformed(f"{what} must not be empty")
    return value


def _count(value: object, what: str) -> int:
    if type(value) is not int:  # bool is an int to Python, but not a count
        raise _malformed(f"{what} must be an integer, not {type(value).__name__}")
    if value < 0:
        raise _malformed(f"{what} must not be negative, got {value}")
    return value


def _seconds(value: object, what: str) -> float:
    if type(value) is not float:
        raise _malformed(f"{what} must be a number of Unix seconds written as a float, not {value!r}")
    if not math.isfinite(value):
        raise _malformed(f"{what} must be finite, got {value!r}")
    return value


def _hex(value: object, what: str) -> str:
    text = _str(value, what)
    if not _is_hex(text):
        raise _malformed(f"{what} must be lowercase hex of whole bytes, got {text[:80]!r}")
    return text


def _from_obj(obj: object) -> Report:
    fields = _object(obj, _REPORT_KEYS, "the report")
    algorithm = _ALGORITHMS.get(fields["algorithm"]) if isinstance(fields["algorithm"], str) else None
    if algorithm is None:
        raise _malformed(f"unknown hash algorithm {fields['algorithm']!r}")
    verdict = _VERDICTS.get(fields["verdict"]) if isinstance(fields["verdict"], str) else None
    if verdict is None:
        raise _malformed(f"unknown verdict {fields['verdict']!r}")
    targets_in, mismatches_in = fields["targets"], fields["mismatches"]
    if not isinstance(targets_in, list) or not isinstance(mismatches_in, list):
        raise _malformed("targets and mismatches must be JSON arrays")
    targets = []
    for i, raw in enumerate(targets_in):
        # A report holds hundreds of targets: the well-formed ones take this short path, and the
        # checks below (the same rules) run only to name what is wrong with one that is not.
        if type(raw) is dict and raw.keys() == _TARGET_KEYS:
            name, digest = raw["target"], raw["digest"]
            if type(name) is str and name and type(digest) is str and _is_hex(digest):
                targets.append(TargetDigest(name, digest))
                continue
        t = _object(raw, _TARGET_KEYS, f"targets[{i}]")
        targets.append(
            TargetDigest(_str(t["target"], f"targets[{i}].target"), _hex(t["digest"], f"targets[{i}].digest"))
        )
    mismatches = []
    for i, raw in enumerate(mismatches_in):
        m = _object(raw, _MISMATCH_KEYS, f"mismatches[{i}]")
        mismatches.append(
            Mismatch(
                path=_str(m["path"], f"mismatches[{i}].path"),
                offset=_count(m["offset"], f"mismatches[{i}].offset"),
                length=_count(m["length"], f"mismatches[{i}].length"),
                reason=_str(m["reason"], f"mismatches[{i}].reason", empty=True),
                pid=_count(m["pid"], f"mismatches[{i}].pid"),
            )
        )
    report: Report = frozen_from(
        Report,
        {
            "subject": _str(fields["subject"], "subject"),
            "monitor": _str(fields["monitor"], "monitor"),
            "sequence": _count(fields["sequence"], "sequence"),
            "started_at": _seconds(fields["started_at"], "started_at"),
            "ended_at": _seconds(fields["ended_at"], "ended_at"),
            "algorithm": algorithm,
            "root": _hex(fields["root"], "root"),
            "verdict": verdict,
            "targets": tuple(targets),
            "mismatches": tuple(mismatches),
            "measured_bytes": _count(fields["measured_bytes"], "measured_bytes"),
        },
    )
    if report.ended_at < report.started_at:
        raise _malformed(f"ended_at {report.ended_at!r} is before started_at {report.started_at!r}")
    if report.verdict is Verdict.MATCH and report.mismatches:
        raise _malformed(f"verdict is match but the report lists {len(report.mismatches)} mismatches")
    if report.verdict is Verdict.MISMATCH and not report.mismatches:
        raise _malformed("verdict is mismatch but the report lists no mismatches")
    return report


def encode_report(report: Report) -> bytes:
    """The canonical bytes of ``report``: what a monitor signs.

    Raises :class:`ReportRejected` (``"malformed"``) for a report that :func:`decode_report` would
    refuse (a negative sequence, a non-hex digest, a verdict that contradicts its mismatches, ...),
    so a monitor never signs a report the RC-TCB cannot read.
    """
    obj = _to_obj(report)
    _from_obj(obj)
    try:
        return _dumps(obj)
    except (TypeError, ValueError) as e:
        raise _malformed(f"cannot encode: {e}") from e


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a report may carry")


def decode_report(data: bytes) -> Report:
    """The report that ``data`` encodes: the exact inverse of :func:`encode_report`.

    Decoding checks form only, not authenticity: use :func:`verify_report` on what arrives from a
    monitor. Raises :class:`ReportRejected` (``"malformed"``) for anything that is not a well-formed
    report in canonical form: not JSON, wrong types, missing or extra keys, a negative count,
    non-hex digests, ``ended_at`` before ``started_at``, or a verdict that contradicts the
    mismatches (``match`` must list none, ``mismatch`` at least one).
    """
    if not isinstance(data, bytes):
        raise _malformed(f"payload must be bytes, not {type(data).__name__}")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _malformed(f"not JSON: {e}") from None
    report = _from_obj(obj)
    if _dumps(_to_obj(report)) != data:
        raise _malformed("not in canonical form (sorted keys, no whitespace, floats as repr)")
    return report


# --- signatures and the wire --------------------------------------------------------------------


@dataclass(frozen=True)
class SignedReport:
    """A report's canonical bytes, their Ed25519 signature, and the id of the monitor that signed.

    Nothing in ``payload`` is to be believed before :func:`verify_report` has accepted it.
    """

    payload: bytes
    signature: bytes
    key_id: str
    batch: bool = False  # a batch of the monitor's reports under one signature (smig.aim.report_batch)

    def to_wire(self) -> bytes:
        """A JSON object ``{"key_id", "payload", "signature"}``, the bytes in standard base64
        (and ``"batch": true`` for a batch)."""
        obj: dict[str, object] = {
            "key_id": self.key_id,
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        if self.batch:
            obj["batch"] = True
        return _dumps(obj)

    @classmethod
    def from_wire(cls, data: bytes | str) -> SignedReport:
        """Read what :meth:`to_wire` wrote. Raises :class:`ReportRejected` (``"malformed"``) on junk."""
        try:
            obj = json.loads(data, parse_constant=_reject_constant)
        except (TypeError, ValueError, RecursionError) as e:
            raise _malformed(f"signed report is not JSON: {e}") from None
        batch = isinstance(obj, dict) and obj.get("batch") is True
        if batch:
            obj = {k: v for k, v in obj.items() if k != "batch"}
        fields = _object(obj, _WIRE_KEYS, "the signed report")
        key_id = _str(fields["key_id"], "key_id")
        decoded: list[bytes] = []
        for name in ("payload", "signature"):
            text = _str(fields[name], name)
            try:
                decoded.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise _malformed(f"{name} is not valid base64", host=key_id) from None
        return cls(payload=decoded[0], signature=decoded[1], key_id=key_id, batch=batch)


def sign_report(report: Report, private_key: Ed25519PrivateKey) -> SignedReport:
    """``report`` in canonical form, signed with the monitor's key under the monitor's id.

    Raises :class:`ReportRejected` (``"malformed"``) if the report is not well formed.
    """
    payload = encode_report(report)
    return SignedReport(payload=payload, signature=private_key.sign(SIGNING_CONTEXT + payload), key_id=report.monitor)


def verify_report(
    signed: SignedReport,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    assigned: Mapping[str, Collection[str]],
    last_sequence: Mapping[tuple[str, str], int],
    now: float,
    max_age_s: float,
    max_skew_s: float,
) -> Report:
    """The report in ``signed`` if it may count; :class:`ReportRejected` otherwise.

    ``keys`` maps a monitor's id to its public key; ``assigned`` maps a subject to the monitors the
    RC-TCB assigned to it; ``last_sequence`` maps ``(monitor, subject)`` to the sequence number of
    the last report accepted from that monitor on that subject (absent: none yet, any sequence is
    accepted). ``now`` is Unix seconds.

    The checks run in this order, and the first that fails names the ``reason``:

    - ``"malformed"``: the payload is not a well-formed report in canonical form;
    - ``"unknown-monitor"``: no key for ``signed.key_id``, or the payload names another monitor;
    - ``"forged"``: the signature does not verify under that key;
    - ``"not-assigned"``: the monitor is not assigned to the subject (or is the subject itself);
    - ``"replayed"``: the sequence equals the last one accepted;
    - ``"out-of-order"``: the sequence is below the last one accepted;
    - ``"stale"``: the measurement ended more than ``max_age_s`` before ``now``;
    - ``"from-the-future"``: it started or ended more than ``max_skew_s`` after ``now``.

    No payload field other than the monitor's id (to pick the key) is trusted before the signature
    verifies. The verifier is pure: it has no state and no clock, and it changes none of the
    mappings passed in. The caller passes ``now`` and the last accepted sequences, and records the
    accepted report's sequence itself, so that the next copy of it is refused as a replay.

    ``ReportRejected.host`` is the monitor that sent the report (as it claims, when the report is
    refused before its signature is checked).
    """
    key_id = signed.key_id
    if signed.batch:
        raise ReportRejected(
            "malformed", "this is a batch of reports: check it with smig.aim.report_batch", host=key_id
        )
    try:
        report = decode_report(signed.payload)
    except ReportRejected as e:
        raise ReportRejected(e.reason, f"{e.message} (signed as monitor {key_id!r})", host=key_id) from None

    key = enrolled_key(keys, key_id, f"report on {report.subject!r}")
    if report.monitor != key_id:
        raise ReportRejected(
            "unknown-monitor",
            f"report on {report.subject!r} claims monitor {report.monitor!r} but is signed under key id {key_id!r}; "
            f"a monitor may only sign its own reports, so check the agent on {key_id!r}",
            host=key_id,
        )
    check_signature(key, signed, SIGNING_CONTEXT, "report")

    return admit_report(
        report, assigned=assigned, last_sequence=last_sequence, now=now, max_age_s=max_age_s, max_skew_s=max_skew_s
    )


def enrolled_key(keys: Mapping[str, Ed25519PublicKey], key_id: str, what: str) -> Ed25519PublicKey:
    """The public key of monitor ``key_id``; ReportRejected ("unknown-monitor") if none is enrolled.
    ``what`` names the signed thing in the message ("report on 'h1'", "batch")."""
    key = keys.get(key_id)
    if key is None:
        raise ReportRejected(
            "unknown-monitor",
            f"{what} is signed as monitor {key_id!r}, which has no enrolled public key; "
            f"enrol the public key of {key_id!r} with the RC-TCB if it is a monitor of this region",
            host=key_id,
        )
    return key


def check_signature(key: Ed25519PublicKey, signed: SignedReport, context: bytes, what: str) -> None:
    """ReportRejected ("forged") unless ``signed`` verifies under ``key`` with the domain prefix ``context``."""
    key_id = signed.key_id
    try:
        key.verify(signed.signature, context + signed.payload)
    except InvalidSignature:
        raise ReportRejected(
            "forged",
            f"{what} signed as monitor {key_id!r} does not verify under the key enrolled for {key_id!r}: it was "
            f"altered or signed by another key; if {key_id!r} changed its key, re-enrol it, else treat it as suspect",
            host=key_id,
        ) from None


def admit_report(
    report: Report,
    *,
    assigned: Mapping[str, Collection[str]],
    last_sequence: Mapping[tuple[str, str], int],
    now: float,
    max_age_s: float,
    max_skew_s: float,
) -> Report:
    """The checks of :func:`verify_report` that follow the signature, for a report whose
    authenticity is already established (alone, or as part of a signed batch): assignment,
    replay, order and freshness. Returns ``report``; raises :class:`ReportRejected`."""
    monitor, subject = report.monitor, report.subject
    if monitor == subject or monitor not in assigned.get(subject, ()):
        why = "a host never measures itself" if monitor == subject else "the RC-TCB did not assign it"
        raise ReportRejected(
            "not-assigned",
            f"monitor {monitor!r} sent a report on {subject!r} but is not one of the monitors of {subject!r} ({why}); "
            f"its report does not count (assigned: {sorted(assigned.get(subject, ()))})",
            host=monitor,
        )

    last = last_sequence.get((monitor, subject))
    if last is not None and report.sequence == last:
        raise ReportRejected(
            "replayed",
            f"report {report.sequence} from monitor {monitor!r} on {subject!r} was already accepted: this is a replay; "
            f"the monitor's next report must carry a sequence above {last}",
            host=monitor,
        )
    if last is not None and report.sequence < last:
        raise ReportRejected(
            "out-of-order",
            f"report {report.sequence} from monitor {monitor!r} on {subject!r} is older than report {last}, "
            f"already accepted; a monitor's sequence must only increase (did {monitor!r} lose its state?)",
            host=monitor,
        )

    age = now - report.ended_at
    if age > max_age_s:
        raise ReportRejected(
            "stale",
            f"report {report.sequence} from monitor {monitor!r} on {subject!r} ended {age:.3f}s ago "
            f"(ended_at {report.ended_at!r}, now {now!r}), older than the {max_age_s}s allowed; "
            f"check the network delay and the clock on {monitor!r}",
            host=monitor,
        )
    for field, at in (("started_at", report.started_at), ("ended_at", report.ended_at)):
        if at > now + max_skew_s:
            raise ReportRejected(
                "from-the-future",
                f"report {report.sequence} from monitor {monitor!r} on {subject!r} has {field} {at!r}, "
                f"{at - now:.3f}s after now ({now!r}), beyond the {max_skew_s}s skew allowed; "
                f"check the clock (NTP) on {monitor!r}",
                host=monitor,
            )
    return report

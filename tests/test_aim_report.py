"""AIM's signed reports: a monitor signs what it measured, and the RC-TCB counts only what it should."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import stat
from collections.abc import Collection
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smig.aim.keys import generate_key, load_private_key, load_public_key_pem, public_key_pem, save_private_key
from smig.aim.report import SignedReport, decode_report, encode_report, sign_report, verify_report
from smig.errors import ConfigError, ReportRejected
from smig.model import HashAlgorithm, Mismatch, Report, TargetDigest, Verdict

NOW = 1_750_000_000.25
DIGEST = "ab" * 32


def make_report(**changes: Any) -> Report:
    """host-b's report on host-a: one library patched in the running QEMU."""
    report = Report(
        subject="host-a",
        monitor="host-b",
        sequence=7,
        started_at=NOW - 2.5,
        ended_at=NOW - 1.125,
        algorithm=HashAlgorithm.BLAKE3,
        root="cd" * 32,
        verdict=Verdict.MISMATCH,
        targets=(
            TargetDigest("pid:4242:/usr/bin/qemu-system-x86_64@0+1048576", DIGEST),
            TargetDigest("file:/usr/share/qemu/bios-256k.bin", "ef" * 32),
        ),
        mismatches=(Mismatch("/usr/lib/libc.so.6", offset=4096, length=16, reason="code differs", pid=4242),),
        measured_bytes=1_310_720,
    )
    return dataclasses.replace(report, **changes)


@pytest.fixture(scope="module")
def monitor_key() -> Ed25519PrivateKey:
    return generate_key()


class Region:
    """What the RC-TCB knows when a report arrives: keys, assignments, last sequences, the time."""

    def __init__(self, monitor_key: Ed25519PrivateKey) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {
            "host-b": monitor_key.public_key(),
            "host-c": generate_key().public_key(),
        }
        self.assigned: dict[str, Collection[str]] = {"host-a": {"host-b", "host-c"}, "host-b": ["host-c"]}
        self.last_sequence: dict[tuple[str, str], int] = {("host-b", "host-a"): 6}

    def verify(self, signed: SignedReport, *, now: float = NOW) -> Report:
        return verify_report(
            signed,
            keys=self.keys,
            assigned=self.assigned,
            last_sequence=self.last_sequence,
            now=now,
            max_age_s=30.0,
            max_skew_s=5.0,
        )

    def reason(self, signed: SignedReport, *, now: float = NOW) -> str:
        with pytest.raises(ReportRejected) as caught:
            self.verify(signed, now=now)
        return caught.value.reason


@pytest.fixture
def region(monitor_key: Ed25519PrivateKey) -> Region:
    return Region(monitor_key)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- encoding ---------------------------------------------------------------------------------


def test_encoding_is_canonical_and_decodes_to_the_same_report() -> None:
    report = make_report()
    data = encode_report(report)
    assert data == encode_report(make_report())
    assert b" " not in data.replace(b"code differs", b"")
    obj = json.loads(data)
    assert list(obj) == sorted(obj) and obj["verdict"] == "mismatch" and obj["algorithm"] == "blake3"
    assert obj["started_at"] == NOW - 2.5 and isinstance(obj["targets"], list)
    assert decode_report(data) == report


def test_a_clean_report_with_whole_second_times_round_trips() -> None:
    report = make_report(verdict=Verdict.MATCH, mismatches=(), targets=(), started_at=100, ended_at=100)
    data = encode_report(report)
    assert b'"started_at":100.0' in data
    assert decode_report(data) == report


@pytest.mark.parametrize(
    "change, why",
    [
        ({"sequence": -1}, "negative"),
        ({"root": "not-hex"}, "hex"),
        ({"root": "ABCD"}, "hex"),
        ({"targets": (TargetDigest("file:/x", "abc"),)}, "hex"),
        ({"ended_at": NOW - 10.0}, "before started_at"),
        ({"verdict": Verdict.MATCH}, "verdict is match"),
        ({"mismatches": ()}, "lists no mismatches"),
        ({"measured_bytes": True}, "integer"),
        ({"started_at": float("nan")}, "finite"),
        ({"subject": ""}, "empty"),
    ],
)
def test_a_report_that_cannot_be_well_formed_is_refused_both_ways(change: dict[str, Any], why: str) -> None:
    bad = make_report(**change)
    with pytest.raises(ReportRejected, match=why) as at_encode:
        encode_report(bad)
    assert at_encode.value.reason == "malformed"


def edit(report_obj: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(report_obj)
    where: Any = obj
    for step in path[:-1]:
        where = where[step]
    if value is DELETE:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return obj


DELETE = object()


@pytest.mark.parametrize(
    "path, value",
    [
        (("sequence",), -3),
        (("sequence",), "7"),
        (("sequence",), 7.0),
        (("started_at",), "yesterday"),
        (("ended_at",), 1),
        (("root",), "zz" * 32),
        (("targets", 0, "digest"), "g" * 64),
        (("targets", 0, "digest"), "ab" * 32 + "\n"),
        (("root",), "ab" * 32 + "\n"),
        (("targets", 0, "digest"), "abc"),
        (("targets", 0, "digest"), 7),
        (("targets", 0, "target"), ""),
        (("targets", 0, "target"), ["x"]),
        (("targets", 0), ["t", "ab"]),
        (("targets", 0, "extra"), 1),
        (("targets", 0, "target"), DELETE),
        (("mismatches", 0, "pid"), DELETE),
        (("mismatches", 0, "offset"), -1),
        (("verdict",), "maybe"),
        (("algorithm",), "md5"),
        (("monitor",), None),
        (("targets",), {}),
        (("extra",), 1),
        (("measured_bytes",), DELETE),
        (("mismatches",), []),
    ],
)
def test_decoding_refuses_payloads_that_are_not_reports(path: tuple[str | int, ...], value: Any) -> None:
    good = json.loads(encode_report(make_report()))
    bad = json.dumps(edit(good, path, value), sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ReportRejected) as caught:
        decode_report(bad)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"[]", b"null", b"{", b"[" * 100_000, b'{"sequence": NaN}'],
)
def test_decoding_refuses_junk(data: bytes) -> None:
    with pytest.raises(ReportRejected) as caught:
        decode_report(data)
    assert caught.value.reason == "malformed"


def test_decoding_refuses_a_second_spelling_of_the_same_report() -> None:
    data = encode_report(make_report())
    spaced = json.dumps(json.loads(data), sort_keys=True).encode()
    assert json.loads(spaced) == json.loads(data)
    with pytest.raises(ReportRejected, match="canonical"):
        decode_report(spaced)


# --- signing and the wire ---------------------------------------------------------------------


def test_a_signed_report_crosses_the_wire_and_is_accepted(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    signed = sign_report(make_report(), monitor_key)
    assert signed.key_id == "host-b" and len(signed.signature) == 64
    received = SignedReport.from_wire(signed.to_wire().decode())
    assert received == signed
    assert region.verify(received) == make_report()


def test_a_fresh_monitor_with_no_history_is_accepted(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    region.last_sequence.clear()
    assert region.verify(sign_report(make_report(sequence=0), monitor_key)).sequence == 0


@pytest.mark.parametrize(
    "wire",
    [
        b"not json",
        b"[]",
        b'{"key_id":"host-b","payload":"AA=="}',
        b'{"key_id":"host-b","payload":"AA==","signature":"AA==","x":1}',
        b'{"key_id":"host-b","payload":"***","signature":"AA=="}',
        b'{"key_id":7,"payload":"AA==","signature":"AA=="}',
        b'{"key_id":"","payload":"AA==","signature":"AA=="}',
        b'{"key_id":"host-b","payload":["AA=="],"signature":"AA=="}',
        b"\xff",
    ],
)
def test_junk_on_the_wire_is_malformed(wire: bytes) -> None:
    with pytest.raises(ReportRejected) as caught:
        SignedReport.from_wire(wire)
    assert caught.value.reason == "malformed"


def test_a_well_signed_payload_that_is_not_a_report_is_malformed(
    region: Region, monitor_key: Ed25519PrivateKey
) -> None:
    signed = SignedReport(b'{"hello":"world"}', monitor_key.sign(b'{"hello":"world"}'), "host-b")
    with pytest.raises(ReportRejected) as caught:
        region.verify(signed)
    assert caught.value.reason == "malformed" and caught.value.host == "host-b"


# --- the verifier -----------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["payload", "signature"])
def test_one_flipped_byte_makes_a_report_forged(region: Region, monitor_key: Ed25519PrivateKey, part: str) -> None:
    signed = sign_report(make_report(), monitor_key)
    # In the payload, change a digit of the sequence (7 -> 6): still a well-formed report.
    at = signed.payload.index(b'"sequence":7') + len(b'"sequence":') if part == "payload" else 10
    if part == "payload":
        tampered = dataclasses.replace(signed, payload=flip(signed.payload, at))
        assert decode_report(tampered.payload).sequence == 6
    else:
        tampered = dataclasses.replace(signed, signature=flip(signed.signature, at))
    assert region.reason(tampered) == "forged"


def test_a_report_signed_by_another_key_claiming_the_monitors_id_is_forged(region: Region) -> None:
    impostor = sign_report(make_report(verdict=Verdict.MATCH, mismatches=()), generate_key())
    with pytest.raises(ReportRejected) as caught:
        region.verify(impostor)
    assert caught.value.reason == "forged" and "host-b" in str(caught.value)


def test_a_signature_over_the_bare_payload_is_forged(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    """The monitor's key signs reports under a fixed context, not arbitrary bytes that parse as one."""
    payload = encode_report(make_report())
    assert region.reason(SignedReport(payload, monitor_key.sign(payload), "host-b")) == "forged"


def test_a_key_id_without_an_enrolled_key_is_an_unknown_monitor(region: Region) -> None:
    rogue = sign_report(make_report(monitor="host-z"), generate_key())
    with pytest.raises(ReportRejected) as caught:
        region.verify(rogue)
    assert caught.value.reason == "unknown-monitor" and "host-z" in str(caught.value)


def test_a_report_naming_another_monitor_than_its_key_is_an_unknown_monitor(
    region: Region, monitor_key: Ed25519PrivateKey
) -> None:
    signed = sign_report(make_report(monitor="host-c"), monitor_key)
    relabelled = dataclasses.replace(signed, key_id="host-b")
    assert region.reason(relabelled) == "unknown-monitor"


def test_a_monitor_not_assigned_to_the_subject_does_not_count(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    on_b = sign_report(make_report(subject="host-d"), monitor_key)
    with pytest.raises(ReportRejected) as caught:
        region.verify(on_b)
    assert caught.value.reason == "not-assigned"
    assert "host-b" in str(caught.value) and "host-d" in str(caught.value)


def test_a_monitor_never_counts_on_itself_even_if_assigned(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    region.assigned["host-b"] = ["host-b", "host-c"]
    assert region.reason(sign_report(make_report(subject="host-b"), monitor_key)) == "not-assigned"


def test_the_same_report_twice_is_a_replay(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    signed = sign_report(make_report(sequence=7), monitor_key)
    accepted = region.verify(signed)
    region.last_sequence[(accepted.monitor, accepted.subject)] = accepted.sequence  # the caller records it
    with pytest.raises(ReportRejected) as caught:
        region.verify(signed)
    assert caught.value.reason == "replayed" and "7" in str(caught.value) and caught.value.host == "host-b"


def test_a_lower_sequence_is_out_of_order(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ReportRejected) as caught:
        region.verify(sign_report(make_report(sequence=5), monitor_key))
    assert caught.value.reason == "out-of-order" and "5" in str(caught.value) and "6" in str(caught.value)


def test_sequences_are_counted_per_monitor_and_subject(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    region.last_sequence[("host-c", "host-a")] = 100
    region.last_sequence[("host-b", "host-x")] = 100
    assert region.verify(sign_report(make_report(sequence=7), monitor_key)).sequence == 7


def test_an_old_report_is_stale(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    signed = sign_report(make_report(), monitor_key)
    assert region.verify(signed, now=NOW - 1.125 + 30.0) == make_report()
    with pytest.raises(ReportRejected) as caught:
        region.verify(signed, now=NOW + 60.0)
    assert caught.value.reason == "stale" and "host-b" in str(caught.value) and "30.0s" in str(caught.value)


def test_a_report_from_the_future_is_refused(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    ahead = sign_report(make_report(started_at=NOW + 4.0, ended_at=NOW + 5.0), monitor_key)
    assert region.verify(ahead).sequence == 7  # within the 5 s skew
    too_far = sign_report(make_report(started_at=NOW + 4.0, ended_at=NOW + 6.0), monitor_key)
    with pytest.raises(ReportRejected) as caught:
        region.verify(too_far)
    assert caught.value.reason == "from-the-future" and "ended_at" in str(caught.value)


def test_checks_run_in_the_documented_order(region: Region) -> None:
    """A rogue key that is unknown, unassigned, replayed and stale is reported as unknown first."""
    rogue = make_report(monitor="host-z", subject="host-q", sequence=1, started_at=1.0, ended_at=2.0)
    region.last_sequence[("host-z", "host-q")] = 1
    stranger_key = generate_key()
    assert region.reason(sign_report(rogue, stranger_key)) == "unknown-monitor"
    region.keys["host-z"] = generate_key().public_key()
    assert region.reason(sign_report(rogue, stranger_key)) == "forged"
    region.keys["host-z"] = stranger_key.public_key()
    assert region.reason(sign_report(rogue, stranger_key)) == "not-assigned"
    region.assigned["host-q"] = ["host-z"]
    assert region.reason(sign_report(rogue, stranger_key)) == "replayed"
    region.last_sequence[("host-z", "host-q")] = 0
    assert region.reason(sign_report(rogue, stranger_key)) == "stale"


def test_verification_never_changes_what_it_is_given(region: Region, monitor_key: Ed25519PrivateKey) -> None:
    before = (dict(region.keys), copy.deepcopy(region.assigned), dict(region.last_sequence))
    signed = sign_report(make_report(), monitor_key)
    for attempt in (signed, dataclasses.replace(signed, signature=bytes(64)), signed):
        with contextlib.suppress(ReportRejected):
            region.verify(attempt)
    assert (region.keys, region.assigned, region.last_sequence) == before
    frozen = verify_report(
        signed,
        keys=MappingProxyType(region.keys),
        assigned=MappingProxyType({"host-a": frozenset({"host-b"})}),
        last_sequence=MappingProxyType(region.last_sequence),
        now=NOW,
        max_age_s=30.0,
        max_skew_s=5.0,
    )
    assert frozen == make_report() and region.last_sequence == {("host-b", "host-a"): 6}


# --- keys -------------------------------------------------------------------------------------


def test_a_saved_key_is_private_to_its_owner_and_loads_back(tmp_path: Path, monitor_key: Ed25519PrivateKey) -> None:
    path = tmp_path / "monitor.key"
    path.write_text("an older key, world-readable")
    os.chmod(path, 0o644)
    save_private_key(monitor_key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor.key"]
    loaded = load_private_key(path)
    assert public_key_pem(loaded) == public_key_pem(monitor_key)
    signed = sign_report(make_report(), loaded)
    assert Region(monitor_key).verify(signed) == make_report()


def test_a_public_key_round_trips_through_pem(monitor_key: Ed25519PrivateKey) -> None:
    pem = public_key_pem(monitor_key)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert public_key_pem(load_public_key_pem(pem)) == pem


def test_missing_or_garbled_key_files_are_config_errors(tmp_path: Path, monitor_key: Ed25519PrivateKey) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "absent.key")
    garbled = tmp_path / "garbled.key"
    garbled.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"garbled\.key"):
        load_private_key(garbled)
    with pytest.raises(ConfigError, match="public key"):
        load_public_key_pem(b"not a key")
    with pytest.raises(ConfigError, match="cannot write"):
        save_private_key(monitor_key, tmp_path / "no-such-dir" / "monitor.key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_private_key(_write(tmp_path / "pub.pem", public_key_pem(monitor_key)))
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_private_key(_write(tmp_path / "ec.key", ec_key))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_loading_a_key_others_can_read_warns_the_operator(
    tmp_path: Path, monitor_key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "monitor.key"
    save_private_key(monitor_key, path)
    os.chmod(path, 0o644)
    assert public_key_pem(load_private_key(path)) == public_key_pem(monitor_key)
    assert "chmod 600" in caplog.text and str(path) in caplog.text

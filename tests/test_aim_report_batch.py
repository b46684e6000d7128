"""A monitor's reports under one signature: the batch verifies once, each report is admitted on
its own, and a batch can never pass for a single report or the other way round."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from smig.aim.keys import generate_key
from smig.aim.report import SignedReport, admit_report, sign_report, verify_report
from smig.aim.report_batch import MAX_BATCH, authenticate_batch, decode_batch, encode_batch, sign_batch
from smig.errors import ReportRejected
from smig.model import HashAlgorithm, Report, Verdict

NOW = 1_800_000_000.0


def _report(subject: str, sequence: int, monitor: str = "m1", **changes: Any) -> Report:
    r = Report(
        subject, monitor, sequence, NOW - 2.0, NOW - 1.0, HashAlgorithm.BLAKE3, "ab" * 32, Verdict.MATCH, (), (), 1
    )
    return dataclasses.replace(r, **changes)


def test_a_batch_round_trips_and_verifies_once() -> None:
    key = generate_key()
    reports = [_report("s1", 1), _report("s2", 1), _report("s1", 2)]
    signed = SignedReport.from_wire(sign_batch(reports, key).to_wire())
    assert signed.batch and signed.key_id == "m1"
    assert authenticate_batch(signed, {"m1": key.public_key()}) == tuple(reports)
    assert decode_batch(encode_batch(reports)) == tuple(reports)


def test_a_forged_or_foreign_batch_is_refused_whole() -> None:
    key, other = generate_key(), generate_key()
    signed = sign_batch([_report("s1", 1)], key)
    with pytest.raises(ReportRejected) as e:
        authenticate_batch(signed, {"m1": other.public_key()})
    assert e.value.reason == "forged"
    with pytest.raises(ReportRejected) as e:
        authenticate_batch(signed, {})
    assert e.value.reason == "unknown-monitor"
    tampered = dataclasses.replace(signed, payload=signed.payload.replace(b'"s1"', b'"s9"'))
    with pytest.raises(ReportRejected) as e:
        authenticate_batch(tampered, {"m1": key.public_key()})
    assert e.value.reason == "forged"


def test_one_signature_covers_one_monitor_and_batches_are_bounded() -> None:
    with pytest.raises(ReportRejected, match="one monitor"):
        encode_batch([_report("s1", 1), _report("s2", 1, monitor="m2")])
    with pytest.raises(ReportRejected, match="1 to"):
        encode_batch([])
    with pytest.raises(ReportRejected, match="1 to"):
        encode_batch([_report("s1", i) for i in range(MAX_BATCH + 1)])


def test_a_batch_signature_never_passes_for_a_single_report_nor_the_reverse() -> None:
    key = generate_key()
    keys = {"m1": key.public_key()}
    single = sign_report(_report("s1", 1), key)
    as_batch = dataclasses.replace(single, batch=True)
    with pytest.raises(ReportRejected):
        authenticate_batch(as_batch, keys)
    batch = sign_batch([_report("s1", 1)], key)
    with pytest.raises(ReportRejected):
        verify_report(
            dataclasses.replace(batch, batch=False),
            keys=keys,
            assigned={"s1": ("m1",)},
            last_sequence={},
            now=NOW,
            max_age_s=30,
            max_skew_s=5,
        )


def test_each_report_of_a_batch_is_admitted_on_its_own() -> None:
    limits = {"assigned": {"s1": ("m1",), "s2": ("m1",)}, "now": NOW, "max_age_s": 30.0, "max_skew_s": 5.0}
    admit_report(_report("s1", 3), last_sequence={("m1", "s1"): 2}, **limits)  # type: ignore[arg-type]
    for report, reason in [
        (_report("s1", 2), "replayed"),
        (_report("s3", 1), "not-assigned"),
        (_report("s2", 1, started_at=NOW - 100.0, ended_at=NOW - 99.0), "stale"),
    ]:
        with pytest.raises(ReportRejected) as e:
            admit_report(report, last_sequence={("m1", "s1"): 2}, **limits)  # type: ignore[arg-type]
        assert e.value.reason == reason

"""AIM on real QEMU processes: a healthy hypervisor matches its file-built reference, and every
attack is detected and named by module and offset range."""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smig.aim import procfs, reference
from smig.aim.keys import load_private_key
from smig.aim.measure import Measurement, Measurer
from smig.aim.reference import Manifest
from smig.aim.report import SignedReport, verify_report
from smig.errors import ManifestError, ProcessGone
from smig.lab import attacks, ptrace
from smig.lab.bare import bare_qemu
from smig.model import HashAlgorithm, Verdict

pytestmark = pytest.mark.qemu
_SMIG = str(Path(sys.executable).parent / "smig")
SYS_MPROTECT = 10  # x86-64


@pytest.fixture(scope="session")
def manifest() -> Manifest:
    return reference.build(reference.installed_qemu_files())


def _hits(m: Measurement, path: str, offset: int, reason: str = "") -> list[str]:
    """Reasons of mismatches on ``path`` whose range covers file offset ``offset``."""
    return [
        x.reason
        for x in m.mismatches
        if x.path == path and x.offset <= offset < x.offset + x.length and reason in x.reason
    ]


def test_a_healthy_qemu_equals_the_bytes_of_its_files(home: Path, manifest: Manifest) -> None:
    with bare_qemu(marker_dir=home) as pid:
        maps = procfs.executable_mappings(pid)
        result = Measurer(manifest).measure([pid])
    assert result.verdict is Verdict.MATCH, result.mismatches
    file_backed = [m for m in maps if m.path.startswith("/")]
    assert len(file_backed) > 40, "QEMU maps its binary and dozens of libraries"
    # Every file mapping and the vDSO is hashed; only the TCG buffer and [vsyscall] are not.
    assert len(result.targets) == len(file_backed) + 1
    assert result.bytes >= sum(m.length for m in file_backed)
    assert any("TCG" in n for n in result.notes)


def test_a_reference_digest_that_disagrees_is_a_mismatch_even_where_every_leaf_agrees(
    home: Path, manifest: Manifest
) -> None:
    # A mapping whose flat digest equals the reference's is settled without its leaves, so the
    # flat digest must be what decides: here only it is wrong, and the whole segment is named.
    path = next(p for p in manifest.modules if Path(p).name.startswith("libglib-2.0.so"))
    module = manifest.modules[path]
    seg = module.segments[0]
    wrong = dataclasses.replace(seg, digest="00" * 32)
    modules = {**manifest.modules, path: dataclasses.replace(module, segments=(wrong, *module.segments[1:]))}
    doctored = dataclasses.replace(manifest, modules=modules)
    with bare_qemu(marker_dir=home) as pid:
        result = Measurer(doctored).measure([pid])
    assert [(x.path, x.offset, x.length) for x in result.mismatches] == [(path, seg.offset, seg.length)]
    assert "hashed again by leaves" in result.mismatches[0].reason


def test_sha256_references_work_the_same(home: Path) -> None:
    files = [Path(p) for p in reference.installed_qemu_files() if "qemu-system" in str(p) or "libc.so" in str(p)]
    sha = reference.build(files, algorithm=HashAlgorithm.SHA256)
    with bare_qemu(marker_dir=home) as pid:
        attacks.patch(pid, "libc.so")
        result = Measurer(sha, cow_check=False).measure([pid])
    libc = next(p for p in sha.modules if "libc.so" in p)
    assert {x.path for x in result.mismatches if x.reason == "code differs from the reference"} == {libc}
    # Everything it maps besides the two files is unknown to this small manifest: named, too.
    assert any(x.reason == "module not in the reference manifest" for x in result.mismatches)


@pytest.mark.parametrize("module", [None, "libglib-2.0"], ids=["binary", "library"])
def test_a_patch_in_memory_is_named_by_module_and_range(home: Path, manifest: Manifest, module: str | None) -> None:
    with bare_qemu(marker_dir=home) as pid:
        record = attacks.patch(pid, module)
        full = Measurer(manifest, cow_check=False).measure([pid])
        both = Measurer(manifest).measure([pid])
        attacks.undo(record)
        after_full = Measurer(manifest, cow_check=False).measure([pid])
        after_cow = Measurer(manifest).measure([pid])
        assert procfs.process_name(pid).startswith("qemu-system"), "the patch must not kill QEMU"
    assert full.verdict is Verdict.MISMATCH
    assert _hits(full, record.path, record.offset, "code differs")
    assert len(full.mismatches) == 1, "exactly the patched module and leaf"
    assert full.mismatches[0].length <= manifest.leaf_size
    assert _hits(both, record.path, record.offset, "copy-on-write")
    # Put back, the bytes match again; the written page stays a private copy, which the
    # copy-on-write signal keeps seeing.
    assert after_full.verdict is Verdict.MATCH
    assert [x.reason for x in after_cow.mismatches] == ["code page written (copy-on-write)"]


def test_a_patch_after_rounds_hashed_in_place_is_seen_by_the_same_measurer(home: Path, manifest: Manifest) -> None:
    # A Measurer starts each round by hashing again what it hashed in place the round before,
    # before it reads the page tables; a mapping written meanwhile must not keep that digest.
    with bare_qemu(marker_dir=home) as pid:
        measurer = Measurer(manifest, cow_check=False)
        rounds = [measurer.measure([pid]) for _ in range(3)]
        record = attacks.patch(pid, None)
        patched = measurer.measure([pid])
        attacks.undo(record)
        restored = measurer.measure([pid])
        measurer.close()
    assert all(r.verdict is Verdict.MATCH for r in rounds)
    assert rounds[-1].in_place_bytes > rounds[-1].bytes // 2
    assert [x.reason for x in patched.mismatches] == ["code differs from the reference"]
    assert _hits(patched, record.path, record.offset)
    assert restored.verdict is Verdict.MATCH
    # The written page is a private copy now: hashed copied from QEMU's memory, not in place.
    assert restored.in_place_bytes < rounds[-1].in_place_bytes


def test_a_transient_patch_restores_itself(home: Path, manifest: Manifest) -> None:
    with bare_qemu(marker_dir=home) as pid:
        record = attacks.transient_patch(pid, 0.05)
        result = Measurer(manifest, cow_check=False).measure([pid])
        trace = Measurer(manifest).measure([pid])
    assert result.verdict is Verdict.MATCH
    assert _hits(trace, record.path, record.offset, "copy-on-write")


def test_anonymous_executable_memory_is_a_mismatch(home: Path, manifest: Manifest) -> None:
    with bare_qemu(marker_dir=home) as pid:
        record = attacks.anon_exec(pid, 8192)
        during = Measurer(manifest).measure([pid])
        attacks.undo(record)
        after = Measurer(manifest).measure([pid])
    anon = [x for x in during.mismatches if x.path == "[anon]"]
    assert [(x.offset, x.length) for x in anon] == [(record.offset, 8192)]
    assert after.verdict is Verdict.MATCH


def test_an_injected_library_is_named(home: Path, manifest: Manifest) -> None:
    lib = attacks.preload_library(home / "lab")
    with bare_qemu(marker_dir=home, env={"LD_PRELOAD": str(lib)}) as pid:
        result = Measurer(manifest).measure([pid])
    named = {x.path for x in result.mismatches}
    assert named == {str(lib)}, result.mismatches
    assert all(x.reason == "module not in the reference manifest" for x in result.mismatches)


def test_a_swapped_binary_is_caught_in_memory_and_on_disk(home: Path) -> None:
    binary = home / "bin" / "qemu-system-x86_64"
    binary.parent.mkdir()
    shutil.copy2(shutil.which("qemu-system-x86_64") or "", binary)
    files = [binary, *(p for p in reference.installed_qemu_files() if p.name != binary.name)]
    manifest = reference.build(files)
    modules = {"QEMU_MODULE_DIR": str(reference.QEMU_MODULE_DIR)}  # a copied QEMU finds its modules by this
    record = attacks.swap_binary(binary)
    try:
        with bare_qemu(marker_dir=home, binary=str(binary), env=modules) as pid:
            result = Measurer(manifest).measure([pid], files=True)
    finally:
        attacks.undo(record)
    assert _hits(result, str(binary), record.offset, "code differs")
    assert [x.reason for x in result.mismatches if x.pid == 0] == ["file on disk differs from the reference"]
    with bare_qemu(marker_dir=home, binary=str(binary), env=modules) as pid:
        assert Measurer(manifest).measure([pid], files=True).verdict is Verdict.MATCH


def test_code_is_hashed_in_its_page_cache_frames_and_a_page_cache_change_is_seen(home: Path) -> None:
    # A private copy of libglib, loaded through LD_LIBRARY_PATH, so it can be edited in place.
    libdir = home / "lib"
    libdir.mkdir()
    system_glib = next(p for p in reference.installed_qemu_files() if p.name.startswith("libglib-2.0.so"))
    glib = libdir / "libglib-2.0.so.0"  # the name the loader looks for
    shutil.copy2(system_glib, glib)
    files = [glib, *(p for p in reference.installed_qemu_files() if p != system_glib)]
    manifest = reference.build(files)
    with bare_qemu(marker_dir=home, env={"LD_LIBRARY_PATH": str(libdir)}) as pid:
        measurer = Measurer(manifest)
        first = measurer.measure([pid])  # reading faults in code pages QEMU never ran yet
        healthy = measurer.measure([pid])
        m = attacks.code_mapping(pid, str(glib))
        at = m.offset + attacks.inert_offset(pid, m, 1)
        with glib.open("r+b", buffering=0) as f:  # a write to the file: no copy-on-write trace
            original = os.pread(f.fileno(), 1, at)
            os.pwrite(f.fileno(), bytes([original[0] ^ 0xFF]), at)
        changed = measurer.measure([pid])
        copied = Measurer(manifest, in_place=False).measure([pid])
    assert first.verdict is Verdict.MATCH and healthy.verdict is Verdict.MATCH, healthy.mismatches
    assert healthy.in_place_bytes > healthy.bytes // 2, "clean code is hashed where it lies"
    for result in (changed, copied):
        assert [x.reason for x in result.mismatches] == ["code differs from the reference"]
        assert _hits(result, str(glib), at)
    assert copied.in_place_bytes == 0 and changed.in_place_bytes > 0


def test_code_made_execute_only_is_still_read(home: Path, manifest: Manifest) -> None:
    # process_vm_readv cannot read a mapping without PROT_READ; the attacker's hope is a
    # measurement that fails as if the process were gone. It must fall back and see the patch.
    with bare_qemu(marker_dir=home) as pid:
        record = attacks.patch(pid, "libglib-2.0")
        m = attacks.code_mapping(pid, "libglib-2.0")
        ptrace.remote_syscall(pid, SYS_MPROTECT, m.start, m.length, mmap.PROT_EXEC)
        perms = next(x.perms for x in procfs.executable_mappings(pid) if x.start == m.start)
        result = Measurer(manifest, cow_check=False).measure([pid])
    assert perms.startswith("--x")
    assert result.pids == (pid,) and not result.gone
    assert _hits(result, record.path, record.offset, "code differs")


def test_code_that_can_never_be_read_in_a_live_process_is_a_mismatch(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def unmapped(pid: int, *_: object) -> None:
        calls.append(pid)
        raise ProcessGone(pid, "unmapped while read")

    measurer = Measurer(manifest)
    monkeypatch.setattr(measurer, "_measure_process", unmapped)
    result = measurer.measure([os.getpid()])  # alive throughout, so not "gone"
    assert calls == [os.getpid()] * 3, "retried, for a process that was only starting or unloading a module"
    assert result.verdict is Verdict.MISMATCH and not result.gone
    assert [x.path for x in result.mismatches] == ["[process]"]


def test_a_process_that_is_gone_is_no_mismatch(home: Path, manifest: Manifest) -> None:
    with bare_qemu(marker_dir=home) as pid:
        gone_pid = pid
    with bare_qemu(marker_dir=home) as pid:
        result = Measurer(manifest).measure([gone_pid, pid])
    assert result.verdict is Verdict.MATCH
    assert result.gone == (gone_pid,) and result.pids == (pid,)


def test_files_seen_through_a_process_that_exited_are_not_missing(home: Path, manifest: Manifest) -> None:
    # The monitor reads a subject's files through /proc/PID/root of one of its processes; when that
    # process exits, the files are read through another one (or the machine's root), never all
    # reported missing. Seen in the lab: a VM's QEMU exiting as a neighbour measured its host.
    with bare_qemu(marker_dir=home) as pid:
        gone_root = Path(f"/proc/{pid}/root")
    with bare_qemu(marker_dir=home) as pid:
        result = Measurer(manifest).measure([pid], files=True, file_root=gone_root)
    assert result.verdict is Verdict.MATCH, result.mismatches
    assert len([t for t in result.targets if t.target.startswith("file:")]) == len(manifest.files)
    # With no process left to see them through, the files are not measured from the monitor's own
    # root (not what the subject sees): the round says so instead.
    alone = Measurer(manifest).measure([], files=True, file_root=gone_root)
    assert not alone.mismatches and not [t for t in alone.targets if t.target.startswith("file:")]
    assert any("files not measured" in n for n in alone.notes)


def test_a_manifest_is_only_loaded_with_the_right_signature(tmp_path: Path, manifest: Manifest) -> None:
    key = reference.signing_key(tmp_path / "a")
    path = tmp_path / "m.json"
    reference.save(reference.sign(manifest, key), path)
    assert reference.load(path, key.public_key()).modules.keys() == manifest.modules.keys()

    with pytest.raises(ManifestError, match="not signed by the trusted"):
        reference.load(path, reference.signing_key(tmp_path / "b").public_key())
    doc = json.loads(path.read_text())
    some = next(iter(doc["manifest"]["modules"]))
    doc["manifest"]["modules"][some][0]["leaves"][0] = "00" * 32  # vouch for a patched leaf
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="altered"):
        reference.load(path, key.public_key())


def test_cli_contract_reference_measure_attack_undo(home: Path, cli_env: dict[str, str]) -> None:
    def smig(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).parent / "smig"), *args],
            env=cli_env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    built = json.loads(smig("reference", "build", "--json").stdout)
    assert Path(built["path"]) == home / "reference" / "manifest.json" and built["modules"] > 40
    with bare_qemu(marker_dir=home / "q") as pid:
        healthy = json.loads(smig("measure", "--pid", str(pid), "--json").stdout)
        applied = json.loads(smig("attack", "patch", "--pid", str(pid), "--module", "libz", "--json").stdout)
        tampered = json.loads(smig("measure", "--pid", str(pid), "--no-cow", "--json").stdout)
        strict = smig("measure", "--pid", str(pid), "--strict", check=False)
        smig("attack", "undo", applied["id"])
        restored = json.loads(smig("measure", "--pid", str(pid), "--no-cow", "--json").stdout)
    assert healthy["verdict"] == "match" and healthy["mismatches"] == []
    assert healthy["bytes"] > 10_000_000 and healthy["elapsed_ms"] > 0
    assert tampered["verdict"] == "mismatch"
    [hit] = tampered["mismatches"]
    assert hit["path"] == applied["path"] and "libz" in hit["path"]
    assert hit["offset"] <= applied["offset"] < hit["offset"] + hit["length"]
    assert strict.returncode == 3
    assert restored["verdict"] == "match"
    bad = smig("measure", "--pid", "999999999", "--json", check=False)
    assert bad.returncode == 1 and "no process" in bad.stderr


def test_a_host_is_the_hypervisors_in_its_network_namespace(home: Path, cli_env: dict[str, str]) -> None:
    netns = f"smig-t{home.name}-{int(time.time() * 1000) % 100000}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        with bare_qemu(marker_dir=home / "outside"), bare_qemu(marker_dir=home / "inside", netns=netns) as inside:
            found = procfs.hypervisor_pids(f"/run/netns/{netns}")
            env = dict(cli_env)
            subprocess.run([_SMIG, "reference", "build", "--no-agent"], env=env, check=True, capture_output=True)
            done = subprocess.run(
                [_SMIG, "measure", "--host", netns, "--json"], env=env, capture_output=True, text=True
            )
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=True)
    assert found == [inside]
    result = json.loads(done.stdout)
    assert result["pids"] == [inside] and result["verdict"] == "match", result


def test_smig_monitor_prints_signed_reports_that_verify(home: Path, cli_env: dict[str, str]) -> None:
    subprocess.run([_SMIG, "reference", "build", "--no-agent"], env=cli_env, check=True, capture_output=True)
    with bare_qemu(marker_dir=home / "q") as pid:
        args = ["monitor", "--pid", str(pid), "--id", "h2", "--subject", "h1", "--interval", "0.05", "--rounds", "2"]
        done = subprocess.run([_SMIG, *args, "--json"], env=cli_env, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    key = load_private_key(home / "keys" / "monitor.pem").public_key()
    last: dict[tuple[str, str], int] = {}
    for line in lines:
        report = verify_report(
            SignedReport.from_wire(line["wire"]),
            keys={"h2": key},
            assigned={"h1": ["h2"]},
            last_sequence=last,
            now=time.time(),
            max_age_s=30,
            max_skew_s=1,
        )
        last[("h2", "h1")] = report.sequence
        assert report.verdict is Verdict.MATCH and line["report"]["sequence"] == report.sequence
    assert len(lines) == 2


def test_a_file_edited_in_place_with_its_mtime_put_back_is_still_caught(tmp_path: Path) -> None:
    # The file digests are cached by identity and times, and an unchanged file is answered from
    # a stat alone. An edit of the same size, in place, with the modification time set back,
    # still changes the ctime (which only the clock can set back): the file is hashed again.
    agent_file = tmp_path / "agent.py"
    agent_file.write_bytes(b"print('the agent')\n" * 100)
    manifest = reference.build([agent_file])
    measurer = Measurer(manifest)
    try:
        assert measurer.measure([], files=True).verdict is Verdict.MATCH
        assert measurer.measure([], files=True).verdict is Verdict.MATCH  # from the cache
        before = agent_file.stat()
        time.sleep(0.01)
        with agent_file.open("r+b") as f:
            f.write(b"print('ANOTHER')\n")
        os.utime(agent_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert agent_file.stat().st_mtime_ns == before.st_mtime_ns and agent_file.stat().st_size == before.st_size
        result = measurer.measure([], files=True)
        assert [(m.path, m.reason) for m in result.mismatches] == [
            (str(agent_file), "file on disk differs from the reference")
        ]
    finally:
        measurer.close()

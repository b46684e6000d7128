"""Reference manifests: what a known-good hypervisor's code and files hash to, built from files.

A manifest is built from binaries on a machine the operator trusts (the installed QEMU and every
library and module it loads, or an unpacked package), never from a host being judged. For each
ELF file it holds the digest of every executable segment as the loader will map it, whole (its
flat digest, which settles a matching mapping in one hash) and leaf by leaf, so a changed byte in
memory is placed to within one leaf; for every file (ELF or firmware or the
agent's own code) the digest of the file on disk. It is signed with the operator's Ed25519 key,
and the RC-TCB holds the approved copy.

One reference comes from no file: the kernel's ``[vdso]``, which is linked into the kernel image.
It is taken from the builder's own process, labelled with the kernel release, and so vouches only
for hosts that run the same kernel build as the trusted builder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import smig
from smig.aim import elf, procfs
from smig.aim.hashing import LEAF_SIZE, FileSource, Reader, flat_digest
from smig.aim.keys import ensure_private_key, load_public_key_pem, public_key_pem
from smig.errors import ConfigError, ManifestError
from smig.model import HashAlgorithm

FORMAT = 2  # 2: a segment's digest is its flat digest (smig.aim.hashing), not the hash of its leaves
QEMU_BINARY = "qemu-system-x86_64"
QEMU_MODULE_DIR = Path("/usr/lib/x86_64-linux-gnu/qemu")
# What an x86 VM can load besides code: SeaBIOS, the option ROMs and boot stubs QEMU ships.
FIRMWARE = (
    "/usr/share/seabios/*",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/linuxboot*.bin",
    "/usr/share/qemu/multiboot*.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/sgabios.bin",
    "/usr/share/qemu/bios-microvm.bin",
)
# Under TCG QEMU keeps one anonymous read-write-execute buffer of translated guest code; its
# default size on x86-64 is 1 GiB (less a guard page).
TCG_BUFFER_MAX = 1 << 30


@dataclass(frozen=True)
class SegmentRef:
    """An executable segment of a module: where it is mapped from, its flat digest and its leaf digests."""

    offset: int
    length: int
    digest: str
    leaves: tuple[str, ...]


@dataclass(frozen=True)
class ModuleRef:
    """An ELF file whose code a hypervisor process may map."""

    path: str
    segments: tuple[SegmentRef, ...]

    def segment_at(self, offset: int) -> SegmentRef | None:
        return next((s for s in self.segments if s.offset == offset), None)


@dataclass(frozen=True)
class Manifest:
    """The approved reference values; see the module docstring."""

    algorithm: HashAlgorithm
    leaf_size: int
    created_at: float
    modules: Mapping[str, ModuleRef]
    files: Mapping[str, str]  # path → digest of the whole file on disk
    kernel_pages: Mapping[str, tuple[str, ...]]  # "[vdso]" → accepted digests
    kernel_release: str
    tcg_buffer_max: int = TCG_BUFFER_MAX
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "algorithm": self.algorithm.value,
            "leaf_size": self.leaf_size,
            "created_at": self.created_at,
            "kernel_release": self.kernel_release,
            "tcg_buffer_max": self.tcg_buffer_max,
            "modules": {
                p: [
                    {"offset": s.offset, "length": s.length, "digest": s.digest, "leaves": list(s.leaves)}
                    for s in m.segments
                ]
                for p, m in sorted(self.modules.items())
            },
            "files": dict(sorted(self.files.items())),
            "kernel_pages": {k: list(v) for k, v in sorted(self.kernel_pages.items())},
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Raises: ManifestError: not a manifest this version understands."""
        try:
            if data["format"] != FORMAT:
                raise ManifestError(f"manifest format {data['format']} is not supported (this SMIG reads {FORMAT})")
            modules = {
                path: ModuleRef(
                    path=path,
                    segments=tuple(
                        SegmentRef(int(s["offset"]), int(s["length"]), str(s["digest"]), tuple(map(str, s["leaves"])))
                        for s in segs
                    ),
                )
                for path, segs in data["modules"].items()
            }
            return cls(
                algorithm=HashAlgorithm(data["algorithm"]),
                leaf_size=int(data["leaf_size"]),
                created_at=float(data["created_at"]),
                modules=modules,
                files={str(k): str(v) for k, v in data["files"].items()},
                kernel_pages={str(k): tuple(map(str, v)) for k, v in data["kernel_pages"].items()},
                kernel_release=str(data["kernel_release"]),
                tcg_buffer_max=int(data["tcg_buffer_max"]),
                notes=tuple(map(str, data.get("notes", []))),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ManifestError(f"malformed reference manifest: {e!r}") from e


# -- what to build from --------------------------------------------------------------------


def _ldd(path: Path) -> list[Path]:
    """The shared libraries ``path`` loads, resolved by the trusted builder's own loader."""
    try:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(Path(parts[2]))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))  # the loader itself
    return libs


def installed_qemu_files() -> list[Path]:
    """The installed QEMU, its modules, every library they load, and the firmware a VM loads.

    Raises:
        ManifestError: QEMU is not installed.
    """
    binary = shutil.which(QEMU_BINARY)
    if binary is None:
        raise ManifestError(f"{QEMU_BINARY} is not installed; run `make setup` or name the files to build from")
    code = [Path(binary), *sorted(QEMU_MODULE_DIR.glob("*.so"))]
    seen = list(code)
    for item in code:
        seen.extend(_ldd(item))
    firmware = [p for pattern in FIRMWARE for p in sorted(Path("/").glob(pattern.lstrip("/"))) if p.is_file()]
    return _unique([*seen, *firmware])


def agent_files() -> list[Path]:
    """The agent's own code: the SMIG package as installed."""
    root = Path(smig.__file__).resolve().parent
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".c", "") and "__pycache__" not in p.parts
    )


def _unique(paths: Iterable[Path]) -> list[Path]:
    out: dict[str, Path] = {}
    for p in paths:
        real = Path(os.path.realpath(p))
        out.setdefault(str(real), real)
    return list(out.values())


# -- building ------------------------------------------------------------------------------


def own_vdso(reader: Reader) -> str | None:
    """The digest of this process's ``[vdso]``, or None where the kernel maps none."""
    for m in procfs.executable_mappings(os.getpid()):
        if m.path == "[vdso]":
            with open("/proc/self/mem", "rb", buffering=0) as mem:
                return flat_digest(reader.algorithm, os.pread(mem.fileno(), m.length, m.start))
    return None


def _hash_file(reader: Reader, path: Path) -> tuple[str, ModuleRef | None]:
    """A file's whole digest and, for an ELF file with code, its segments' leaves."""
    try:
        with path.open("rb", buffering=0) as f:
            digest = reader.file_digest(f.fileno())
            if not elf.is_elf(path):
                return digest, None
            found = elf.executable_segments(path)
            with reader.batch(FileSource(f.fileno(), pad=True)) as batch:
                indexes = [batch.add_range(seg.offset, seg.length) for seg in found]
                leaves = batch.finish()
            segments = [
                SegmentRef(seg.offset, seg.length, batch.flat_digest(i), tuple(x.hex() for x in leaves[i]))
                for seg, i in zip(found, indexes, strict=True)
            ]
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from e
    return digest, (ModuleRef(str(path), tuple(segments)) if segments else None)


def build(
    files: Iterable[Path], *, algorithm: HashAlgorithm = HashAlgorithm.BLAKE3, leaf_size: int = LEAF_SIZE
) -> Manifest:
    """A manifest for ``files`` (paths are resolved, as ``/proc/PID/maps`` shows them).

    Raises:
        ManifestError: a file cannot be read.
    """
    reader = Reader(algorithm, leaf_size)
    modules: dict[str, ModuleRef] = {}
    digests: dict[str, str] = {}
    try:
        for path in _unique(files):
            digests[str(path)], module = _hash_file(reader, path)
            if module is not None:
                modules[str(path)] = module
        vdso = own_vdso(reader)
    finally:
        reader.close()
    return Manifest(
        algorithm=algorithm,
        leaf_size=leaf_size,
        created_at=time.time(),
        modules=modules,
        files=digests,
        kernel_pages={"[vdso]": (vdso,)} if vdso else {},
        kernel_release=platform.release(),
    )


# -- signing and storage -------------------------------------------------------------------


def _canonical(manifest: Manifest) -> bytes:
    return json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode()


def manifest_digest(manifest: Manifest) -> str:
    """What the IVT records as a host's approved manifest: SHA-256 of its canonical JSON, in hex.
    A monitor measures a subject only against the manifest whose digest the subject's row holds."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed document to store: the manifest, its signature, and the signer's public key."""
    return {
        "manifest": manifest.to_json(),
        "signature": base64.b64encode(key.sign(_canonical(manifest))).decode(),
        "signer": public_key_pem(key.public_key()).decode(),
    }


def save(document: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load(path: Path, trusted: Ed25519PublicKey) -> Manifest:
    """The manifest at ``path``, only if ``trusted`` signed it.

    Raises:
        ManifestError: missing, malformed, or not signed by the trusted key.
    """
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(f"no reference manifest at {path}; build one with `smig reference build`") from e
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read the reference manifest {path}: {e}") from e
    if not isinstance(document, dict) or not {"manifest", "signature"} <= document.keys():
        raise ManifestError(f"{path} is not a signed reference manifest")
    manifest = Manifest.from_json(document["manifest"])
    try:
        trusted.verify(base64.b64decode(document["signature"], validate=True), _canonical(manifest))
    except (InvalidSignature, ValueError, TypeError) as e:
        raise ManifestError(
            f"the reference manifest {path} is not signed by the trusted reference key; "
            "it was altered or signed by someone else"
        ) from e
    return manifest


# -- where things live in $SMIG_HOME --------------------------------------------------------


def default_manifest_path(home: Path) -> Path:
    return home / "reference" / "manifest.json"


def signing_key(home: Path) -> Ed25519PrivateKey:
    """The operator's reference-signing key in ``home``, generated on first use."""
    return ensure_private_key(home / "keys" / "reference.pem")


def trusted_key(home: Path, public_key_file: Path | None = None) -> Ed25519PublicKey:
    """The key manifests must be signed with: ``public_key_file`` if given, else this home's own.

    Raises:
        ConfigError: the key file cannot be read.
    """
    if public_key_file is not None:
        try:
            return load_public_key_pem(public_key_file.read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read the public key {public_key_file}: {e.strerror or e}") from e
    return signing_key(home).public_key()

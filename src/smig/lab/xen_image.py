"""The nested Xen host's image: Xen, a dom0 kernel and initrd, and a dom0 root disk.

Built once, cached under ``$SMIG_CACHE/images/xen``, by ``debootstrap`` from Debian's main archive
for bookworm: its Xen 4.17.5 has shadow paging, which PV live migration needs; the build in
bookworm-security (4.17.7) has none, and fails to migrate with "Failed to enable logdirty"
(see MACHINE-NOTES). debootstrap reads only the mirror it is given, so the security archive never
enters the image; the Xen version installed is checked all the same, and recorded.

dom0 runs Debian's full amd64 kernel (the cloud kernel has no dom0 support), and
``files/xen/smig-dom0-init`` as PID 1 instead of an init system: it starts the Xen daemons, the
network, the lab's read-only shares and the exec channel (``files/xen/smig-dom0-exec``), and is
ready about 30 s after the outer QEMU starts under TCG.

The root disk is an ext4 image written straight from the tree (``mkfs.ext4 -d``: no loop mount);
each host boots a qcow2 overlay on it, so hosts never share a writable disk.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from smig.errors import ImageError

log = logging.getLogger(__name__)

#: Bump when the image changes in a way the inputs below do not show.
BUILDER_VERSION = "1"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "linux-image-amd64",  # the full kernel: CONFIG_XEN_DOM0
    "initramfs-tools",  # makes the initrd that mounts the virtio root disk
    "kmod",
    "iproute2",
    "procps",
    "socat",  # the migration transport the Xen driver controls
    "python3",  # the exec channel, and the SMIG agent in dom0
)
XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
#: Its unstripped twin, whose xen-syms is the reference AIM judges Xen's code against.
XEN_SYMS_PACKAGE = "xen-hypervisor-4.17-amd64-dbg"
# The toolstack dom0 runs, as AIM measures it: the store, the console daemon, and xl (each guest's
# ``xl create`` leaves one running to watch the domain; a migration runs two more).
DOM0_TOOLS = tuple(f"/usr/lib/xen-4.17/bin/{name}" for name in ("xenstored", "xenconsoled", "xl"))
XEN_SYMS_IN_PACKAGE = "usr/lib/debug/boot/xen-syms-4.17-amd64"
#: Xen versions whose PV live migration works under TCG (shadow paging built in).
MIGRATING_XEN = ("4.17.5",)
DISK_SIZE_MIB = 1400
FILES = ("smig-dom0-init", "smig-dom0-exec")
# Trees dom0 never needs: they only make the disk larger and the build slower.
_PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
)
_PRUNE_MODULES = ("drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband", "sound")

Progress = Callable[[str], None]
PT_NOTE = 4
NT_GNU_BUILD_ID = 3


@dataclass(frozen=True)
class XenHostImage:
    """What the outer QEMU boots: Xen (multiboot ELF), dom0's kernel and initrd, its root disk."""

    xen: Path
    kernel: Path
    initrd: Path
    disk: Path
    versions: dict[str, str]
    digest: str

    @property
    def xen_syms(self) -> Path:
        """Xen's unstripped ELF, from the -dbg package of the same version (AIM's reference)."""
        return self.xen.parent / "xen-syms"

    @property
    def dom0_tools(self) -> tuple[tuple[str, Path], ...]:
        """(path in dom0, copy here) of each toolstack program AIM measures in dom0, copied from
        the image's own tree, so from the packages, never from a running host."""
        return tuple((path, self.xen.parent / "dom0-tools" / Path(path).name) for path in DOM0_TOOLS)

    @property
    def xen_version(self) -> str:
        return self.versions.get(XEN_PACKAGE, "")


def elf_build_id(path: Path) -> str:
    """The GNU build id in an ELF file's notes (32- or 64-bit), or "" if it has none."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        return ""
    wide = data[4] == 2
    phoff, phentsize, phnum = (
        (struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54))
        if wide
        else (struct.unpack_from("<I", data, 28)[0], *struct.unpack_from("<HH", data, 42))
    )
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from("<I", data, at)[0] != PT_NOTE:
            continue
        offset, size = (
            struct.unpack_from("<QQ", data, at + 8)[0:1] + struct.unpack_from("<Q", data, at + 32)
            if wide
            else (struct.unpack_from("<I", data, at + 4)[0], struct.unpack_from("<I", data, at + 16)[0])
        )
        note = offset
        while note + 12 <= offset + size:
            namesz, descsz, kind = struct.unpack_from("<III", data, note)
            name_end = note + 12 + ((namesz + 3) & ~3)
            if kind == NT_GNU_BUILD_ID and data[note + 12 : note + 12 + namesz].rstrip(b"\0") == b"GNU":
                return data[name_end : name_end + descsz].hex()
            note = name_end + ((descsz + 3) & ~3)
    return ""


def _asset(name: str) -> bytes:
    return resources.files("smig.lab").joinpath("files", "xen", name).read_bytes()


def inputs_digest() -> str:
    """What the image is built from; a change of any of it means a rebuild."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\nsuite={SUITE}\nmirror={MIRROR}\ndisk={DISK_SIZE_MIB}\n".encode())
    h.update(("packages=" + ",".join(PACKAGES) + "\n").encode())
    for name in FILES:
        h.update(f"{name}={hashlib.sha256(_asset(name)).hexdigest()}\n".encode())
    return h.hexdigest()


def check_migrating_xen(version: str) -> None:
    """Raises ImageError unless ``version`` is a Xen whose PV live migration works here."""
    if not any(version.startswith(v) for v in MIGRATING_XEN):
        raise ImageError(
            f"debootstrap installed Xen {version or '(none)'}, not {' or '.join(MIGRATING_XEN)}: "
            "PV live migration needs shadow paging, which other Debian builds lack here; "
            f"check that {MIRROR} serves {SUITE} main"
        )


def _run(argv: list[str], what: str, *, timeout_s: float = 1200) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout_s)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} is not installed; run `make setup` first") from e
    except subprocess.TimeoutExpired as e:
        raise ImageError(f"{what} took longer than {timeout_s:.0f} s") from e
    if done.returncode != 0:
        tail = "\n".join((done.stderr.strip() or done.stdout.strip()).splitlines()[-5:])
        raise ImageError(f"{what} failed ({' '.join(argv[:3])} …): {tail}")
    return done.stdout


class XenImageBuilder:
    """Builds the nested Xen host image into the cache, or finds the one already there."""

    def __init__(self, cache_dir: Path, progress: Progress | None = None) -> None:
        self.image_dir = cache_dir / "images" / "xen"
        self._work = cache_dir / "images" / "xen.building"
        self._progress = progress or (lambda msg: log.info("%s", msg))

    def load(self) -> XenHostImage:
        """The image already built. Raises ImageError: none is."""
        manifest = self.image_dir / "manifest.json"
        if not manifest.exists():
            raise ImageError(f"no Xen host image in {self.image_dir}; build it with `smig image xen`")
        data = json.loads(manifest.read_text())
        d = self.image_dir
        return XenHostImage(
            xen=d / "xen.elf",
            kernel=d / "vmlinuz",
            initrd=d / "initrd.img",
            disk=d / "root.ext4",
            versions={str(k): str(v) for k, v in data["versions"].items()},
            digest=str(data["digest"]),
        )

    def ensure(self, *, force: bool = False) -> tuple[XenHostImage, bool]:
        """The image for the current inputs, building it (a few minutes) if needed.

        Returns the image and whether it was built. Raises ImageError, naming the step that failed.
        """
        digest = inputs_digest()
        if not force:
            try:
                current = self.load()
            except ImageError:
                current = None
            if current is not None and current.digest == digest and current.disk.exists():
                if not current.xen_syms.exists():
                    self._fetch_xen_syms(current)
                if not all(local.exists() for _p, local in current.dom0_tools):
                    self._copy_dom0_tools(current)
                return current, False
        if os.geteuid() != 0:
            raise ImageError("building the Xen host image needs root (debootstrap, device nodes in the tree)")
        self._build(digest)
        image = self.load()
        self._fetch_xen_syms(image)
        self._copy_dom0_tools(image)
        return image, True

    def _copy_dom0_tools(self, image: XenHostImage) -> None:
        """Copy the toolstack programs out of the root disk (debugfs reads ext4 without mounting)."""
        out = image.dom0_tools[0][1].parent
        out.mkdir(exist_ok=True)
        for path, local in image.dom0_tools:
            part = local.with_suffix(".part")
            _run(["debugfs", "-R", f"dump {path} {part}", str(image.disk)], f"debugfs dump {path}")
            if not part.exists() or part.stat().st_size == 0:
                raise ImageError(f"the Xen host image's disk has no {path}")
            part.rename(local)

    def _fetch_xen_syms(self, image: XenHostImage) -> None:
        """Download xen-syms for exactly the Xen in the image, and prove it is that Xen: the
        build id in its notes must equal the one in the image's Xen."""
        version = image.xen_version
        work = self.image_dir / "syms.building"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            self._progress(f"downloading {XEN_SYMS_PACKAGE} {version} (xen-syms, AIM's reference for Xen)")
            done = subprocess.run(
                ["apt-get", "download", "-q", f"{XEN_SYMS_PACKAGE}={version}"],
                cwd=work, capture_output=True, text=True, check=False, timeout=600,
            )  # fmt: skip
            debs = sorted(work.glob("*.deb"))
            if not debs:
                raise ImageError(f"apt-get download {XEN_SYMS_PACKAGE}={version} failed: {done.stderr.strip()[-300:]}")
            _run(["dpkg-deb", "-x", str(debs[0]), str(work / "x")], "dpkg-deb -x")
            syms = work / "x" / XEN_SYMS_IN_PACKAGE
            ours, theirs = elf_build_id(image.xen), elf_build_id(syms)
            if not ours or ours != theirs:
                raise ImageError(f"xen-syms (build id {theirs or 'none'}) is not the image's Xen ({ours or 'none'})")
            syms.rename(image.xen_syms)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _build(self, digest: str) -> None:
        shutil.rmtree(self._work, ignore_errors=True)
        root = self._work / "rootfs"
        self._work.mkdir(parents=True)
        try:
            self._progress(f"debootstrap {SUITE} with Xen and dom0's kernel from {MIRROR} (about two minutes)")
            _run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
                "debootstrap",
            )
            versions = self._versions(root)
            check_migrating_xen(versions.get(XEN_PACKAGE, ""))
            self._progress(f"Xen {versions[XEN_PACKAGE]}, dom0 kernel {versions.get('kernel', '?')}")
            self._install_files(root)
            self._boot_files(root)
            self._prune(root)
            self._progress(f"writing the {DISK_SIZE_MIB} MiB ext4 root disk")
            disk = self._work / "root.ext4"
            _run(
                ["mkfs.ext4", "-q", "-F", "-L", "smigdom0", "-d", str(root), str(disk), f"{DISK_SIZE_MIB}M"],
                "mkfs.ext4",
            )
            shutil.rmtree(root)
            (self._work / "manifest.json").write_text(json.dumps({"digest": digest, "versions": versions}, indent=1))
            shutil.rmtree(self.image_dir, ignore_errors=True)
            self._work.rename(self.image_dir)
        finally:
            shutil.rmtree(self._work, ignore_errors=True)

    def _versions(self, root: Path) -> dict[str, str]:
        out = _run(["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"], "dpkg-query")
        installed = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        versions = {p: installed[p] for p in (XEN_PACKAGE, "xen-utils-4.17", "python3") if p in installed}
        kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError("debootstrap installed no kernel in /boot")
        versions["kernel"] = kernels[-1]
        return versions

    def _install_files(self, root: Path) -> None:
        for name, where in (("smig-dom0-init", "sbin"), ("smig-dom0-exec", "usr/local/sbin")):
            target = root / where / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_asset(name))
            target.chmod(0o755)
        (root / "etc" / "hostname").write_text("xenhost\n")

    def _boot_files(self, root: Path) -> None:
        boot = root / "boot"
        xen = sorted(boot.glob("xen-4.17-amd64.gz"))
        if not xen:
            raise ImageError("the Xen package left no /boot/xen-4.17-amd64.gz")
        # QEMU's -kernel loads a multiboot ELF, not a gzip of one.
        with gzip.open(xen[0]) as src, (self._work / "xen.elf").open("wb") as dst:
            shutil.copyfileobj(src, dst)
        for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
            found = sorted(boot.glob(pattern))
            if not found:
                raise ImageError(f"no /boot/{pattern} in the dom0 tree")
            shutil.copyfile(found[-1], self._work / name)

    @staticmethod
    def _prune(root: Path) -> None:
        for rel in _PRUNE:
            shutil.rmtree(root / rel, ignore_errors=True)
        for modules in (root / "usr" / "lib" / "modules").glob("*/kernel"):
            for rel in _PRUNE_MODULES:
                shutil.rmtree(modules / rel, ignore_errors=True)

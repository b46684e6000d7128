"""The guest image: a Debian cloud kernel and a busybox initramfs running SMIG's workload.

The kernel comes from Debian's ``linux-image-*-cloud-amd64`` package, downloaded with
``apt-get download`` and unpacked with ``dpkg -x`` (never installed on the host). The initramfs
holds a static busybox, ``smig-guest`` (heartbeat and memory dirtier, compiled here from
``files/smig-guest.c``), the ``init`` script, and the virtio modules later workloads need.

The image is cached under ``$SMIG_CACHE/images``; :meth:`ImageBuilder.ensure` rebuilds it only
when an input changed (kernel package, busybox, guest source, init script, this builder).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from smig.errors import ImageError
from smig.guest.cpio import CpioWriter

log = logging.getLogger(__name__)

#: Bump when the layout of the image changes in a way the inputs do not show.
BUILDER_VERSION = "1"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
#: virtio drivers in load order; loaded by /init only when the kernel line says smig_modules=1.
VIRTIO_MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/char/virtio_console",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
)


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: what QEMU needs to boot it."""

    kernel: Path
    initrd: Path
    kernel_package: str
    digest: str


Progress = Callable[[str], None]


def parse_kernel_dependency(apt_cache_depends: str) -> str:
    """The versioned kernel package that ``apt-cache depends`` says the metapackage pulls in.

    Raises:
        ImageError: no ``linux-image-*`` dependency in the output.
    """
    for line in apt_cache_depends.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and name != KERNEL_METAPACKAGE:
                return name
    raise ImageError(f"apt-cache names no versioned kernel behind {KERNEL_METAPACKAGE}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"{argv[0]} is not installed; run `make setup` first") from e
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


class ImageBuilder:
    """Builds the guest image into a cache directory, or finds the one already there."""

    def __init__(self, cache_dir: Path, progress: Progress | None = None) -> None:
        self.cache_dir = cache_dir
        self.image_dir = cache_dir / "images" / "current"
        self.deb_dir = cache_dir / "images" / "debs"
        self._progress = progress or (lambda msg: log.info("%s", msg))

    # -- finding -------------------------------------------------------------------------

    def load(self) -> GuestImage:
        """The image already built.

        Raises:
            ImageError: no image has been built yet.
        """
        manifest = self.image_dir / "manifest.json"
        if not manifest.exists():
            raise ImageError(f"no guest image in {self.image_dir}; build it with `smig image build` (or `make setup`)")
        data = json.loads(manifest.read_text())
        return GuestImage(
            kernel=self.image_dir / "vmlinuz",
            initrd=self.image_dir / "initrd.gz",
            kernel_package=str(data["kernel_package"]),
            digest=str(data["digest"]),
        )

    # -- building ------------------------------------------------------------------------

    def ensure(self, *, force: bool = False) -> tuple[GuestImage, bool]:
        """The image for the current inputs, building it if needed.

        Returns the image and whether it was (re)built.

        Raises:
            ImageError: a step of the build failed; the message names it.
        """
        deb = self._kernel_deb()
        digest = self._inputs_digest(deb)
        if not force:
            try:
                current = self.load()
            except ImageError:
                current = None
            if current is not None and current.digest == digest and current.kernel.exists():
                return current, False
        self._build(deb, digest)
        return self.load(), True

    def _kernel_deb(self) -> Path:
        self.deb_dir.mkdir(parents=True, exist_ok=True)
        try:
            package = parse_kernel_dependency(_run(["apt-cache", "depends", KERNEL_METAPACKAGE]))
        except ImageError:
            cached = sorted(self.deb_dir.glob("linux-image-*.deb"))
            if cached:
                self._progress(f"apt cannot resolve {KERNEL_METAPACKAGE}; using cached {cached[-1].name}")
                return cached[-1]
            raise
        found = sorted(self.deb_dir.glob(f"{package}_*.deb"))
        if found:
            return found[-1]
        self._progress(f"downloading {package} (Debian kernel package)")
        _run(["apt-get", "download", package], cwd=self.deb_dir)
        found = sorted(self.deb_dir.glob(f"{package}_*.deb"))
        if not found:
            raise ImageError(f"apt-get download {package} left no .deb in {self.deb_dir}")
        return found[-1]

    def _inputs_digest(self, deb: Path) -> str:
        h = hashlib.sha256()
        h.update(f"builder={BUILDER_VERSION}\n".encode())
        h.update(f"deb={deb.name}\n".encode())
        if not BUSYBOX.exists():
            raise ImageError(f"{BUSYBOX} is missing; install busybox-static (`make setup`)")
        h.update(f"busybox={_sha256(BUSYBOX)}\n".encode())
        for name in ("init", "smig-guest.c"):
            h.update(f"{name}={hashlib.sha256(_asset(name)).hexdigest()}\n".encode())
        h.update(("modules=" + ",".join(VIRTIO_MODULES) + "\n").encode())
        return h.hexdigest()

    def _build(self, deb: Path, digest: str) -> None:
        self._progress(f"building guest image from {deb.name}")
        self.image_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.image_dir.parent, prefix=".build-") as tmp:
            work = Path(tmp)
            unpacked = work / "deb"
            _run(["dpkg", "-x", str(deb), str(unpacked)])
            kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
            if not kernels:
                raise ImageError(f"{deb.name} holds no /boot/vmlinuz-*")
            release = kernels[0].name.removeprefix("vmlinuz-")
            modroot = unpacked / "lib" / "modules" / release / "kernel"

            self._progress("compiling smig-guest (static)")
            src = work / "smig-guest.c"
            src.write_bytes(_asset("smig-guest.c"))
            guest_bin = work / "smig-guest"
            _run(["gcc", "-O2", "-static", "-Wall", "-o", str(guest_bin), str(src)])

            self._progress("writing initramfs")
            out = work / "out"
            out.mkdir()
            initrd = io.BytesIO()
            cpio = CpioWriter(initrd)
            for d in ("bin", "dev", "proc", "sys", "tmp", "run", "lib", "lib/modules"):
                cpio.directory(d)
            cpio.char_device("dev/console", 5, 1)
            cpio.char_device("dev/null", 1, 3, mode=0o666)
            cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
            cpio.symlink("bin/sh", "busybox")
            cpio.file("bin/smig-guest", guest_bin.read_bytes(), 0o755)
            cpio.file("init", _asset("init"), 0o755)
            order = []
            for mod in VIRTIO_MODULES:
                ko = modroot / f"{mod}.ko"
                if not ko.exists():
                    raise ImageError(f"kernel module {mod}.ko is not in {deb.name}")
                base = Path(mod).name
                cpio.file(f"lib/modules/{base}.ko", ko.read_bytes())
                order.append(base)
            cpio.file("lib/modules/order", ("\n".join(order) + "\n").encode())
            cpio.close()
            with gzip.GzipFile(out / "initrd.gz", "wb", mtime=0) as gz:
                gz.write(initrd.getvalue())
            shutil.copyfile(kernels[0], out / "vmlinuz")
            (out / "manifest.json").write_text(
                json.dumps(
                    {
                        "digest": digest,
                        "kernel_package": deb.name,
                        "kernel_release": release,
                        "initrd_sha256": _sha256(out / "initrd.gz"),
                        "kernel_sha256": _sha256(out / "vmlinuz"),
                    },
                    indent=2,
                )
                + "\n"
            )
            # Swap in the new image whole, so a reader never sees half of one.
            old = self.image_dir.with_name(".old")
            if old.exists():
                shutil.rmtree(old)
            if self.image_dir.exists():
                self.image_dir.rename(old)
            out.rename(self.image_dir)
            if old.exists():
                shutil.rmtree(old)
        self._progress(f"guest image ready in {self.image_dir}")


def _asset(name: str) -> bytes:
    return resources.files("smig.guest").joinpath("files", name).read_bytes()

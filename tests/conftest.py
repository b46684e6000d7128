"""Fixtures: a short-lived SMIG home per test, the real guest image, and a session-wide check
that the tests leave no QEMU process, socket or temporary file behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smig.guest.image import GuestImage, ImageBuilder
from smig.hypervisor import process
from smig.hypervisor.qemu import QemuConfig, QemuDriver
from smig.lab import xen_host
from smig.lab.xen_host import XenHost, XenHostSpec
from smig.lab.xen_image import XenHostImage, XenImageBuilder
from smig.paths import smig_cache
from smig.pki import ensure_local_migration_tls
from tests.helpers import qemu_pids

_TMP = Path(tempfile.gettempdir())


def _tmp_entries() -> set[str]:
    return {p.name for p in _TMP.iterdir() if not p.name.startswith("pytest-of-")}


@pytest.fixture(scope="session")
def session_root() -> Iterator[Path]:
    """A short root for every test's SMIG_HOME (QEMU's socket paths must stay under 108 bytes)."""
    before = _tmp_entries()
    root = Path(tempfile.mkdtemp(prefix="smig-t"))
    yield root
    leftovers = qemu_pids(str(root))
    for pid in leftovers:
        asyncio.run(process.terminate(pid, str(root)))
    sockets = [str(p) for p in root.rglob("*") if p.is_socket()]
    shutil.rmtree(root, ignore_errors=True)
    new_tmp = _tmp_entries() - before
    assert not leftovers, f"tests left QEMU processes running: {leftovers}"
    assert not sockets, f"tests left sockets behind: {sockets}"
    assert not new_tmp, f"tests left temporary files in {_TMP}: {sorted(new_tmp)}"


@pytest.fixture(scope="session")
def xen_image() -> XenHostImage:
    """The real nested Xen host image, built once (a no-op when `make setup` built it)."""
    image, _ = XenImageBuilder(smig_cache()).ensure()
    return image


@pytest.fixture(scope="session")
def xen_host_running(
    xen_image: XenHostImage, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[XenHost]:
    """One nested Xen host for the session (its boot takes about 35 s under TCG), with the guest
    image shared into dom0 at the path it has here."""
    images = guest_image.kernel.parent.parent
    spec = XenHostSpec("t1", tmp_path_factory.mktemp("xh"), shares=((images, str(images)),))
    host = asyncio.run(xen_host.boot(xen_image, spec))
    try:
        yield host
    finally:
        asyncio.run(xen_host.stop(host))
        assert not process.alive(host.pid), "the nested Xen host's QEMU survived its stop"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The real guest image, built once (a no-op when `make setup` built it already)."""
    image, _ = ImageBuilder(smig_cache()).ensure()
    return image


_counter = iter(range(1_000_000))


@pytest.fixture
def home(session_root: Path) -> Path:
    path = session_root / f"h{next(_counter)}"
    path.mkdir()
    return path


def make_driver(home: Path, *, tls_dir: Path | None = None) -> QemuDriver:
    tls = ensure_local_migration_tls(tls_dir or home)
    return QemuDriver(QemuConfig(home=home, cache=smig_cache(), tls=tls))


@pytest.fixture
def driver(home: Path, guest_image: GuestImage) -> Iterator[QemuDriver]:
    """A QEMU driver over the test's own home; every VM left at the end is stopped."""
    d = make_driver(home)
    yield d
    _stop_all(d, home)


def _stop_all(d: QemuDriver, home: Path) -> None:
    """Stop every VM ``d`` holds; fail if a QEMU of this home survives it."""
    for info in asyncio.run(d.list()):
        asyncio.run(d.stop(info.name))
    leftovers = qemu_pids(str(home))
    assert not leftovers, f"QEMU processes survived stop(): {leftovers}"


@pytest.fixture
def cli_env(home: Path, guest_image: GuestImage) -> Iterator[dict[str, str]]:
    """Environment for running the `smig` command against the test's home."""
    env = dict(os.environ, SMIG_HOME=str(home), SMIG_CACHE=str(smig_cache()))
    yield env
    _stop_all(QemuDriver(QemuConfig(home=home, cache=smig_cache())), home)

"""The guest image: built from Debian's kernel package and busybox, cached until an input changes."""

from __future__ import annotations

import gzip

from smig.guest.image import GuestImage, ImageBuilder
from smig.paths import smig_cache
from tests.test_units import _read_cpio


def test_image_is_cached_and_holds_the_workload(guest_image: GuestImage) -> None:
    again, built = ImageBuilder(smig_cache()).ensure()
    assert not built, "an unchanged image must not be rebuilt"
    assert again.digest == guest_image.digest
    assert "cloud-amd64" in guest_image.kernel_package
    entries = _read_cpio(gzip.decompress(guest_image.initrd.read_bytes()))
    for name in ("init", "bin/busybox", "bin/smig-guest", "dev/console", "lib/modules/virtio_net.ko"):
        assert name in entries, f"{name} missing from the initramfs"
    assert b"smig-guest dirty" in entries["init"][1] and b"smig-guest heartbeat" in entries["init"][1]
    assert guest_image.kernel.read_bytes()[0x202:0x206] == b"HdrS", "not a bzImage kernel"

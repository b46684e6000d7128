"""``smig image``: build and inspect the guest image, and the nested Xen host image."""

from __future__ import annotations

import typer

from smig.cli.common import emit_json, err, fail, out
from smig.errors import SmigError
from smig.guest.image import GuestImage, ImageBuilder
from smig.lab.xen_image import XenImageBuilder
from smig.paths import smig_cache

app = typer.Typer(
    help="Build and inspect the guest image (Debian cloud kernel + busybox initramfs) and the Xen host image.",
    no_args_is_help=True,
)


def _image_json(image: GuestImage) -> dict[str, str]:
    return {
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "digest": image.digest,
        "kernel_package": image.kernel_package,
    }


@app.command()
def build(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the inputs did not change."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build the guest image into the cache, or do nothing if it is up to date."""
    builder = ImageBuilder(smig_cache(), progress=lambda msg: err.print(f"[dim]image:[/dim] {msg}"))
    try:
        image, built = builder.ensure(force=force)
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json({**_image_json(image), "built": built})
    else:
        out.print(f"guest image {'built' if built else 'up to date'}: {image.kernel.parent} ({image.kernel_package})")


@app.command()
def show(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the guest image in the cache."""
    try:
        image = ImageBuilder(smig_cache()).load()
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(_image_json(image))
    else:
        out.print(
            f"kernel  {image.kernel}\ninitrd  {image.initrd}\npackage {image.kernel_package}\ndigest  {image.digest}"
        )


@app.command()
def xen(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the inputs did not change."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build the nested Xen host image (Xen 4.17.5, dom0's kernel, a dom0 root disk) into the cache.

    Needs root and Debian's main archive: debootstrap takes about two minutes the first time;
    after that it does nothing until an input changes. `smig lab up --hypervisor xen` boots it.
    """
    builder = XenImageBuilder(smig_cache(), progress=lambda msg: err.print(f"[dim]xen image:[/dim] {msg}"))
    try:
        image, built = builder.ensure(force=force)
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(
            {
                "xen": str(image.xen),
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "disk": str(image.disk),
                "versions": image.versions,
                "digest": image.digest,
                "built": built,
            }
        )
    else:
        out.print(
            f"Xen host image {'built' if built else 'up to date'}: {image.disk.parent} "
            f"(Xen {image.xen_version}, dom0 kernel {image.versions.get('kernel', '?')})"
        )

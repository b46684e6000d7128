"""``smig image``: build and inspect the guest image."""

from __future__ import annotations

import typer

from smig.cli.common import emit_json, err, fail, out
from smig.errors import SmigError
from smig.guest.image import GuestImage, ImageBuilder
from smig.paths import smig_cache

app = typer.Typer(
    help="Build and inspect the guest image (Debian cloud kernel + busybox initramfs).", no_args_is_help=True
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

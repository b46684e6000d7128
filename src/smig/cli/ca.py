"""``smig ca``: the region CA that decides who may speak to the RC-TCB, and as what.

``init`` creates the CA once per region; ``issue`` signs a certificate for one party. Both print
a table-free summary, or one JSON document with ``--json``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from cryptography import x509
from rich.markup import escape

from smig.cli.common import emit_json, fail, out
from smig.errors import SmigError
from smig.rctcb.ca import Role, default_ca_dir, fingerprint, init_ca, issue_identity, load_ca

app = typer.Typer(
    help=(
        "The region CA. The RC-TCB speaks HTTPS with mutual TLS: every party shows a certificate "
        "signed by this CA, whose role says what it may do. An agent (one per host, named by its "
        "host id) submits integrity reports and fetches its assignments; an operator enrols hosts "
        "and acts on the region; rctcb is the RC-TCB server itself.\n\n"
        "Start with 'smig ca init --region NAME', then 'smig ca issue' once per party."
    ),
    no_args_is_help=True,
)

_DIR = typer.Option(None, "--dir", help="The CA directory (ca.pem, ca-key.pem, issued/); default $SMIG_HOME/rctcb/ca.")
_JSON = typer.Option(False, "--json", help="Print one JSON document (for scripts) instead of text.")


@app.command()
def init(
    region: str = typer.Option(..., "--region", help="The region this CA vouches for (e.g. eu-1)."),
    directory: Path | None = _DIR,
    days: int = typer.Option(3650, "--days", min=1, help="How long the CA stays valid."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing CA key. Every certificate it issued stops being accepted."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {ca, region, fingerprint} as JSON."),
) -> None:
    """Create the region CA: a key that never leaves this directory (0600) and ca.pem to hand out.

    Copy ca.pem to every host and operator: they trust the RC-TCB through it, and it through them.
    Compare the printed SHA-256 fingerprint when you do. Refuses to replace an existing CA without --force.
    """
    where = directory or default_ca_dir()
    try:
        ca_path = init_ca(where, region, days=days, force=force)
        cert, _ = load_ca(where)
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json({"ca": str(ca_path), "region": region, "fingerprint": fingerprint(cert)})
        return
    out.print(f"Region CA for [bold]{escape(region)}[/] created in {escape(str(where))}")
    out.print(f"  hand out:    {escape(str(ca_path))}", soft_wrap=True)
    out.print(f"  fingerprint: sha256 {fingerprint(cert)}", soft_wrap=True)


@app.command()
def issue(
    name: str = typer.Argument(
        ..., help="Who the certificate names: an agent's host id (e.g. h1), an operator's name."
    ),
    role: Role = typer.Option(
        ...,
        "--role",
        help=(
            "agent: submits reports and fetches assignments for host NAME; "
            "operator: enrols hosts and acts on the region; rctcb: the RC-TCB server."
        ),
    ),
    directory: Path | None = _DIR,
    out_dir: Path | None = typer.Option(
        None, "--out", help="Write cert.pem and key.pem here instead of <CA dir>/issued/NAME."
    ),
    dns: list[str] = typer.Option(
        [], "--dns", help="A DNS name the server answers to (repeatable; rctcb default: NAME and localhost)."
    ),
    ip: list[str] = typer.Option(
        [], "--ip", help="An IP address the server answers on (repeatable; rctcb default: 127.0.0.1 and ::1)."
    ),
    days: int = typer.Option(825, "--days", min=1, help="How long the certificate stays valid."),
    as_json: bool = typer.Option(
        False, "--json", help="Print {name, role, cert, key, ca, not_after} as JSON (not_after in ISO 8601 UTC)."
    ),
) -> None:
    """Issue a certificate and key for one party, signed by the region CA.

    Give the party its cert.pem, key.pem (keep it 0600, it is who they are) and the CA's ca.pem.
    The role is written into the certificate: the RC-TCB reads it on every connection.
    Issuing a NAME again replaces its files (the old certificate stays valid until it expires).
    """
    where = directory or default_ca_dir()
    try:
        files = issue_identity(where, name, role, out=out_dir, dns=dns, ips=ip, days=days)
        not_after = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
    except SmigError as e:
        fail(str(e))
    if as_json:
        emit_json(
            {
                "name": name,
                "role": role.value,
                "cert": str(files.cert),
                "key": str(files.key),
                "ca": str(files.ca),
                "not_after": not_after.isoformat(),
            }
        )
        return
    out.print(f"Issued [bold]{role.value}[/] certificate for [bold]{escape(name)}[/], valid until {not_after:%Y-%m-%d}")
    for label, path in (("cert", files.cert), ("key", files.key), ("ca", files.ca)):
        out.print(f"  {label + ':':5} {escape(str(path))}", soft_wrap=True)

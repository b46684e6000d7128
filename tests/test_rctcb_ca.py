"""The region CA: who it vouches for, whom it refuses, and a real mutual-TLS handshake with its certificates."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smig.errors import ConfigError
from smig.rctcb.ca import (
    Identity,
    IssuedFiles,
    Role,
    client_ssl_context,
    identity_of,
    init_ca,
    issue_identity,
    load_ca,
    server_ssl_context,
)

SMIG = str(Path(sys.executable).parent / "smig")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _cert(files: IssuedFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


@pytest.fixture
def region(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca(directory, "eu-1")
    return directory


def test_init_then_issue_each_role_with_private_keys(region: Path) -> None:
    ca_cert, _ = load_ca(region)
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SMIG region CA eu-1"
    assert _mode(region / "ca.pem") == 0o644 and _mode(region / "ca-key.pem") == 0o600

    issued = {}
    for name, role in (("h1", Role.AGENT), ("alice", Role.OPERATOR), ("rctcb", Role.RCTCB)):
        issued[role] = files = issue_identity(region, name, role)
        assert files == IssuedFiles(
            region / "issued" / name / "cert.pem", region / "issued" / name / "key.pem", region / "ca.pem"
        )
        assert _mode(files.key) == 0o600
        assert identity_of(files.cert.read_text(), ca_cert) == Identity(role, name)

    server = _cert(issued[Role.RCTCB])
    usages = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    # An agent serves the RC-TCB's orders and incoming migrations; an operator is only a client.
    agent = _cert(issued[Role.AGENT])
    assert list(agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    operator = _cert(issued[Role.OPERATOR])
    assert list(operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_issue_to_another_directory_with_named_sans(region: Path, tmp_path: Path) -> None:
    files = issue_identity(
        region, "rc-a", Role.RCTCB, out=tmp_path / "ship", dns=["rc.example"], ips=["10.0.0.5"], days=30
    )
    assert files.cert == tmp_path / "ship" / "cert.pem" and _mode(files.key) == 0o600
    san = _cert(files).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["rc.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert not (region / "issued" / "rc-a").exists()


def test_a_certificate_from_another_region_ca_is_refused(region: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, "eu-1")  # the same region name, so the same issuer name: only the key differs
    foreign = issue_identity(other, "h1", Role.AGENT)
    ca_cert, _ = load_ca(region)
    with pytest.raises(ConfigError, match="not signed by this region's CA"):
        identity_of(foreign.cert.read_bytes(), ca_cert)


def test_expired_not_yet_valid_garbage_and_the_ca_itself_are_refused(region: Path) -> None:
    ca_cert, _ = load_ca(region)
    pem = issue_identity(region, "h1", Role.AGENT, days=1).cert.read_bytes()
    assert identity_of(pem, ca_cert).name == "h1"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with pytest.raises(ConfigError, match="valid from"):
        identity_of(pem, ca_cert, now=later)
    with pytest.raises(ConfigError, match="valid from"):
        identity_of(pem, ca_cert, now=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
    for garbage in ("not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", b""):
        with pytest.raises(ConfigError, match="not a readable X"):
            identity_of(garbage, ca_cert)
    with pytest.raises(ConfigError, match="CA certificate is not an identity"):
        identity_of((region / "ca.pem").read_bytes(), ca_cert)


def test_init_refuses_to_replace_a_ca_key_unless_forced(region: Path) -> None:
    key_before = (region / "ca-key.pem").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        init_ca(region, "eu-1")
    assert (region / "ca-key.pem").read_bytes() == key_before
    init_ca(region, "eu-1", force=True)
    assert (region / "ca-key.pem").read_bytes() != key_before
    assert _mode(region / "ca-key.pem") == 0o600


def test_bad_names_and_a_missing_ca_are_config_errors(region: Path, tmp_path: Path) -> None:
    for bad in ("H1", "../h1", "a/b", "", "x" * 64):
        with pytest.raises(ConfigError, match="bad name"):
            issue_identity(region, bad, Role.AGENT)
    with pytest.raises(ConfigError, match=r"no region CA in .*smig ca init"):
        issue_identity(tmp_path / "nowhere", "h1", Role.AGENT)
    with pytest.raises(ConfigError, match=r"127\.0\.0\.300"):
        issue_identity(region, "rc", Role.RCTCB, ips=["127.0.0.300"])


def _serve_once(
    context: ssl.SSLContext, ca_cert: x509.Certificate, listener: socket.socket, seen: list[object]
) -> None:
    """Accept one connection; record the peer's identity (DER, as the service sees it) or the failure."""
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            seen.append(identity_of(der, ca_cert))
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError) as e:
        seen.append(e)
    finally:
        conn.close()


def _handshake(region: Path, server: ssl.SSLContext, client: ssl.SSLContext | None) -> tuple[object, bytes | Exception]:
    """One loopback connection to ``server``: what it saw of the client, and what the client read (or how it failed).

    ``client`` None: TLS that trusts the region's server but shows no certificate of its own.
    """
    seen: list[object] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_once, args=(server, load_ca(region)[0], listener, seen))
        thread.start()
        got: bytes | Exception
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                if client is None:
                    client = ssl.create_default_context(cafile=str(region / "ca.pem"))
                with client.wrap_socket(raw, server_hostname="localhost") as tls:
                    got = tls.recv(2)
        except (ssl.SSLError, OSError) as e:
            got = e
        thread.join(10)
    return seen[0], got


def test_mutual_tls_admits_the_region_and_refuses_foreign_or_missing_certificates(region: Path, tmp_path: Path) -> None:
    srv = issue_identity(region, "rctcb", Role.RCTCB)
    server = server_ssl_context(srv.cert, srv.key, srv.ca)
    assert server.verify_mode == ssl.CERT_REQUIRED and server.minimum_version >= ssl.TLSVersion.TLSv1_2

    agent = issue_identity(region, "h1", Role.AGENT)
    seen, got = _handshake(region, server, client_ssl_context(agent.cert, agent.key, agent.ca))
    assert seen == Identity(Role.AGENT, "h1") and got == b"ok"

    init_ca(tmp_path / "other", "eu-1")
    stranger = issue_identity(tmp_path / "other", "h1", Role.AGENT)
    # The stranger trusts our ca.pem (it knows the server) but its own certificate is foreign.
    seen, got = _handshake(region, server, client_ssl_context(stranger.cert, stranger.key, region / "ca.pem"))
    assert isinstance(seen, ssl.SSLError) and isinstance(got, Exception)

    seen, got = _handshake(region, server, None)
    assert isinstance(seen, ssl.SSLError) and isinstance(got, Exception)


def test_client_checks_the_server_name(region: Path) -> None:
    srv = issue_identity(region, "rctcb", Role.RCTCB, dns=["rc.example"], ips=[])
    agent = issue_identity(region, "h1", Role.AGENT)
    server = server_ssl_context(srv.cert, srv.key, srv.ca)
    _, got = _handshake(region, server, client_ssl_context(agent.cert, agent.key, agent.ca))
    assert isinstance(got, ssl.SSLCertVerificationError) and "localhost" in str(got)


def test_missing_tls_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load TLS credentials"):
        server_ssl_context(tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem")


def _smig(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SMIG_HOME=str(home))
    return subprocess.run([SMIG, "ca", *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_cli_init_and_issue_print_json_and_fail_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = _smig(home, "issue", "h1", "--role", "agent", "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smig: error: no region CA in") and "smig ca init" in lines[0]

    done = _smig(home, "init", "--region", "eu-1", "--json")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    ca_dir = home / "rctcb" / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    assert made["ca"] == str(ca_dir / "ca.pem") and made["region"] == "eu-1"
    assert made["fingerprint"] == ca_cert.fingerprint(hashes.SHA256()).hex()

    again = _smig(home, "init", "--region", "eu-1")
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    done = _smig(home, "issue", "h1", "--role", "agent", "--json")
    assert done.returncode == 0, done.stderr
    issued = json.loads(done.stdout)
    assert issued["name"] == "h1" and issued["role"] == "agent" and issued["ca"] == made["ca"]
    assert issued["key"] == str(ca_dir / "issued" / "h1" / "key.pem") and _mode(Path(issued["key"])) == 0o600
    cert_pem = Path(issued["cert"]).read_bytes()
    assert identity_of(cert_pem, ca_cert) == Identity(Role.AGENT, "h1")
    assert (
        dt.datetime.fromisoformat(issued["not_after"]) == x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
    )


def test_cli_help_says_what_each_role_may_do(tmp_path: Path) -> None:
    text = _smig(tmp_path, "issue", "--help").stdout
    for words in ("submits reports", "enrols hosts", "RC-TCB server", "--dns", "--ip", "--out", "--json"):
        assert words in " ".join(text.replace("│", " ").split()), words

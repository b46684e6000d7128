"""A monitor's Ed25519 keys: generated here, kept as 0600 PEM files, enrolled by their public half.

The private key signs the monitor's reports (:mod:`smig.aim.report`); the RC-TCB keeps only the
public key, in the monitor's IVT row.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from smig.errors import ConfigError

log = logging.getLogger(__name__)


def generate_key() -> Ed25519PrivateKey:
    """A new Ed25519 key for a monitor."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path | str) -> None:
    """Write ``key`` to ``path`` as unencrypted PKCS#8 PEM, readable by its owner only (0600).

    The file is replaced atomically: written to a 0600 temporary file in the same directory, then
    renamed over ``path``, so a reader sees either the old key or the whole new one, and the key is
    never readable by others, not even for a moment. Raises :class:`ConfigError` if it cannot be
    written.
    """
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    except OSError as e:
        raise ConfigError(f"cannot write private key {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"cannot write private key {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_private_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, generated there (mode 0600, in a 0700 directory) on first use.

    Raises:
        ConfigError: the key file cannot be written or read.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_private_key(generate_key(), path)
    return load_private_key(path)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 key that :func:`save_private_key` wrote to ``path``.

    Raises :class:`ConfigError` if the file cannot be read, is not an unencrypted PEM private key,
    or holds a key of another kind. Logs a warning if others may read it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read private key {path}: {e.strerror or e}") from e
    if mode & 0o077:
        log.warning("private key %s is readable by others (mode %o); run: chmod 600 %s", path, mode & 0o777, path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"private key {path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is a {type(key).__name__}, not an Ed25519 key; generate a new one")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The public half of ``key`` as PEM (SubjectPublicKeyInfo): what a monitor enrols with the RC-TCB."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key_pem(data: bytes) -> Ed25519PublicKey:
    """The Ed25519 public key in ``data`` (PEM). Raises :class:`ConfigError` if it is not one."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key is a {type(key).__name__}, not an Ed25519 key")
    return key

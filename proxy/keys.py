"""The Ed25519 key pair that signs audit checkpoints (``pgveil keygen``).

The audit trail (:mod:`proxy.audit`) signs a checkpoint record every N records or T seconds with
the private key; ``pgveil audit verify`` (:mod:`proxy.audit_verify`) checks those signatures
with the public key. The private key stays on the proxy host (mode 0600); the public key goes
to whoever reviews the log. Keys are plain PEM files so that ``openssl pkey -in audit.key
-pubout`` and friends can inspect them:

* ``audit.key`` — PKCS#8 PEM, unencrypted (the proxy must start unattended), mode 0600;
* ``audit.pub`` — SubjectPublicKeyInfo PEM, mode 0644.

Every checkpoint names the key that signed it by :func:`key_fingerprint` (the first 16 hex digits
of the SHA-256 of the raw 32-byte public key), so a verifier given the wrong key says so instead
of reporting every signature as forged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

log = logging.getLogger(__name__)

PRIVATE_NAME = "audit.key"
PUBLIC_NAME = "audit.pub"


class KeyFileError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key (a configuration error)."""


def generate_keypair(out_dir: Path | str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``out_dir/audit.key`` (0600) and ``out_dir/audit.pub``; return both paths.

    Refuses to replace an existing key unless ``overwrite``: replacing the signing key of a
    running deployment silently would make every older checkpoint unverifiable with the new
    public key.

    >>> import tempfile; d = tempfile.mkdtemp()
    >>> key, pub = generate_keypair(d)
    >>> oct(key.stat().st_mode & 0o777), pub.name
    ('0o600', 'audit.pub')
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not overwrite:
        for p in (key_path, pub_path):
            if p.exists():
                raise FileExistsError(f"{p} already exists (use --force to replace it)")
    private = Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_file(key_path, key_pem, 0o600)
    _write_file(pub_path, pub_pem, 0o644)
    return key_path, pub_path


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file + rename so a crash never leaves half a key; set ``mode`` first."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; the key must be 0600
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Load the PEM PKCS#8 Ed25519 private key; warn when others can read it."""
    p = Path(path)
    try:
        data = p.read_bytes()
        mode = p.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {p}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("signing key %s is readable by group/others (mode %o); chmod 600 it",
                    p, mode & 0o777)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{p} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 key (pgveil keygen makes one)")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Load the PEM Ed25519 public key; ``path`` may be the key directory (``DIR/audit.pub``)."""
    p = Path(path)
    if p.is_dir():
        p = p / PUBLIC_NAME
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {p}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{p} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} is not an Ed25519 public key (pgveil keygen makes one)")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key; names the key in checkpoints."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]

"""Ed25519 signatures of ``manifest.json``: the manifest lists every file's SHA-256, so one
signature over its exact bytes seals the whole package.

Files: the private key is PEM (PKCS#8, unencrypted; keep it off the targets, mode 0600), the
public key PEM (SubjectPublicKeyInfo), the signature ``manifest.json.sig`` the raw 64 signature
bytes, so ``openssl pkeyutl -verify -pubin -inkey public.pem -rawin -in manifest.json -sigfile
manifest.json.sig`` checks a package without modelkiln.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelkiln.delivery.errors import KeyFileError, SignatureError
from modelkiln.delivery.manifest import MANIFEST_FILE, SIGNATURE_FILE

log = logging.getLogger(__name__)
SIGNATURE_BYTES = 64


def generate_signing_key(
    private_path: Path, public_path: Path | None = None, overwrite: bool = False
) -> Path:
    """Write a new Ed25519 key pair: ``private_path`` (PEM, mode 0600) and ``public_path``
    (default ``<private>.pub``); returns the public key's path. Existing files are kept unless
    ``overwrite``."""
    public_path = public_path or private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise KeyFileError(f"{p} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(private_path, pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public_path


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only (created 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"signing key not found: {path}") from None
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 key (kiln keygen sign makes one)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"public key not found: {path}") from None
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_manifest(package_dir: Path, private_key: Path) -> Path:
    """Sign ``package_dir/manifest.json`` as it is on disk; writes ``manifest.json.sig``."""
    key = load_private_key(private_key)
    manifest = Path(package_dir) / MANIFEST_FILE
    sig = Path(package_dir) / SIGNATURE_FILE
    sig.write_bytes(key.sign(manifest.read_bytes()))
    return sig


def verify_manifest(package_dir: Path, public_key: Path) -> None:
    """Raise SignatureError unless ``manifest.json.sig`` is a valid signature of ``manifest.json``
    by ``public_key``'s private key."""
    key = load_public_key(public_key)
    manifest = Path(package_dir) / MANIFEST_FILE
    sig = Path(package_dir) / SIGNATURE_FILE
    if not sig.is_file():
        raise SignatureError(f"{sig} is missing: the package is not signed, and a public key was given")
    signature = sig.read_bytes()
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{sig}: {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_BYTES}")
    try:
        key.verify(signature, manifest.read_bytes())
    except InvalidSignature:
        raise SignatureError(
            f"{sig} does not verify {manifest} with {public_key}: the manifest changed after signing, "
            "or it was signed with another key"
        ) from None

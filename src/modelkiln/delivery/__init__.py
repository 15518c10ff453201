"""Delivery you can trust: sealed packages (manifest, golden sets, signature), encrypted models
decrypted in memory only, and ``verify_package`` for the target machine. See docs/delivery.md."""

from __future__ import annotations

from modelkiln.delivery.crypto import (
    ModelKey,
    decrypt_bytes,
    encrypt_file,
    encrypt_model,
    generate_model_key,
    is_encrypted,
    load_encrypted_model,
    load_key,
    model_source,
    resolve_model_key,
)
from modelkiln.delivery.errors import (
    DecryptError,
    DeliveryError,
    GoldenError,
    IntegrityError,
    KeyFileError,
    ManifestError,
    SignatureError,
)
from modelkiln.delivery.findings import Finding, Status
from modelkiln.delivery.manifest import (
    Manifest,
    ModelRecord,
    build_manifest,
    check_file_against_manifest,
    check_files,
    find_manifest,
    read_manifest,
)
from modelkiln.delivery.seal import seal_package
from modelkiln.delivery.signing import generate_signing_key, sign_manifest, verify_manifest
from modelkiln.delivery.verify import VerifyReport, verify_package

__all__ = [
    "DecryptError",
    "DeliveryError",
    "Finding",
    "GoldenError",
    "IntegrityError",
    "KeyFileError",
    "Manifest",
    "ManifestError",
    "ModelKey",
    "ModelRecord",
    "SignatureError",
    "Status",
    "VerifyReport",
    "build_manifest",
    "check_file_against_manifest",
    "check_files",
    "decrypt_bytes",
    "encrypt_file",
    "encrypt_model",
    "find_manifest",
    "generate_model_key",
    "generate_signing_key",
    "is_encrypted",
    "load_encrypted_model",
    "load_key",
    "model_source",
    "read_manifest",
    "resolve_model_key",
    "seal_package",
    "sign_manifest",
    "verify_manifest",
    "verify_package",
]

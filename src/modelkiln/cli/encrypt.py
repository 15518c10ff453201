"""``kiln encrypt MODEL --key F``: an ONNX model (and its external-data weights) encrypted with
AES-256-GCM; ``kiln keygen sign|model OUT``: keys for signing packages and encrypting models."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from modelkiln.delivery.crypto import encrypt_model, generate_model_key, load_key, model_files
from modelkiln.delivery.signing import generate_signing_key
from modelkiln.log import console


def encrypt_cmd(
    model: Path = typer.Argument(..., help="ONNX model file."),
    key: Path = typer.Option(..., "--key", help="Model key file (32 raw bytes, 64 hex digits or base64)."),
    out: Path = typer.Option(None, "-o", "--out", help="Encrypted file (default: MODEL.enc)."),
    remove: bool = typer.Option(False, "--remove", help="Delete the plaintext model (and its data) after."),
) -> None:
    """Encrypt a model with AES-256-GCM; serve, verify, predict, bench and chat open it with --model-key.

    Each external-data file L is written as L.enc beside OUT; decryption happens in memory only."""
    plaintext = model_files(model)
    written = encrypt_model(model, out, load_key(key))
    if remove:
        for plain in plaintext:
            plain.unlink()
            console.print(f"removed {plain}")
    for path in written:
        console.print(f"wrote {path}")


class KeyKind(str, enum.Enum):
    SIGN = "sign"
    MODEL = "model"


def keygen_cmd(
    kind: KeyKind = typer.Argument(..., help="sign: Ed25519 key pair; model: AES-256 model key."),
    out: Path = typer.Argument(..., help="Key file to write (sign also writes OUT.pub)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
) -> None:
    """Make a key: written readable by its owner only; keep it off the machines that only verify."""
    if kind is KeyKind.SIGN:
        public = generate_signing_key(out, overwrite=force)
        console.print(f"wrote {out} (private: sign with it) and {public} (public: verify with it)")
    else:
        key = generate_model_key(out, overwrite=force)
        console.print(f"wrote {out} (model key id {key.key_id})")

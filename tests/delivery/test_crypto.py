"""Encrypted models: the documented file format, in-memory decryption with identical outputs,
one clear error for a wrong key or a changed byte (naming the file, never the key), key formats,
and wolfSSL's own AES-GCM reading our files."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from delivery_packages import classifier, feeds

from modelkiln.delivery.crypto import (
    KEY_ENV,
    KEY_FILE_ENV,
    MAGIC,
    ModelKey,
    decrypt_bytes,
    encrypt_file,
    encrypt_model,
    generate_model_key,
    is_encrypted,
    load_encrypted_model,
    load_key,
    model_source,
    parse_key,
    read_header,
    resolve_model_key,
)
from modelkiln.delivery.errors import DecryptError, KeyFileError
from modelkiln.runtime.backends.onnxruntime import OrtBackend

KEY = ModelKey(bytes(range(32)), "test key")


def split(blob: bytes) -> tuple[bytes, dict[str, object], bytes, bytes, bytes]:
    """The file format as docs/delivery.md states it: (aad, header, nonce, ciphertext, tag)."""
    magic, version, hlen = struct.unpack_from("<8sHI", blob)
    assert magic == MAGIC == b"\x89KILNENC" and version == 1
    aad = blob[: 14 + hlen]
    header = json.loads(blob[14 : 14 + hlen])
    nonce = blob[14 + hlen : 26 + hlen]
    return aad, header, nonce, blob[26 + hlen : -16], blob[-16:]


def test_file_format_is_as_documented(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"hello model" * 100)
    enc = encrypt_file(src, None, KEY)
    assert enc.name == "model.onnx.enc" and is_encrypted(enc) and not is_encrypted(src)
    aad, header, nonce, body, tag = split(enc.read_bytes())
    assert header == {"alg": "AES-256-GCM", "name": "model.onnx", "size": 1100, "key_id": KEY.key_id}
    assert len(nonce) == 12 and len(body) == 1100 and len(tag) == 16
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    assert AESGCM(KEY.secret).decrypt(nonce, body + tag, aad) == src.read_bytes()
    assert decrypt_bytes(enc, KEY) == src.read_bytes()
    assert read_header(enc).size == 1100


def test_nonces_are_fresh(tmp_path: Path) -> None:
    src = tmp_path / "m.bin"
    src.write_bytes(b"x" * 64)
    a = split(encrypt_file(src, tmp_path / "a.enc", KEY).read_bytes())[2]
    b = split(encrypt_file(src, tmp_path / "b.enc", KEY).read_bytes())[2]
    assert a != b


@pytest.mark.parametrize("where", ["magic", "header", "nonce", "ciphertext", "tag"])
def test_a_changed_byte_anywhere_is_one_clear_error(tmp_path: Path, where: str) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"weights" * 50)
    enc = encrypt_file(src, None, KEY)
    blob = bytearray(enc.read_bytes())
    hlen = struct.unpack_from("<I", blob, 10)[0]
    offset = {
        "magic": 3,
        "header": 14 + hlen - 3,
        "nonce": 14 + hlen + 2,
        "ciphertext": 14 + hlen + 40,
        "tag": len(blob) - 2,
    }[where]
    blob[offset] ^= 0x04
    enc.write_bytes(bytes(blob))
    with pytest.raises(DecryptError, match="cannot decrypt .*model.onnx.enc") as exc:
        decrypt_bytes(enc, KEY)
    assert KEY.secret.hex() not in str(exc.value)


def test_truncated_file(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(b"a" * 100)
    enc = encrypt_file(src, None, KEY)
    enc.write_bytes(enc.read_bytes()[:-5])
    with pytest.raises(DecryptError, match="truncated"):
        decrypt_bytes(enc, KEY)


def test_wrong_key_names_the_file_and_key_ids_never_the_key(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"secret weights")
    enc = encrypt_file(src, None, KEY)
    wrong = ModelKey(bytes(32), "wrong")
    with pytest.raises(DecryptError) as exc:
        decrypt_bytes(enc, wrong)
    text = str(exc.value)
    assert str(enc) in text and "wrong key" in text and KEY.key_id in text and wrong.key_id in text
    for secret in (KEY.secret, wrong.secret):
        assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
    assert "secret" not in repr(wrong) and wrong.secret.hex() not in repr(wrong)


def test_decrypted_model_gives_bit_identical_outputs_and_writes_nothing(tmp_path: Path) -> None:
    plain = classifier(tmp_path / "m" / "model.onnx", int8=True)
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    [enc] = encrypt_model(plain, enc_dir / "model.onnx.enc", KEY)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    source = load_encrypted_model(enc, KEY)
    assert isinstance(source, bytes)
    got, want = OrtBackend.load(source), OrtBackend.load(plain)
    for feed in feeds():
        assert np.array_equal(got.infer(feed)["logits"], want.infer(feed)["logits"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_external_data_is_encrypted_and_folded_in_memory(tmp_path: Path) -> None:
    plain = classifier(tmp_path / "m" / "model.onnx", external=True)
    assert (tmp_path / "m" / "model.onnx.data").is_file()
    written = encrypt_model(plain, None, KEY)
    assert [p.name for p in written] == ["model.onnx.enc", "model.onnx.data.enc"]
    assert read_header(written[0]).external_data == ("model.onnx.data",)
    source = load_encrypted_model(written[0], KEY)
    assert isinstance(source, onnx.ModelProto)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in source.graph.initializer)
    got, want = OrtBackend.load(source), OrtBackend.load(plain)
    for feed in feeds():
        assert np.array_equal(got.infer(feed)["logits"], want.infer(feed)["logits"])


def test_a_tampered_data_file_fails_naming_it(tmp_path: Path) -> None:
    plain = classifier(tmp_path / "model.onnx", external=True)
    written = encrypt_model(plain, None, KEY)
    data = bytearray(written[1].read_bytes())
    data[-20] ^= 1
    written[1].write_bytes(bytes(data))
    with pytest.raises(DecryptError, match="model.onnx.data.enc"):
        load_encrypted_model(written[0], KEY)


def test_key_formats(tmp_path: Path) -> None:
    raw = bytes(range(100, 132))
    for name, content in {
        "raw": raw,
        "hex": raw.hex().encode() + b"\n",
        "b64": base64.b64encode(raw) + b"\n",
        "b64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }.items():
        (tmp_path / name).write_bytes(content)
        assert load_key(tmp_path / name).secret == raw, name


def test_bad_key_file_names_file_and_length_not_content(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not-a-key-but-secret-text")
    with pytest.raises(KeyFileError) as exc:
        load_key(bad)
    assert str(bad) in str(exc.value) and "25 bytes" in str(exc.value)
    assert "secret-text" not in str(exc.value)
    with pytest.raises(KeyFileError, match="not found"):
        load_key(tmp_path / "absent.key")


def test_key_from_environment(tmp_path: Path) -> None:
    key = generate_model_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert resolve_model_key(None, {}) is None
    assert resolve_model_key(None, {KEY_FILE_ENV: str(tmp_path / "k")}) == key
    assert resolve_model_key(None, {KEY_ENV: key.secret.hex()}) == key
    other = tmp_path / "other"
    other.write_bytes(bytes(32))
    assert resolve_model_key(other, {KEY_ENV: key.secret.hex()}).secret == bytes(32)  # type: ignore[union-attr]
    with pytest.raises(KeyFileError, match=r"\$KILN_MODEL_KEY"):
        resolve_model_key(None, {KEY_ENV: "short"})


def test_parse_key_refuses_wrong_lengths() -> None:
    with pytest.raises(KeyFileError, match="33 bytes"):
        parse_key(bytes(33), "k")


def test_wolfssl_aes_gcm_decrypts_our_file_format(tmp_path: Path) -> None:
    """wolfSSL (the C library a C++ runtime would link) reads our files: split as documented, AAD =
    magic..header, then AES-256-GCM with the nonce and tag."""
    ciphers = pytest.importorskip("wolfcrypt.ciphers")
    plain = classifier(tmp_path / "model.onnx", int8=True)
    [enc] = encrypt_model(plain, None, KEY)
    aad, header, nonce, body, tag = split(enc.read_bytes())
    gcm = ciphers.AesGcmStream(KEY.secret, nonce)
    gcm.set_aad(aad)
    out = gcm.decrypt(body)
    gcm.final(tag)  # raises on a wrong tag
    assert out == plain.read_bytes() and header["size"] == len(out)
    bad = ciphers.AesGcmStream(KEY.secret, nonce)
    bad.set_aad(aad[:-1] + bytes([aad[-1] ^ 1]))
    bad.decrypt(body)
    with pytest.raises(Exception, match="(?i)error"):
        bad.final(tag)


def test_model_source_passes_plaintext_paths_and_opens_encrypted_files(tmp_path: Path) -> None:
    plain = classifier(tmp_path / "model.onnx")
    assert model_source(plain, None) == plain
    [enc] = encrypt_model(plain, None, KEY)
    with pytest.raises(DecryptError, match="--model-key"):
        model_source(enc, None)
    assert model_source(enc, KEY) == plain.read_bytes()

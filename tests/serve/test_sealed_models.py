"""kiln serve with sealed packages: encrypted models are opened in memory with the model key and
answer exactly as the plaintext model does; a wrong or missing key, a tampered file or a file its
package manifest lists with another hash is refused with one error naming the file (never the
key), and the other models keep serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import add_model, affine_model
from modelkiln.delivery.crypto import ModelKey, encrypt_model, generate_model_key
from modelkiln.delivery.manifest import build_manifest, write_manifest
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.model import LoadPolicy
from modelkiln.serve.server import ModelServer

X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)


def _answer(server: ModelServer, name: str) -> np.ndarray:
    return server.infer(name, {"x": X}).result(timeout=30).outputs["y"]


def _encrypted_repo(root: Path, tmp: Path, key: ModelKey) -> Path:
    """'plain' (scale 2) as model.onnx and 'secret' (scale 3) only as model.onnx.enc."""
    add_model(root, "plain", affine_model(tmp / "p.onnx"), ModelConfig("plain", max_batch_size=8))
    add_model(
        root, "secret", affine_model(tmp / "s.onnx", scale=3.0), ModelConfig("secret", max_batch_size=8)
    )
    model = root / "secret" / "1" / "model.onnx"
    encrypt_model(model, None, key)
    model.unlink()  # only ciphertext ships
    return root


@pytest.fixture
def key(tmp_path: Path) -> ModelKey:
    return generate_model_key(tmp_path / "model.key")


def test_encrypted_model_serves_the_plaintext_answers(tmp_path: Path, key: ModelKey) -> None:
    repo = _encrypted_repo(tmp_path / "repo", tmp_path, key)
    server = ModelServer(str(repo), cores=2, policy=LoadPolicy(model_key=key))
    server.load_all()
    try:
        np.testing.assert_array_equal(_answer(server, "secret"), X * 3 + 1)
        np.testing.assert_array_equal(_answer(server, "plain"), X * 2 + 1)
    finally:
        server.shutdown()


@pytest.mark.parametrize("which", ["missing", "wrong"])
def test_no_or_wrong_key_refuses_that_model_only(tmp_path: Path, key: ModelKey, which: str) -> None:
    repo = _encrypted_repo(tmp_path / "repo", tmp_path, key)
    other = generate_model_key(tmp_path / "other.key") if which == "wrong" else None
    server = ModelServer(str(repo), cores=2, policy=LoadPolicy(model_key=other))
    server.load_all()
    try:
        np.testing.assert_array_equal(_answer(server, "plain"), X * 2 + 1)
        row = next(r for r in server.index() if r["name"] == "secret")
        assert row["state"] == "UNAVAILABLE" and "model.onnx.enc" in row["reason"]
        for secret in (key.secret.hex(), *(() if other is None else (other.secret.hex(),))):
            assert secret not in row["reason"]
    finally:
        server.shutdown()


def _package(root: Path, tmp: Path) -> Path:
    """A package folder holding a repository of two models and a manifest of every file."""
    repo = root / "repository"
    add_model(repo, "a", affine_model(tmp / "a.onnx"), ModelConfig("a", max_batch_size=8))
    add_model(repo, "b", affine_model(tmp / "b.onnx", scale=5.0), ModelConfig("b", max_batch_size=8))
    write_manifest(build_manifest(root, []), root)
    return repo


def test_a_model_its_manifest_lists_with_another_hash_is_refused(tmp_path: Path) -> None:
    repo = _package(tmp_path / "pkg", tmp_path)
    model = repo / "b" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-5] ^= 1  # one byte of the last initializer
    model.write_bytes(bytes(data))
    server = ModelServer(str(repo), cores=2)
    server.load_all()
    try:
        np.testing.assert_array_equal(_answer(server, "a"), X * 2 + 1)
        row = next(r for r in server.index() if r["name"] == "b")
        assert row["state"] == "UNAVAILABLE"
        assert (
            "model.onnx" in row["reason"] and "manifest.json" in row["reason"] and "sha256" in row["reason"]
        )
    finally:
        server.shutdown()


def test_require_manifest_refuses_unlisted_models(tmp_path: Path) -> None:
    repo = _package(tmp_path / "pkg", tmp_path)
    add_model(repo, "late", affine_model(tmp_path / "late.onnx"), ModelConfig("late", max_batch_size=8))
    server = ModelServer(str(repo), cores=2, policy=LoadPolicy(require_manifest=True))
    server.load_all()
    try:
        np.testing.assert_array_equal(_answer(server, "a"), X * 2 + 1)
        row = next(r for r in server.index() if r["name"] == "late")
        assert row["state"] == "UNAVAILABLE" and "no package manifest lists" in row["reason"]
    finally:
        server.shutdown()

"""kiln verify / encrypt / keygen through typer's CliRunner (the commands are registered in
cli/main.py by the lead; here they sit on a test app)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from delivery_packages import INT8, build_package, classifier
from typer.testing import CliRunner

from modelkiln.cli.encrypt import encrypt_cmd, keygen_cmd
from modelkiln.cli.verify import verify_cmd
from modelkiln.delivery.crypto import is_encrypted

app = typer.Typer()
app.command("verify")(verify_cmd)
app.command("encrypt")(encrypt_cmd)
app.command("keygen")(keygen_cmd)
runner = CliRunner()


def test_verify_exit_status_and_json(package: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["verify", str(package), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "golden" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    data = bytearray((package / INT8).read_bytes())
    data[len(data) // 2] ^= 1
    (package / INT8).write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(package), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 1
    assert "FAIL" in res.output and INT8 in res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False
    [f] = [f for f in report["findings"] if f["status"] == "fail"]
    assert f["check"] == "integrity" and f["precision"] == "int8" and f["expected"] and f["got"]


def test_verify_rejects_unknown_backend(package: Path) -> None:
    res = runner.invoke(app, ["verify", str(package), "--backend", "torch"])
    assert res.exit_code != 0


def test_keygen_sign_and_verify_with_public_key(tmp_path: Path) -> None:
    res = runner.invoke(app, ["keygen", "sign", str(tmp_path / "sign.pem")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sign.pem.pub").is_file() and (tmp_path / "sign.pem").stat().st_mode & 0o077 == 0
    assert runner.invoke(app, ["keygen", "sign", str(tmp_path / "sign.pem")]).exit_code != 0  # no overwrite
    pkg = build_package(tmp_path / "pkg", sign_key=tmp_path / "sign.pem")
    ok = runner.invoke(app, ["verify", str(pkg), "--public-key", str(tmp_path / "sign.pem.pub")])
    assert ok.exit_code == 0, ok.output
    runner.invoke(app, ["keygen", "sign", str(tmp_path / "other.pem")])
    bad = runner.invoke(app, ["verify", str(pkg), "--public-key", str(tmp_path / "other.pem.pub")])
    assert bad.exit_code == 1 and "signature" in bad.output


def test_encrypt_and_verify_with_model_key(tmp_path: Path) -> None:
    res = runner.invoke(app, ["keygen", "model", str(tmp_path / "model.key")])
    assert res.exit_code == 0 and "key id" in res.output
    key_text = (tmp_path / "model.key").read_text().strip()
    model = classifier(tmp_path / "m" / "model.onnx", external=True)
    res = runner.invoke(app, ["encrypt", str(model), "--key", str(tmp_path / "model.key"), "--remove"])
    assert res.exit_code == 0, res.output
    assert is_encrypted(tmp_path / "m" / "model.onnx.enc") and is_encrypted(
        tmp_path / "m" / "model.onnx.data.enc"
    )
    assert not model.exists() and not (tmp_path / "m" / "model.onnx.data").exists()
    assert key_text not in res.output
    pkg = build_package(tmp_path / "pkg", encrypt_key=tmp_path / "model.key")
    assert runner.invoke(app, ["verify", str(pkg), "--model-key", str(tmp_path / "model.key")]).exit_code == 0
    runner.invoke(app, ["keygen", "model", str(tmp_path / "wrong.key")])
    res = runner.invoke(app, ["verify", str(pkg), "--model-key", str(tmp_path / "wrong.key")])
    assert res.exit_code == 1 and "wrong key" in res.output and key_text not in res.output


def test_messages_with_brackets_are_printed_verbatim(package: Path) -> None:
    """Findings quote names like ['logits']: the table shows them as text, not rich markup."""
    from delivery_packages import INT8_META

    classifier(package / INT8, seed=5, int8=True, meta=INT8_META)
    from modelkiln.delivery.manifest import build_manifest, read_manifest, write_manifest

    m = read_manifest(package)
    write_manifest(build_manifest(package, m.models), package)
    res = runner.invoke(app, ["verify", str(package)])
    assert res.exit_code == 1 and "'logits'" in res.output

"""manifest.json: exact round trip, errors that name the key, paths that stay inside the package,
and check_files' failures (naming the file) and warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from delivery_packages import FP32, INT8

from modelkiln.delivery.errors import DeliveryError, IntegrityError, ManifestError
from modelkiln.delivery.findings import Status
from modelkiln.delivery.manifest import (
    MANIFEST_FILE,
    Manifest,
    ModelRecord,
    build_manifest,
    check_file_against_manifest,
    check_files,
    find_manifest,
    read_manifest,
)


def test_round_trip_is_exact(package: Path) -> None:
    text = (package / MANIFEST_FILE).read_text()
    m = Manifest.from_json(text)
    assert m.to_json() == text
    assert m == read_manifest(package)


def edit(package: Path, change: object) -> str:
    data = json.loads((package / MANIFEST_FILE).read_text())
    change(data)  # type: ignore[operator]
    return json.dumps(data)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.pop("files"), "'files' is missing"),
        (lambda d: d["files"][0].update(size="12"), "'files[0].size' must be an integer"),
        (lambda d: d["files"][1].update(path="/etc/passwd"), "'files[1].path'"),
        (lambda d: d["files"][1].update(path="../outside.onnx"), "'files[1].path'"),
        (lambda d: d["files"][1].update(path="a/./b"), "'files[1].path'"),
        (lambda d: d["files"][0].update(sha256="xyz"), "'files[0].sha256' must be 64"),
        (lambda d: d["models"][1].update(file="nope.onnx"), "'models[1].file' names 'nope.onnx'"),
        (
            lambda d: d["models"][0]["tolerances"][0].pop("self_max_abs"),
            "'models[0].tolerances[0].self_max_abs' is missing",
        ),
        (
            lambda d: d["build_machine"].update(cores=True),
            "'build_machine.cores' must be an integer, got bool",
        ),
        (lambda d: d.update(format="other/9"), "'format' is 'other/9'"),
        (lambda d: d["files"].append(d["files"][0]), "twice"),
    ],
)
def test_read_errors_name_the_key(package: Path, change: object, key: str) -> None:
    with pytest.raises(ManifestError) as exc:
        Manifest.from_json(edit(package, change), "pkg/manifest.json")
    assert key in str(exc.value) and "pkg/manifest.json" in str(exc.value)


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a sealed package"):
        read_manifest(tmp_path)


def test_check_files_names_the_changed_file_and_its_model(package: Path) -> None:
    m = read_manifest(package)
    assert check_files(package, m) == []
    p = package / FP32
    p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 0xFF]))
    (package / "report.md").unlink()
    found = {f.message.split(":")[0]: f for f in check_files(package, m)}
    assert set(found) == {FP32, "report.md"}
    assert found[FP32].status is Status.FAIL and (found[FP32].model, found[FP32].precision) == ("clf", "fp32")
    assert "missing" in found["report.md"].message


def test_a_size_change_is_reported_before_hashing(package: Path) -> None:
    with (package / INT8).open("ab") as f:
        f.write(b"\0")
    [f] = check_files(package, read_manifest(package))
    assert "size changed" in f.message and f.expected != f.got


def test_a_symlink_in_place_of_a_file_fails(package: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("# report\n")
    (package / "report.md").unlink()
    (package / "report.md").symlink_to(outside)
    [f] = check_files(package, read_manifest(package))
    assert f.failed and "report.md" in f.message


def test_build_refuses_links_and_records_outside_the_package(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "a.onnx").write_bytes(b"x")
    with pytest.raises(DeliveryError, match="not a relative path"):
        build_manifest(pkg, [ModelRecord("m", "fp32", "../a.onnx", encrypted=True)])
    with pytest.raises(DeliveryError, match="not a file of the package"):
        build_manifest(pkg, [ModelRecord("m", "fp32", "b.onnx", encrypted=True)])
    (pkg / "link").symlink_to(tmp_path)
    with pytest.raises(DeliveryError, match="symbolic link"):
        build_manifest(pkg, [])


def test_excluded_files_are_neither_listed_nor_warned_about(package: Path) -> None:
    (package / "work").mkdir()
    (package / "work" / "scratch.onnx").write_bytes(b"x")
    m = read_manifest(package)
    rebuilt = build_manifest(package, m.models, exclude=("work/*",))
    assert not any(f.path.startswith("work/") for f in rebuilt.files)
    assert check_files(package, rebuilt) == []
    [warn] = check_files(package, m)
    assert warn.status is Status.WARN and "work/scratch.onnx" in warn.message


def test_a_server_can_check_a_model_against_its_package(package: Path) -> None:
    """kiln serve's hook: the manifest is found above the model and its hash must match."""
    model = package / FP32
    assert find_manifest(model) == package.resolve()
    entry = check_file_against_manifest(model)
    assert entry is not None and entry.path == FP32
    assert check_file_against_manifest(package / "golden" / "nothing.onnx") is None
    data = bytearray(model.read_bytes())
    data[-3] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="content changed"):
        check_file_against_manifest(model)


def test_no_manifest_above_a_loose_model(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert find_manifest(tmp_path / "m.onnx", levels=1) is None


def test_accuracy_figures_become_plain_json() -> None:
    import math

    import numpy as np

    from modelkiln.delivery.seal import plain_json

    got = plain_json(
        {"top1": np.float32(0.5), "curve": np.arange(2), "nan": math.nan, "p": Path("x"), 1: (True,)}
    )
    assert got == {"top1": 0.5, "curve": [0, 1], "nan": None, "p": "x", "1": [True]}

"""The package stays light: importing it, the zoo and predict must not pull in torch."""

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_modelkiln_does_not_import_torch() -> None:
    mods = _modules_after("import modelkiln")
    assert "torch" not in mods


def test_zoo_and_predict_paths_do_not_import_torch() -> None:
    mods = _modules_after(
        "import modelkiln.predict, modelkiln.zoo as z; [z.get(n) for n in ('resnet50', 'efficientnet_lite0',"
        " 'yolov5n', 'clip-vit-b-32')]"
    )
    assert "torch" not in mods
    assert "open_clip" not in mods


def test_public_verbs_resolve_lazily() -> None:
    mods = _modules_after(
        "import modelkiln as k; [getattr(k, v) for v in ('optimize', 'quantize', 'compare', 'evaluate', 'benchmark')]"
    )
    assert "torch" not in mods
    import modelkiln
    from modelkiln.export import export

    assert callable(export) and callable(modelkiln.quantize) and callable(modelkiln.optimize)


def test_tensorrt_is_an_optional_extra_never_pulled_by_dev() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("tensorrt-cu12") for r in extras["tensorrt"])
    assert any(r.startswith("tensorrt-cu13") for r in extras["tensorrt-cu13"])
    pulled = " ".join(project["dependencies"] + extras["dev"] + extras["all"])
    assert "tensorrt" not in pulled.replace("modelkiln[", "")

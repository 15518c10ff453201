"""Shared fixtures: the real-asset folder (tests marked ``assets`` skip without it) and exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("KILN_ASSETS", ROOT.parent / "shared" / "assets"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ASSETS.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real assets not found at {ASSETS} (set KILN_ASSETS)")
    for item in items:
        if "assets" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")

"""Fixtures: a sealed tiny package (delivery_packages.py builds it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from delivery_packages import build_package


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return build_package(tmp_path / "pkg")


@pytest.fixture
def make_package(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(100))

    def make(**kwargs: object) -> Path:
        return build_package(tmp_path / f"pkg{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make

"""Per-model warm-up (config.yaml ``warmup:``, as Triton's model_warmup): what each instance runs
before its model is ready."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from conftest import affine_model
from modelkiln.errors import ConfigError
from modelkiln.runtime.backends.base import Backend
from modelkiln.serve import model as served
from modelkiln.serve.config import ModelConfig, Warmup, dump_config, parse_config
from modelkiln.serve.model import ServedModel


def test_warmup_mapping_parses_and_round_trips() -> None:
    config = parse_config(
        {"max_batch_size": 8, "warmup": {"batch_sizes": [1, 8], "count": 2, "data": "random"}}, "m"
    )
    assert config.warmup == Warmup((1, 8), 2, "random") and config.warmup_plan == config.warmup
    again = parse_config(__import__("yaml").safe_load(dump_config(config)), "m")
    assert again.warmup == config.warmup
    assert parse_config({"warmup": True}, "m").warmup_plan == Warmup()
    assert parse_config({"warmup": False}, "m").warmup_plan is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"warmup": {"batch_size": [1]}}, "unknown key(s) ['batch_size']"),
        ({"max_batch_size": 4, "warmup": {"batch_sizes": [8]}}, "exceed max_batch_size 4"),
        ({"warmup": {"batch_sizes": [2]}}, "exceed max_batch_size 0"),  # no batch axis: batch 1 only
        ({"warmup": {"count": 0}}, "count must be 1..100"),
        ({"warmup": {"data": "ones"}}, "data must be zero or random"),
        ({"warmup": {"batch_sizes": [0]}}, "batch_sizes must be integers >= 1"),
        ({"warmup": "yes"}, "warmup must be true, false or a mapping"),
    ],
)
def test_bad_warmup_is_refused_naming_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="warmup") as err:
        parse_config(data, "m", "repo/m/config.yaml")
    assert message in str(err.value) and "repo/m/config.yaml" in str(err.value)


class Counting(Backend):
    """Wraps a backend and records the shape of every feed it runs."""

    seen: ClassVar[list[tuple[int, ...]]] = []

    @classmethod
    def load(cls, model: Any, options: Any = None) -> Counting:
        raise NotImplementedError("made by wrapping a loaded backend")

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.model_name, inner.input_metadata, inner.output_metadata)
        self.inner = inner

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        Counting.seen.append(feed["x"].shape)
        return self.inner.infer(feed)


def test_each_instance_warms_up_at_each_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = affine_model(tmp_path / "m.onnx")
    real = served.BACKEND_LOADERS.copy()
    loaders = {k: (lambda source, config, f=f: Counting(f(source, config))) for k, f in real.items()}
    monkeypatch.setattr(served, "BACKEND_LOADERS", loaders)
    Counting.seen = []
    warm = Warmup((1, 4), count=2, data="random")
    config = ModelConfig("m", max_batch_size=4, instance_count=2, warmup=warm)
    model = ServedModel.load(config, 1, path)
    assert sorted(Counting.seen) == sorted([(1, 4)] * 4 + [(4, 4)] * 4)  # 2 instances x 2 runs x 2 sizes
    Counting.seen = []
    assert model.warm_up(Warmup()) == 2 and Counting.seen == [(1, 4), (1, 4)]
    Counting.seen = []
    ServedModel.load(ModelConfig("m", max_batch_size=4, warmup=False), 1, path)
    assert Counting.seen == []

"""Repository configs are validated with errors naming the file and key; kiln repo add builds a
repository kiln serve loads; the core budget never lets inferences use more cores than it has."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import affine_model, kiln
from modelkiln.errors import ConfigError, ModelNotFound
from modelkiln.serve.config import load_config, parse_config
from modelkiln.serve.repository import Repository
from modelkiln.serve.scheduler import CoreBudget


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_batch_sise": 8}, "unknown key(s) ['max_batch_sise']"),
        ({"priority": 7}, "priority must be 0..2"),
        ({"dynamic_batching": {"preferred_batch_sizes": [4]}}, "dynamic_batching needs max_batch_size > 0"),
        ({"max_batch_size": 4, "dynamic_batching": {"preferred_batch_sizes": [8]}}, "exceed max_batch_size"),
        ({"queue": {"max_queue_size": 0}}, "max_queue_size must be >= 1"),
        ({"inputs": [{"name": "x", "dtype": "float33", "dims": [4]}]}, "dtype must be one of"),
        ({"inputs": [{"name": "x", "dims": [4]}]}, "dtype"),
        ({"allow_cpu_mismatch": "no"}, "allow_cpu_mismatch must be true or false"),
    ],
)
def test_bad_configs_are_refused_with_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_config(data, "m", "repo/m/config.yaml")
    assert message in str(err.value) and "repo/m/config.yaml" in str(err.value)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("max_batch_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, "m")


def test_repo_add_then_repository_finds_versions(tmp_path: Path) -> None:
    model = affine_model(tmp_path / "a.onnx")
    repo = tmp_path / "repo"
    for _ in range(2):
        res = kiln(
            "repo", "add", str(repo), str(model), "--name", "aff",
            "--max-batch", "8", "--preferred-batch", "4", "--max-queue-delay-us", "500",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
    entry = Repository(repo).entry("aff")
    assert sorted(entry.versions) == [1, 2] and entry.latest == 2
    assert entry.config.max_batch_size == 8 and entry.config.dynamic_batching.preferred_batch_sizes == (4,)
    with pytest.raises(ModelNotFound, match="is not in the repository"):
        Repository(repo).entry("other")


def test_core_budget_never_oversubscribes_and_never_deadlocks() -> None:
    budget = CoreBudget(2)
    busy, peak = [0], [0]
    lock = threading.Lock()

    def job(n: int) -> None:
        got = budget.take(n)
        with lock:
            busy[0] += got
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.01)
        with lock:
            busy[0] -= got
        budget.give(got)

    threads = [threading.Thread(target=job, args=(1 + i % 2,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 2


def test_core_budget_serves_waiters_first_come_first_served() -> None:
    """A task that gives its cores back and asks again at once (a chat's next decode round) must
    queue behind one already waiting, not take the cores back and starve it."""
    budget = CoreBudget(2)
    order: list[str] = []
    budget.take(2)

    def waiter() -> None:
        budget.take(2)
        order.append("waiter")
        budget.give(2)

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.time() + 5
    while not budget._queue and time.time() < deadline:  # the waiter is in line
        time.sleep(0.001)
    budget.give(2)
    budget.take(2)  # asks again immediately
    order.append("again")
    budget.give(2)
    t.join(timeout=5)
    assert order == ["waiter", "again"]


def test_sigterm_answers_in_flight_requests(tmp_path: Path) -> None:
    """kiln serve stops on SIGTERM only after answering what it accepted."""
    httpclient = pytest.importorskip("tritonclient.http")
    import numpy as np

    from conftest import add_model, free_port
    from modelkiln.serve.config import ModelConfig

    repo = tmp_path / "repo"
    add_model(
        repo,
        "slow",
        affine_model(tmp_path / "s.onnx", delay_loops=3000),
        ModelConfig("slow", max_batch_size=64),
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelkiln", "serve", str(repo), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        for _ in range(200):
            try:
                if c.is_model_ready("slow"):
                    break
            except Exception:  # noqa: BLE001, S110 - starting
                pass
            time.sleep(0.1)
        x = np.ones((64, 4), np.float32)
        inp = httpclient.InferInput("x", [64, 4], "FP32")
        inp.set_data_from_numpy(x)
        pending = c.async_infer("slow", [inp])
        time.sleep(0.05)
        proc.terminate()
        np.testing.assert_allclose(pending.get_result().as_numpy("y"), x * 2 + 1)
        assert proc.wait(timeout=60) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful stop
        assert "loaded slow v1" in proc.stderr.read()
    finally:
        proc.kill()

"""Delivery costs: how much longer `kiln serve` takes to load an encrypted model than the plaintext
one (the issue's target: < 5 %), whether the two answer identically, and how long `kiln verify`
takes on a package.

Load: ServedModel.load (what kiln serve runs per model version: manifest check, decryption in
memory, one ONNX Runtime session, no warm-up) of the plaintext and the encrypted file, in turns,
``--rounds`` times; median and min of each and their ratio.

    .venv/bin/python benchmarks/delivery.py MODEL.onnx [MODEL.onnx ...] [--rounds 15] [--package DIR]

Prints one JSON line per measurement (and appends them to benchmarks/results/delivery.jsonl).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from modelkiln.bench.runner import machine_info
from modelkiln.delivery.crypto import encrypt_model, generate_model_key
from modelkiln.delivery.verify import verify_package
from modelkiln.runtime.backends.onnxruntime import cpu_backend
from modelkiln.runtime.feeds import synthesize_feed
from modelkiln.serve.config import ModelConfig
from modelkiln.serve.model import LoadPolicy, ServedModel

RESULTS = Path(__file__).resolve().parent / "results" / "delivery.jsonl"


def _emit(row: dict[str, object]) -> None:
    line = json.dumps(row)
    print(line)
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")


def load_cost(model: Path, rounds: int, warmup: bool) -> dict[str, object]:
    """Interleaved load times (ms) of ``model`` as plaintext and encrypted, and output equality;
    ``warmup``: with kiln serve's default warm-up inference (what a load costs a server), else
    the session alone (the decryption's share at its largest)."""
    with tempfile.TemporaryDirectory() as tmp:
        key = generate_model_key(Path(tmp) / "model.key")
        enc = encrypt_model(model, Path(tmp) / "model.onnx.enc", key)[0]
        config = ModelConfig("m", warmup=warmup)
        policy = LoadPolicy(model_key=key)
        times: dict[str, list[float]] = {"plain": [], "encrypted": []}
        loaded = {}
        for _ in range(rounds):
            for kind, path in (("plain", model), ("encrypted", enc)):
                t = time.perf_counter()
                loaded[kind] = ServedModel.load(config, 1, path, policy=policy)
                times[kind].append((time.perf_counter() - t) * 1e3)
        feed = synthesize_feed(cpu_backend(model).input_metadata, 1)
        a, b = (loaded[k].run(feed) for k in ("plain", "encrypted"))
        identical = all(np.array_equal(a[n], b[n]) for n in a)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bench": "encrypted_load",
        "model": model.name,
        "size_mb": round(model.stat().st_size / 1e6, 2),
        "rounds": rounds,
        "warmup": warmup,
        "plain_ms": {"median": round(med["plain"], 2), "min": round(min(times["plain"]), 2)},
        "encrypted_ms": {"median": round(med["encrypted"], 2), "min": round(min(times["encrypted"]), 2)},
        "ratio_median": round(med["encrypted"] / med["plain"], 4),
        "ratio_min": round(min(times["encrypted"]) / min(times["plain"]), 4),
        "outputs_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--package", type=Path, help="A kiln deploy output to time kiln verify on.")
    args = parser.parse_args()
    machine = machine_info(None)
    for model in args.models:
        for warmup in (False, True):
            _emit({**load_cost(model, args.rounds, warmup), "machine": machine})
    if args.package is not None:
        t = time.perf_counter()
        report = verify_package(args.package)
        _emit(
            {
                "bench": "verify",
                "package": str(args.package),
                "ok": report.ok,
                "checks": len(report.findings),
                "seconds": round(time.perf_counter() - t, 2),
                "machine": machine,
            }
        )


if __name__ == "__main__":
    main()

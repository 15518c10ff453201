"""How much a model gains from batching by itself: bare ONNX Runtime items/s at batch 1, 4 and 8
with 1 and 2 intra-op threads. This bounds what a server's dynamic batching can give.

    .venv/bin/python benchmarks/batch_gain.py MODEL.onnx [...] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from modelkiln.bench.runner import machine_info, synthesize_feed
from modelkiln.runtime.backends.onnxruntime import cpu_backend, tensor_metas


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batch_gain.jsonl")
    args = ap.parse_args()
    for path in args.models:
        for threads in (1, 2):
            session = cpu_backend(path, threads=threads).session
            metas = tensor_metas(session.get_inputs())
            found = {}
            for batch in (1, 4, 8):
                feed = synthesize_feed(metas, batch)
                for _ in range(3):
                    session.run(None, feed)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < args.seconds:
                    session.run(None, feed)
                    n += 1
                found[batch] = n * batch / (time.perf_counter() - t0)
            row = {
                "bench": "batch_gain",
                "model": path.name,
                "threads": threads,
                "items_per_s": found,
                "gain_8_vs_1": found[8] / found[1],
                "machine": machine_info(threads),
            }
            print(json.dumps(row))
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""The anchors users pick, on the same random Qwen2-VL-2B language model: llama.cpp (GGUF F32,
F16, Q8_0 through llama-cpp-python built here from source), ONNX Runtime GenAI (its model
builder's int8 / int4 for CPU, its generator), transformers FP32, and ours (an exported folder:
embed.onnx + decoder.onnx, e.g. the builder's W8 export).

The anchors' models come from benchmarks/anchors/setup.sh (venv, builds and conversions under
ANCHORS, default /work/anchors); ours is an argument, so this reruns after our engine changes:

    .venv/bin/python benchmarks/qwen_anchors.py --ours /work/qwen2b/w8 [--anchors /work/anchors]
        [--ours /work/qwen2b/fp32 ...] [--engines ours-w8,llama-q8_0,...] [--rounds 3] [--new 64]
    .venv/bin/python benchmarks/qwen_anchors.py --summarize STAMP   # summaries of a stopped run

Method: the same two prompts of token ids for everyone (512 and 65 ids, drawn with a fixed seed
from the vocabulary; no tokenizer: the random checkpoint's tokenizer is a tiny stand-in), greedy
(numpy argmax of the last logits), exactly ``new`` tokens (stop tokens ignored), the same thread
count (llama.cpp n_threads and n_threads_batch; ONNX Runtime intra-op threads; torch threads).
Each engine runs in its own process (benchmarks/anchors/engines.py: load, warm-up, the 512-token
prompt then the 65-token one), once per round; rounds interleave the engines (order rotated each
round) so a slow spell of the shared machine is spread over all of them. Every process runs under
the heavy-work lock (``flock /tmp/heavy.lock``) so no other timing overlaps it, and records the
1-minute load average beside its figures. Per engine: TTFT for each prompt (median, min), decode
tokens/s after the first token (median, min, max), peak RSS (VmHWM: with mmapped weights that
includes the file pages touched), and the first token (and the length of the common prefix of the
64) compared with transformers FP32's. Rows go to benchmarks/results/qwen_anchors.jsonl: one per
process (``row: run``) and one summary per engine (``row: summary``), with machine info. Each
engine's first logits are kept in ANCHORS/logits/STAMP, so a run stopped before its end can be
summarized afterwards from its run rows (``--summarize STAMP``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "qwen_anchors.jsonl"
WORKER = HERE / "anchors" / "engines.py"
LOCK = Path("/tmp/heavy.lock")
#: Qwen2's 151 936 ids; prompts are drawn below its first special id (151 643).
VOCAB_DRAW = 151_643
PROMPT_SEED = 20
REFERENCE = "transformers-fp32"


@dataclass
class Spec:
    """An engine: which Python runs it, its kind for engines.py, its model, extra flags."""

    name: str
    python: str
    kind: str
    model: Path
    flags: list[str] = field(default_factory=list)


def specs(ours: list[Path], anchors: Path, venv_python: str) -> list[Spec]:
    """Every engine of the benchmark, ours first (the project's interpreter runs them)."""
    gguf = anchors / "gguf"
    return [
        *(Spec("ours-" + folder.name, sys.executable, "ours", folder) for folder in ours),
        Spec(REFERENCE, venv_python, "transformers", anchors / "qwen2-text"),
        Spec("llama-f32", venv_python, "llama", gguf / "qwen2-vl-2b-random-text-f32.gguf"),
        Spec("llama-f16", venv_python, "llama", gguf / "qwen2-vl-2b-random-text-f16.gguf"),
        Spec("llama-q8_0", venv_python, "llama", gguf / "qwen2-vl-2b-random-text-q8_0.gguf"),
        # llama-cpp-python leaves flash attention off; llama.cpp's own CLI and server default to
        # "auto" (on for CPU): both, so the bar is llama.cpp's better one
        Spec(
            "llama-q8_0-fa",
            venv_python,
            "llama",
            gguf / "qwen2-vl-2b-random-text-q8_0.gguf",
            ["--flash-attn"],
        ),
        Spec("genai-int8", venv_python, "genai", anchors / "genai-int8"),
        Spec("genai-int4", venv_python, "genai", anchors / "genai-int4"),
    ]


def prompts() -> dict[str, list[int]]:
    """The two prompts (fixed seed): a 512-token one (TTFT of a long prompt) and a 65-token one."""
    rng = np.random.default_rng(PROMPT_SEED)
    return {
        "p512": rng.integers(0, VOCAB_DRAW, 512).tolist(),
        "p65": rng.integers(0, VOCAB_DRAW, 65).tolist(),
    }


@contextmanager
def heavy_lock(path: Path):
    """The machine's heavy-work lock (the same file ``flock`` takes), held for one engine run."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_engine(
    spec: Spec, prompt_file: Path, new: int, threads: int, lock: Path, logits: Path | None = None
) -> dict:
    """One process of one engine; its JSON row, or the error it died with. ``logits``: a folder
    where it saves each prompt's first logits."""
    cmd = [spec.python, str(WORKER), "--kind", spec.kind, "--model", str(spec.model)]
    cmd += ["--prompts", str(prompt_file), "--new", str(new), "--threads", str(threads), *spec.flags]
    if logits is not None:
        logits.mkdir(parents=True, exist_ok=True)
        cmd += ["--logits-dir", str(logits)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(HERE.parent / "src")  # ours: the working tree's modelkiln
    with heavy_lock(lock):
        time.sleep(0.5)
        load = os.getloadavg()
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"engine": spec.name, "error": done.stderr.strip()[-3000:] or f"exit {done.returncode}"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "engine": spec.name,
        **row,
        "wall_s": round(wall, 1),
        "loadavg_before": [round(x, 2) for x in load],
    }


@dataclass
class Reference:
    """transformers FP32's answer to each prompt: its tokens and first logits (kept in
    ANCHORS/reference so a rerun without transformers still compares against it)."""

    tokens: dict[str, list[int]]
    logits: dict[str, np.ndarray]

    def save(self, folder: Path, meta: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in self.logits.items():
            np.save(folder / f"{name}.npy", array)
        (folder / "reference.json").write_text(json.dumps({**meta, "tokens": self.tokens}))

    @classmethod
    def load(cls, folder: Path, meta: dict) -> Reference | None:
        path = folder / "reference.json"
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in meta} != meta:
            return None
        tokens = stored["tokens"]
        return cls(
            tokens, {n: np.load(folder / f"{n}.npy") for n in tokens if (folder / f"{n}.npy").is_file()}
        )


def compare(logits: np.ndarray, reference: np.ndarray) -> dict:
    """First-token logits against the reference's: cosine and largest difference."""
    a, b = logits.astype(np.float64), reference.astype(np.float64)
    return {
        "logit_cosine": round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 6),
        "logit_max_abs": round(float(np.abs(a - b).max()), 5),
    }


def summarize(name: str, rows: list[dict], ref: Reference | None, logits: Path | None) -> dict:
    """Median / min of TTFT, median / min / max of decode rate per prompt; peak RSS; agreement
    with the reference (first token, common prefix of the tokens, first logits)."""
    good = [r for r in rows if "error" not in r]
    out: dict = {"engine": name, "processes": len(rows), "failed": len(rows) - len(good)}
    if not good:
        out["error"] = rows[-1].get("error") if rows else "not run"
        return out
    for prompt in good[0]["runs"]:
        runs = [r["runs"][prompt] for r in good]
        ttft = [x["ttft_ms"] for x in runs]
        rate = [x["decode_tok_s"] for x in runs]
        entry = {
            "prompt_tokens": runs[0]["prompt_tokens"],
            "ttft_ms_median": round(statistics.median(ttft), 1),
            "ttft_ms_min": round(min(ttft), 1),
            "decode_tok_s_median": round(statistics.median(rate), 2),
            "decode_tok_s_min": round(min(rate), 2),
            "decode_tok_s_max": round(max(rate), 2),
            "loadavg_1m_median": round(statistics.median(x["loadavg_1m"] for x in runs), 2),
            "same_tokens_every_round": all(x["tokens"] == runs[0]["tokens"] for x in runs),
        }
        if ref is not None and prompt in ref.tokens:
            mine, theirs = runs[0]["tokens"], ref.tokens[prompt]
            common = next(
                (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), len(mine)
            )
            entry["first_token_agrees_with_" + REFERENCE] = mine[0] == theirs[0]
            entry["common_prefix_with_" + REFERENCE] = common
            saved = logits / f"{prompt}.npy" if logits is not None else None
            if saved is not None and saved.is_file() and prompt in ref.logits:
                entry |= compare(np.load(saved), ref.logits[prompt])
        out[prompt] = entry
    out["peak_rss_gb_max"] = max(r["peak_rss_gb"] for r in good)
    out["rss_after_load_gb"] = good[-1]["rss_after_load_gb"]
    out["load_s_median"] = round(statistics.median(r["load_s"] for r in good), 2)
    out["info"] = good[-1]["info"]
    out["model_path"] = good[-1]["model_path"]
    return out


def reference_of(rows: dict[str, list[dict]], logits: Path, anchors: Path, meta: dict) -> Reference | None:
    """transformers FP32's answer from this run's rows (saved to ANCHORS/reference for later runs),
    else the one saved by an earlier run with the same prompts and length."""
    ref_rows = [r for r in rows.get(REFERENCE, []) if "error" not in r]
    saved = logits / REFERENCE
    if ref_rows and all((saved / f"{p}.npy").is_file() for p in ref_rows[0]["runs"]):
        ref = Reference(
            {p: x["tokens"] for p, x in ref_rows[0]["runs"].items()},
            {p: np.load(saved / f"{p}.npy") for p in ref_rows[0]["runs"]},
        )
        ref.save(anchors / "reference", meta)
        return ref
    return Reference.load(anchors / "reference", meta)


def write_summaries(
    out, common: dict, rows: dict[str, list[dict]], ref: Reference | None, logits: Path, machine: dict
) -> None:
    """One summary row per engine (to ``out`` and stdout)."""
    for name, engine_rows in rows.items():
        summary = {**common, "row": "summary", **summarize(name, engine_rows, ref, logits / name)}
        summary["machine"] = machine
        out.write(json.dumps(summary) + "\n")
        print(json.dumps(summary))


def resummarize(args: argparse.Namespace, machine: dict) -> None:
    """Summary rows again from the run rows of an earlier run (``--summarize STAMP``), e.g. one
    stopped before its last round: its first logits are still in ANCHORS/logits/STAMP."""
    rows: dict[str, list[dict]] = {}
    common: dict = {}
    for line in args.results.read_text().splitlines():
        row = json.loads(line)
        if row.get("bench") == "qwen_anchors" and row.get("stamp") == args.summarize and row["row"] == "run":
            keys = ("bench", "model", "stamp", "new_tokens", "threads", "note")
            common = {k: row[k] for k in keys if k in row}
            engine_row = {k: v for k, v in row.items() if k not in (*keys, "row", "round")}
            rows.setdefault(row["engine"], []).append(engine_row)
    if not rows:
        raise SystemExit(f"{args.results}: no run rows with stamp {args.summarize}")
    common["summarized_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    logits = logits_folder(args.anchors, args.summarize)
    meta = {"prompt_seed": PROMPT_SEED, "new_tokens": common.get("new_tokens", args.new)}
    ref = reference_of(rows, logits, args.anchors, meta)
    with args.results.open("a") as out:
        write_summaries(out, common, rows, ref, logits, machine)


def logits_folder(anchors: Path, stamp: str) -> Path:
    """Where a run keeps each engine's first logits (kept, so an interrupted run can be
    summarized later)."""
    return anchors / "logits" / stamp.replace(":", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--ours",
        type=Path,
        action="append",
        default=[],
        help="our exported folder (embed.onnx, decoder.onnx); repeat for several (e.g. w8 and fp32)",
    )
    ap.add_argument("--anchors", type=Path, default=Path("/work/anchors"), help="setup.sh's folder")
    ap.add_argument("--python", default=None, help="the anchors' Python (default ANCHORS/venv/bin/python)")
    ap.add_argument(
        "--engines", default="", help="comma-separated names (default: every one whose model exists)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lock", type=Path, default=LOCK)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--note", default="", help="free text stored in every row (what changed)")
    ap.add_argument(
        "--summarize",
        metavar="STAMP",
        help="run nothing: write the summary rows of the earlier run with this stamp from its run rows",
    )
    args = ap.parse_args()
    from modelkiln.bench.runner import machine_info

    machine = machine_info(args.threads)
    if args.summarize:
        resummarize(args, machine)
        return
    python = args.python or str(args.anchors / "venv" / "bin" / "python")
    chosen = [s for s in args.engines.split(",") if s]
    engines, skipped = [], {}
    for spec in specs([o.resolve() for o in args.ours], args.anchors, python):
        if chosen and spec.name not in chosen:
            continue
        if not spec.model.exists():
            skipped[spec.name] = f"{spec.model} is absent (benchmarks/anchors/setup.sh makes it)"
        elif spec.python != sys.executable and not Path(spec.python).exists():
            skipped[spec.name] = f"{spec.python} is absent (benchmarks/anchors/setup.sh makes it)"
        else:
            engines.append(spec)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {"bench": "qwen_anchors", "model": "qwen2-vl-2b-random (text decoder)", "stamp": stamp}
    common |= {"new_tokens": args.new, "threads": args.threads, "note": args.note}
    rows: dict[str, list[dict]] = {s.name: [] for s in engines}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    logits = logits_folder(args.anchors, stamp)
    print(f"stamp {stamp}; first logits in {logits}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp, args.results.open("a") as out:
        prompt_file = Path(tmp) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts()))
        for r in range(args.rounds):
            order = engines[r % len(engines) :] + engines[: r % len(engines)] if engines else []
            for spec in order:
                first = not any("error" not in x for x in rows[spec.name])
                keep = logits / spec.name if first else None
                row = run_engine(spec, prompt_file, args.new, args.threads, args.lock, keep)
                rows[spec.name].append(row)
                brief = row.get("error", "")[-300:] or {
                    p: (x["ttft_ms"], x["decode_tok_s"]) for p, x in row["runs"].items()
                }
                print(f"round {r} {spec.name}: {brief}", file=sys.stderr, flush=True)
                out.write(json.dumps({**common, "row": "run", "round": r, **row}) + "\n")
                out.flush()
        meta = {"prompt_seed": PROMPT_SEED, "new_tokens": args.new}
        ref = reference_of(rows, logits, args.anchors, meta)
        write_summaries(out, common, rows, ref, logits, machine)
        for name, why in skipped.items():
            out.write(json.dumps({**common, "row": "summary", "engine": name, "skipped": why}) + "\n")


if __name__ == "__main__":
    main()

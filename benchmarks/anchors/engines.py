"""One engine, one process: greedy generation from given token ids, timed. Started by
benchmarks/qwen_anchors.py once per engine and round, with the Python that has the engine
(the project's venv for ours, /work/anchors/venv for llama.cpp, ONNX Runtime GenAI and
transformers): only the standard library and numpy at module level, each engine's own package
imported in its runner.

    PYTHON benchmarks/anchors/engines.py --kind llama|genai|transformers|ours --model PATH \
        --prompts prompts.json [--new 64] [--threads 2] [--flash-attn]

Every engine is fed the same ids (no tokenizer: the random checkpoint's tokenizer is a tiny
stand-in) and picks the next token the same way, ``argmax`` of the last position's logits in
numpy, stop tokens ignored, so each run decodes exactly ``new`` tokens. Per prompt: ms from the
call that starts the prompt to the first token chosen (TTFT: prefill + first pick), decode tokens/s
after it, and the tokens. One JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: A step: (ids to feed) -> logits of the last position, float32 [vocab].
Step = Callable[[Sequence[int]], np.ndarray]


def status_gb(key: str) -> float:
    """VmRSS / VmHWM of this process, GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1e6
    return 0.0


def greedy(begin: Callable[[], Step], prompt: Sequence[int], new: int, keep: Path | None = None) -> dict:
    """``new`` greedy tokens after ``prompt``: TTFT (ms), decode tokens/s, tokens. ``begin``
    starts a fresh sequence (empty cache) and returns its step function; its cost counts in TTFT
    (allocating a cache is part of starting a prompt for every engine). ``keep``: where to save
    the first token's logits (.npy, after the timed run) for the accuracy comparison."""
    start = time.perf_counter()
    step = begin()
    first = step(prompt)
    token = int(np.argmax(first))
    times, tokens = [time.perf_counter()], [token]
    first = first.astype(np.float32, copy=True) if keep is not None else first
    for _ in range(new - 1):
        token = int(np.argmax(step([token])))
        times.append(time.perf_counter())
        tokens.append(token)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    if keep is not None:
        np.save(keep, first)
    return {"ttft_ms": round((times[0] - start) * 1e3, 2), "decode_tok_s": round(decode, 3), "tokens": tokens}


def llama_engine(model: str, threads: int, context: int, flash_attn: bool) -> tuple[Callable[[], Step], dict]:
    """llama-cpp-python: the model mmapped, ``Llama.eval`` of ids (n_batch 512: a 512-token prompt
    is one batch), logits of the last position read from the context."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model,
        n_ctx=context,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def begin() -> Step:
        llm.reset()

        def step(ids: Sequence[int]) -> np.ndarray:
            llm.eval(list(ids))
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

        return step

    return begin, {"llama_cpp_python": llama_cpp.__version__, "flash_attn": flash_attn, "n_ctx": context}


def genai_engine(model: str, threads: int, context: int) -> tuple[Callable[[], Step], dict]:
    """ONNX Runtime GenAI's generator: ``append_tokens`` of the ids (prefill, or one decode step),
    ``get_logits`` of the last position; the threads come from the folder's genai_config.json
    (checked here: the setup writes them)."""
    import onnxruntime_genai as og

    config = json.loads((Path(model) / "genai_config.json").read_text())
    options = config["model"]["decoder"].get("session_options", {})
    if options.get("intra_op_num_threads") != threads:
        raise SystemExit(
            f"{model}/genai_config.json: decoder.session_options.intra_op_num_threads is "
            f"{options.get('intra_op_num_threads')}, expected {threads} (run benchmarks/anchors/setup.sh)"
        )
    og_model = og.Model(model)

    def begin() -> Step:
        params = og.GeneratorParams(og_model)
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(og_model, params)

        def step(ids: Sequence[int]) -> np.ndarray:
            generator.append_tokens(np.asarray(ids, dtype=np.int32)[None])
            logits = np.asarray(generator.get_logits())
            return logits.reshape(-1, logits.shape[-1])[-1]

        return step

    return begin, {"onnxruntime_genai": og.__version__, "session_options": options}


def transformers_engine(model: str, threads: int) -> tuple[Callable[[], Step], dict]:
    """transformers FP32 (Qwen2ForCausalLM of the same weights), a DynamicCache, logits of the
    last position only (``logits_to_keep=1``, as ``generate`` does)."""
    import warnings

    import torch
    import transformers

    # transformers 5.24 renames ``past_key_values`` to ``cache`` (FutureWarning); the old name is
    # kept because an unknown keyword would silently run without a cache on older versions
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)
    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def begin() -> Step:
        cache = transformers.DynamicCache()
        seen = [0]

        @torch.inference_mode()
        def step(ids: Sequence[int]) -> np.ndarray:
            x = torch.tensor([list(ids)], dtype=torch.long)
            positions = torch.arange(seen[0], seen[0] + x.shape[1])[None]
            out = lm(
                input_ids=x, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            seen[0] += x.shape[1]
            return out.logits[0, -1].float().numpy()

        return step

    return begin, {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
    }


def ours_engine(folder: str, threads: int, context: int) -> tuple[Callable[[], Step], dict]:
    """modelkiln's engine on an exported folder (embed.onnx + decoder.onnx): the embedding run on
    the ids (1 thread, as the chat model does), then Engine steps; M-RoPE positions are the token
    index on all three rows (text only). The engine picks greedily itself (``Generation.step()``,
    temperature 0); each decode step checks that its pick is the token our argmax chose."""
    import onnxruntime

    from modelkiln.genai.engine import Engine
    from modelkiln.runtime.backends.onnxruntime import cpu_backend

    path = Path(folder)
    embed = cpu_backend(path / "embed.onnx", threads=1)
    engine = Engine(
        path / "decoder.onnx",
        lambda ids: embed.infer({"input_ids": ids[None]})["inputs_embeds"][0],
        threads=threads,
    )
    live: list = []

    def begin() -> Step:
        for old in live:
            old.close()
        live.clear()

        def step(ids: Sequence[int]) -> np.ndarray:
            if not live:  # the prompt: a sequence with capacity for the answer, then its prefill
                array = np.asarray(ids, dtype=np.int64)
                positions = np.broadcast_to(np.arange(len(array)), (3, len(array))).copy()
                live.append(engine.start(engine.embed(array), positions, 0, context - len(array)))
            elif live[0].tokens[-1] != ids[-1]:
                raise SystemExit(f"ours picked {live[0].tokens[-1]}, the benchmark's argmax {ids[-1]}")
            live[0].step()
            logits = np.asarray(live[0].logits)
            return logits.reshape(-1, logits.shape[-1])[-1]

        return step

    return begin, {"onnxruntime": onnxruntime.__version__, "decoder_bytes": _bytes(path, "decoder.onnx*")}


def _bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", required=True, choices=["llama", "genai", "transformers", "ours"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, type=Path, help="JSON: {name: [ids]}")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp: flash attention on")
    ap.add_argument("--logits-dir", type=Path, help="save each prompt's first logits here (NAME.npy)")
    args = ap.parse_args()
    prompts: dict[str, list[int]] = json.loads(args.prompts.read_text())
    context = max(len(p) for p in prompts.values()) + args.new + 8
    start = time.perf_counter()
    if args.kind == "llama":
        begin, info = llama_engine(args.model, args.threads, context, args.flash_attn)
    elif args.kind == "genai":
        begin, info = genai_engine(args.model, args.threads, context)
    elif args.kind == "transformers":
        begin, info = transformers_engine(args.model, args.threads)
    else:
        begin, info = ours_engine(args.model, args.threads, context)
    load_s = time.perf_counter() - start
    rss_loaded = status_gb("VmRSS")
    # warm-up: the longest prompt and 2 tokens, untimed: every weight touched once (mmapped files
    # paged in), kernels' first-call setup, buffers grown to the prompt's size, as in a warm server
    greedy(begin, max(prompts.values(), key=len), 2)
    runs = {}
    for name, ids in prompts.items():
        time.sleep(0.5)  # let the previous run's worker threads stop spinning
        load = os.getloadavg()[0]
        keep = args.logits_dir / f"{name}.npy" if args.logits_dir else None
        runs[name] = {
            **greedy(begin, ids, args.new, keep),
            "prompt_tokens": len(ids),
            "loadavg_1m": round(load, 2),
        }
    row = {
        "kind": args.kind,
        "model_path": args.model,
        "threads": args.threads,
        "load_s": round(load_s, 2),
        "rss_after_load_gb": round(rss_loaded, 3),
        "peak_rss_gb": round(status_gb("VmHWM"), 3),
        "runs": runs,
        "info": info,
        "python": sys.executable,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()

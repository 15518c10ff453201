"""Is the Qwen2ForCausalLM folder (text_model.py) the same language model as the Qwen2-VL
checkpoint it came from? transformers FP32, both models on the same text-only ids (prefill, then
4 greedy steps on the cache), one model in memory at a time; prints the largest logit difference.

    ANCHORS/venv/bin/python benchmarks/anchors/check_text_model.py CHECKPOINT_DIR TEXT_MODEL_DIR
"""

from __future__ import annotations

import argparse
import gc
import json

import numpy as np


def greedy_logits(model: object, ids: list[int], steps: int) -> list[np.ndarray]:
    """Last-position logits of the prompt and of ``steps`` greedy tokens after it."""
    import torch

    out, rows = None, []
    with torch.inference_mode():
        x = torch.tensor([ids])
        for _ in range(steps + 1):
            out = model(input_ids=x, past_key_values=out.past_key_values if out else None, use_cache=True)
            rows.append(out.logits[0, -1].float().numpy().copy())
            x = torch.tensor([[int(rows[-1].argmax())]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("text")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    ids = np.random.default_rng(0).integers(0, 151_643, 33).tolist()
    vl = transformers.Qwen2VLForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    reference = greedy_logits(vl.eval(), ids, args.steps)
    del vl
    gc.collect()
    text = transformers.AutoModelForCausalLM.from_pretrained(args.text, dtype=torch.float32)
    mine = greedy_logits(text.eval(), ids, args.steps)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(reference, mine, strict=True)]
    tokens = [int(a.argmax()) == int(b.argmax()) for a, b in zip(reference, mine, strict=True)]
    print(json.dumps({"class": type(text).__name__, "max_abs_per_step": diffs, "same_argmax": tokens}))


if __name__ == "__main__":
    main()

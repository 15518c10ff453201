"""The language model of a Qwen2-VL checkpoint as a plain ``Qwen2ForCausalLM`` folder, for the
anchors' own tools (llama.cpp's converter, ONNX Runtime GenAI's model builder, transformers), which
know Qwen2 but not every Qwen2-VL layout.

Why this is the same model for text: with no image, Qwen2-VL's three M-RoPE position rows are equal
(t = h = w = the token's index), so every rotary band turns by the same angle as plain RoPE with the
same theta; the language model's weights already carry Qwen2's names (``model.*``), and the LM head
is tied to the embedding in both. So only the ``visual.*`` tensors are left out and the config is
rewritten; the tensor bytes are copied as they are (bfloat16, no conversion, stdlib only: streamed
in 64 MiB pieces, never the model in memory).

    python benchmarks/anchors/text_model.py CHECKPOINT_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

PIECE = 64 << 20
#: Files the converter and the builder read besides the weights (the tiny tokenizer of the random
#: checkpoint; the anchors are fed token ids, so its content only has to load).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, offset of the data section)."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def text_config(vl: dict) -> dict:
    """Qwen2ForCausalLM's config for the language model of a Qwen2-VL config (old flat layout or
    transformers 5's ``text_config``)."""
    text = dict(vl.get("text_config") or vl)
    rope = text.get("rope_parameters") or vl.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", vl.get("rope_theta", 1e6)))
    keys = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "hidden_act",
    )  # fmt: skip
    config = {k: text[k] for k in keys}
    config.update(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        rope_theta=theta,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=bool(vl.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=text.get("max_window_layers", text["num_hidden_layers"]),
        bos_token_id=text.get("bos_token_id", vl.get("bos_token_id")),
        eos_token_id=text.get("eos_token_id", vl.get("eos_token_id")),
        pad_token_id=text.get("pad_token_id", vl.get("pad_token_id")),
        torch_dtype="bfloat16",
        dtype="bfloat16",
        use_cache=True,
    )
    return config


def extract(checkpoint: Path, out: Path) -> dict:
    """Write OUT/model.safetensors (the language model's tensors), config.json and the tokenizer."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    entries: list[tuple[str, dict, Path, int]] = []
    for shard in shards:
        header, base = read_header(checkpoint / shard)
        for name, meta in header.items():
            if name == "__metadata__" or not name.startswith("model."):
                continue
            entries.append((name, meta, checkpoint / shard, base))
    if not any(name == "model.embed_tokens.weight" for name, *_ in entries):
        raise SystemExit(
            f"{checkpoint}: no model.embed_tokens.weight: not a Qwen2-VL checkpoint in hub layout"
        )
    entries.sort(key=lambda e: e[0])
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, meta, _, _ in entries:
        begin, end = meta["data_offsets"]
        header[name] = {
            "dtype": meta["dtype"],
            "shape": meta["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        offset += end - begin
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "model.safetensors.partial"
    with partial.open("wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        for _, meta, path, base in entries:
            begin, end = meta["data_offsets"]
            with path.open("rb") as src:
                src.seek(base + begin)
                left = end - begin
                while left:
                    piece = src.read(min(PIECE, left))
                    dst.write(piece)
                    left -= len(piece)
    partial.rename(out / "model.safetensors")
    config = text_config(json.loads((checkpoint / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}) + "\n"
    )
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
    return {"tensors": len(entries), "bytes": offset, "config": config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    done = extract(args.checkpoint, args.out)
    print(json.dumps({"tensors": done["tensors"], "gb": round(done["bytes"] / 1e9, 3)}), file=sys.stderr)


if __name__ == "__main__":
    main()

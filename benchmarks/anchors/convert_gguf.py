"""llama.cpp's own converter (``convert_hf_to_gguf.py`` from llama-cpp-python's sdist, which vendors
llama.cpp and its gguf-py) on the Qwen2ForCausalLM folder of the random checkpoint
(benchmarks/anchors/text_model.py), with one thing changed, and only for this model:

The converter recognises a BPE tokenizer by hashing the ids it gives for a fixed text and refuses
one it does not know (``get_vocab_base_pre`` raises NotImplementedError: "BPE pre-tokenizer was not
recognized"). The random checkpoint carries our tiny stand-in tokenizer (608 ids, Qwen2's
pre-tokenizer regex and byte-level BPE, but its own merges), so the hash is unknown. Here that one
method answers ``"qwen2"``, the pre-tokenizer Qwen2 models are written with; everything else is the
converter's: the 608 tokens and their merges are written, and ids 608..151935 become the
converter's own ``[PAD<i>]`` placeholders (type UNUSED), as it does for any vocabulary smaller than
the embedding. The benchmark feeds token ids (``Llama.eval``), so the tokenizer in the file is never
used; the weights, the architecture and the metadata are exactly what the converter writes.

    ANCHORS/venv/bin/python benchmarks/anchors/convert_gguf.py LLAMA_CPP_DIR TEXT_MODEL_DIR OUT.gguf \
        --outtype f32|f16|q8_0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("convert_gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("llama_cpp", type=Path, help="the sdist's vendor/llama.cpp folder")
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--outtype", default="q8_0", choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args()
    script = args.llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} is absent: give the vendor/llama.cpp folder of llama-cpp-python's sdist")
    sys.path.insert(0, str(args.llama_cpp))
    import convert_hf_to_gguf  # the converter puts its own gguf-py first on sys.path
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def vocab_pre(self: base.TextModel, tokenizer: object) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            log.warning(
                "pre-tokenizer hash unknown (the random checkpoint's tiny tokenizer): writing 'qwen2'"
            )
            return "qwen2"

    base.TextModel.get_vocab_base_pre = vocab_pre
    sys.argv = [str(script), str(args.model), "--outfile", str(args.out), "--outtype", args.outtype]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

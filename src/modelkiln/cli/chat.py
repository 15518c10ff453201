"""``kiln chat MODEL [PROMPT] [--image F]``: answer streamed to the terminal; without a prompt, a
conversation read from stdin (each line a turn, the whole conversation the context)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer

from modelkiln.delivery.crypto import resolve_model_key
from modelkiln.errors import BadInput
from modelkiln.genai.chat import ChatModel, add_turn
from modelkiln.genai.engine import Sampling
from modelkiln.log import console, err_console
from modelkiln.zoo.images import read_image


def chat_cmd(
    model: str = typer.Argument(
        ...,
        help="An exported folder (kiln export qwen2-vl…), qwen2-vl-tiny / qwen2.5-vl-tiny, or a weights folder.",
    ),
    prompt: str = typer.Argument(None, help="What to ask; omit for a conversation on stdin."),
    image: Path = typer.Option(None, "--image", help="An image to ask about."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (reproducible answers)."),
    decoder: str = typer.Option(
        None, "--decoder", help="Decoder file in the folder to use instead (e.g. an INT8 one)."
    ),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    vision_int8: bool = typer.Option(
        False,
        "--vision-int8",
        help="Use the folder's weight-only INT8 vision encoder, vision.int8.onnx (kiln deploy writes it).",
    ),
    model_key: Path = typer.Option(
        None,
        "--model-key",
        help="Key file for graphs encrypted with kiln encrypt (default: KILN_MODEL_KEY_FILE or KILN_MODEL_KEY).",
    ),
) -> None:
    """Chat with a Qwen2-VL model on ONNX Runtime (our decoder step, vision encoder and KV cache)."""
    if prompt is not None and not prompt.strip():
        raise BadInput("chat: the prompt is empty")
    if image is not None:
        read_image(image, rgb=True)  # bad images fail before the model is built
    with err_console.status(f"loading {model}…"):
        chat = ChatModel.open(model, decoder, threads, vision_int8, resolve_model_key(model_key))
    sampling = Sampling(temperature, top_p, seed)
    if prompt is not None:
        _turn(chat, [], [], prompt, image, max_new_tokens, sampling)
    else:
        _conversation(chat, image, max_new_tokens, sampling)


def _turn(
    chat: ChatModel,
    messages: list[dict[str, Any]],
    images: list[np.ndarray],
    text: str,
    image: Path | None,
    max_new_tokens: int,
    sampling: Sampling,
) -> str:
    """One user turn: the answer streamed to stdout, stats to stderr; both turns kept in ``messages``."""
    add_turn(messages, images, text, image)
    answer = chat.answer(
        messages,
        images,
        max_new_tokens,
        sampling,
        on_text=lambda piece: console.print(piece, end="", highlight=False, markup=False, soft_wrap=True),
    )
    console.print()
    err_console.print(f"[dim]{chat.last_stats}[/]")
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answer


def _conversation(chat: ChatModel, image: Path | None, max_new_tokens: int, sampling: Sampling) -> None:
    """Read user turns from stdin until EOF or an empty line; --image goes with the first turn.
    The whole conversation is the prompt of every answer."""
    messages: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err_console.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line.strip():
            return
        _turn(chat, messages, images, line.strip(), image, max_new_tokens, sampling)
        image = None

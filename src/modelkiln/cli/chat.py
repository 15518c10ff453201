"""``kiln chat MODEL PROMPT [--image F]``: answer streamed to the terminal."""

from __future__ import annotations

from pathlib import Path

import typer

from modelkiln.log import console, err_console


def chat_cmd(
    model: str = typer.Argument(
        ...,
        help="An exported folder (kiln export qwen2-vl…), qwen2-vl-tiny / qwen2.5-vl-tiny, or a weights folder.",
    ),
    prompt: str = typer.Argument(..., help="What to ask."),
    image: Path = typer.Option(None, "--image", help="An image to ask about."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (reproducible answers)."),
    decoder: str = typer.Option(
        None, "--decoder", help="Decoder file in the folder to use instead (e.g. an INT8 one)."
    ),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
) -> None:
    """Chat with a Qwen2-VL model on ONNX Runtime (our decoder step, vision encoder and KV cache)."""
    from modelkiln.genai.chat import ChatModel
    from modelkiln.genai.images import read_rgb

    if not prompt.strip():
        from modelkiln.errors import BadInput

        raise BadInput("chat: the prompt is empty")
    if image is not None:
        read_rgb(image)  # bad images fail before the model is built
    with err_console.status(f"loading {model}…"):
        chat = ChatModel.open(model, decoder, threads)
    chat.reply(
        prompt,
        image,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        on_text=lambda piece: console.print(piece, end="", highlight=False, markup=False, soft_wrap=True),
    )
    console.print()
    err_console.print(f"[dim]{chat.last_stats}[/]")

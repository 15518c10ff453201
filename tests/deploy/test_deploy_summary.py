"""summary.json is a user-facing file: the per-precision dataclasses write exactly the keys it has
always had, and read a written file back into the same figures."""

from __future__ import annotations

import json

import pytest

from modelkiln.deploy.summary import (
    Agreement,
    BatchFigures,
    ChatFigures,
    ChatQuality,
    ChatSpeed,
    DeploySummary,
    Int8Format,
    LayerAgreement,
    LayerSnr,
    OutputAgreement,
    PrecisionFigures,
)

#: An image model's summary.json as deploy has always written it (values made up).
IMAGE_SUMMARY = {
    "model": "m.onnx",
    "zoo": "efficientnet_lite0",
    "task": "classification",
    "stages": {"export": 0.5, "optimize": 1.25},
    "files": {"fp32": "/out/work/fp32.onnx"},
    "precisions": {
        "fp32": {
            "agreement": {
                "samples": 16,
                "outputs": [
                    {
                        "name": "logits",
                        "cosine": 1.0,
                        "snr_db": 120.0,
                        "max_abs": 0.0,
                        "topk_agreement": {"top1": 1.0, "top5": 1.0},
                    }
                ],
            },
            "task": {"top1": 0.75, "top5": 0.9},
            "bench": {
                "batch1": {
                    "p50_ms": 1.5,
                    "p99_ms": 2.0,
                    "min_ms": 1.25,
                    "throughput": 650.0,
                    "iterations": 90,
                },
                "batch8": {
                    "p50_ms": 9.0,
                    "p99_ms": 11.0,
                    "min_ms": 8.5,
                    "throughput": 880.0,
                    "iterations": 40,
                },
            },
            "size_mb": 18.5,
        },
        "int8": {
            "agreement": {
                "samples": 16,
                "outputs": [
                    {
                        "name": "logits",
                        "cosine": 0.998,
                        "snr_db": 24.0,
                        "max_abs": 0.5,
                        "topk_agreement": None,
                    }
                ],
                "layer_plot": "/out/plots/int8_layer_snr.png",
                "first_collapse": None,
                "worst_layers": [{"name": "conv_3", "snr_db": 18.0}],
            },
            "bench": {
                "batch1": {
                    "p50_ms": 0.5,
                    "p99_ms": 0.75,
                    "min_ms": 0.25,
                    "throughput": 1900.0,
                    "iterations": 300,
                }
            },
            "size_mb": 5.0,
        },
    },
    "optimize": {"before": {"nodes": 10}, "after": {"nodes": 8}, "rewrites": {"fuse": 2}},
    "int8": {"quantized_ops": {"Conv": 3}, "kept_float": {}},
    "notes": ["a note"],
    "failed": None,
    "command": "kiln deploy m.onnx",
    "cpu": {"description": "some cpu", "arch": "x86_64"},
    "int8_format": {
        "format": "portable",
        "weights": "s8",
        "activations": "u8",
        "requires": "",
        "requested": "portable",
    },
}

CHAT_SUMMARY = {
    **IMAGE_SUMMARY,
    "model": "qwen2-vl-tiny",
    "zoo": "qwen2-vl-tiny",
    "task": "generation",
    "precisions": {
        "fp32": {
            "parity_max_abs": 1e-6,
            "bench": {
                "ttft_ms_median": 2.0,
                "ttft_ms_min": 1.5,
                "decode_tok_s_median": 900.0,
                "decode_tok_s_max": 950.0,
            },
            "size_mb": 1.2,
        },
        "int8": {
            "quality": {
                "logit_cosine_mean": 0.9995,
                "logit_cosine_min": 0.999,
                "top1_agreement": 0.97,
                "steps": 96,
            },
            "vision_cosine_min": 0.9991,
            "bench": {
                "ttft_ms_median": 1.5,
                "ttft_ms_min": 1.25,
                "decode_tok_s_median": 1200.0,
                "decode_tok_s_max": 1300.0,
            },
            "size_mb": 0.4,
        },
    },
    "int8_format": {},
}


@pytest.mark.parametrize("saved", [IMAGE_SUMMARY, CHAT_SUMMARY], ids=["image", "chat"])
def test_summary_json_round_trips_with_the_same_keys(saved: dict) -> None:
    summary = DeploySummary.from_dict(json.loads(json.dumps(saved)))
    again = summary.to_dict()
    assert again == saved
    assert list(again) == list(saved)  # same keys, same order
    for name, figures in saved["precisions"].items():
        assert list(again["precisions"][name]) == list(figures)


def test_figures_are_read_as_dataclasses() -> None:
    image = DeploySummary.from_dict(IMAGE_SUMMARY)
    fp32, int8 = image.precisions["fp32"], image.precisions["int8"]
    assert isinstance(fp32, PrecisionFigures) and isinstance(int8, PrecisionFigures)
    assert fp32.bench[8] == BatchFigures(9.0, 11.0, 8.5, 880.0, 40)
    assert fp32.agreement is not None and fp32.agreement.first_top1 == 1.0 and fp32.agreement.layers is None
    assert fp32.first_task_metric == 0.75 and int8.task is None and list(int8.bench) == [1]
    assert int8.agreement == Agreement(
        16,
        (OutputAgreement("logits", 0.998, 24.0, 0.5),),
        LayerAgreement("/out/plots/int8_layer_snr.png", None, (LayerSnr("conv_3", 18.0),)),
    )
    assert image.int8_format == Int8Format("portable", "s8", "u8", "", "portable")
    chat = DeploySummary.from_dict(CHAT_SUMMARY)
    assert chat.is_chat and chat.int8_format is None and chat.image_precisions() == {}
    q = chat.chat_figures("int8")
    assert q.quality == ChatQuality(0.9995, 0.999, 0.97, 96)
    assert q.bench == ChatSpeed(1.5, 1.25, 1200.0, 1300.0)


def test_stages_fill_figures_in_turn_and_write_only_what_was_measured() -> None:
    summary = DeploySummary("m.onnx", None, None)
    summary.figures("fp32").size_mb = 2.0
    summary.figures("fp32").bench[1] = BatchFigures(1.0, 2.0, 0.5, 100.0, 10)
    assert summary.to_dict()["precisions"] == {
        "fp32": {
            "bench": {
                "batch1": {"p50_ms": 1.0, "p99_ms": 2.0, "min_ms": 0.5, "throughput": 100.0, "iterations": 10}
            },
            "size_mb": 2.0,
        }
    }
    assert summary.to_dict()["int8_format"] == {}  # no INT8 stage: an empty object, as always
    with pytest.raises(TypeError, match="not a chat model's"):
        summary.chat_figures("fp32")
    chat = DeploySummary("qwen2-vl-tiny", "qwen2-vl-tiny", "generation")
    chat.chat_figures("fp32").parity_max_abs = 1e-6
    assert isinstance(chat.precisions["fp32"], ChatFigures)
    assert chat.to_dict()["precisions"] == {"fp32": {"parity_max_abs": 1e-6}}

"""PyTorch -> ONNX export of zoo models, checked against torch before the file is kept; Qwen-VL
language models are built from their weights (``export.builder``) instead of traced."""

from modelkiln.export.exporter import ExportResult
from modelkiln.export.qwen_vl import export

__all__ = ["ExportResult", "export"]

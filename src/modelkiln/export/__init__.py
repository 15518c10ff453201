"""PyTorch -> ONNX export of zoo models, checked against torch before the file is kept."""

from modelkiln.export.exporter import ExportResult, export

__all__ = ["ExportResult", "export"]

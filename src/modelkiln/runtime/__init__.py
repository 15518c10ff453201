"""Runtime: backends that run ONNX models (ONNX Runtime CPU by default)."""

"""ONNX graphs built layer by layer from a checkpoint's weights instead of traced from torch: each
weight is read, converted (FP32, FP16 or 8-bit MatMulNBits) and written to the graph's external
data file in turn, so a model never sits in memory whole. ``qwen2`` lays out the Qwen2-VL /
Qwen2.5-VL language model (token embedding and decoder step)."""

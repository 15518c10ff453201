"""Local generation on our own stack (ONNX Runtime): the Qwen-VL engine grows here."""

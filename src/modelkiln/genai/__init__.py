"""Local generation on our own stack (ONNX Runtime): the Qwen-VL engine (static KV cache from the
memory pool, I/O binding, sampling, continuous batching), prompt processing and chat."""

"""INT8 post-training quantization: calibration, QDQ placement, and the quantize verb."""

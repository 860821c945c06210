"""Stage 1: PyTorch reference modules → ONNX graphs (``wan_trt.export``)."""

"""wan-trt: deploy Wan 2.2 Animate 14B through ONNX, ONNX Runtime and TensorRT."""

__version__ = "0.1.0"

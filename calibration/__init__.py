"""Stage 2: calibration and FP8/INT8 Q/DQ graphs of the DiT (``wan_trt.calibration``).

``collect`` records activation ranges (``wan-trt calibrate``) into a ``cache``; ``policy`` says which
layers are quantized; ``quantize`` turns both into a plan and simulates it in PyTorch; ``qdq`` writes
the plan into the ONNX graph; ``quantized`` ties them together for ``wan-trt build``.
"""

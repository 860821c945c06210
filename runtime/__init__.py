"""Stage 3: the lean runtime — engines behind one interface, the scheduler, the pipeline (``wan_trt.runtime``).

The ONNX Runtime and TensorRT paths import neither diffusers nor transformers.
"""

# wan-trt with TensorRT and onnxruntime-gpu. Build: docker build -t wan-trt .
# Deploy the real model: mount a folder holding the checkpoint (either download layout of
# Wan2.2-Animate-14B) and a preprocessed folder (wan-trt preprocess, run outside this image: it has no
# MediaPipe); build bf16 ONNX graphs and TensorRT engines from the checkpoint, then animate:
#   docker run --gpus all -v "$PWD:/work" wan-trt build --preset animate-14b \
#          --checkpoint /work/Wan2.2-Animate-14B --precision bf16 --backend all --out /work/engines
#   docker run --gpus all -v "$PWD:/work" wan-trt infer --engines /work/engines --backend tensorrt \
#          --input /work/preprocessed --out /work/animation.mp4
# Not run yet: TensorRT cannot be installed on the project's machines (README.md, docs/cli.md).
FROM nvcr.io/nvidia/tensorrt:25.10-py3

WORKDIR /opt/wan-trt
COPY pyproject.toml README.md ./
COPY wan_trt ./wan_trt
COPY export ./export
COPY calibration ./calibration
COPY runtime ./runtime

# The README's install with the [trt,gpu] extras. onnxruntime (a base dependency) and
# onnxruntime-gpu ship the same import package, so the CPU one is removed and the GPU one reinstalled.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trt,gpu]" \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install --no-cache-dir "onnxruntime-gpu>=1.22"

# `infer --fast` keeps torch.compile's kernels here, in the mounted folder, so that the next `docker run`
# skips compiling them (docs/cli.md, "The fast GPU path").
ENV WAN_TRT_COMPILE_CACHE=/work/.wan-trt/torch-compile
WORKDIR /work
ENTRYPOINT ["wan-trt"]
CMD ["--help"]

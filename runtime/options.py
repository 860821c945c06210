"""How a run opens its engines: the backend, the device, the ``--fast`` path and the ranks of ``--gpus``.

``wan-trt infer`` makes one :class:`RuntimeOptions` from its command line; the same object goes down to
``runtime.loading`` and ``runtime.fast.engines``. The rules between these options are checked once, when
it is made, so a bad combination fails before any file is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from wan_trt.errors import BadInputError


@dataclass(frozen=True)
class RuntimeOptions:
    backend: str = "onnxruntime"  # onnxruntime | torch | tensorrt
    device: str = "cpu"  # cpu | cuda | tensorrt (onnxruntime-gpu's providers, or CUDA for torch)
    gpus: int = 1  # > 1: one rank of `infer --gpus N` (wan_trt.launch), the DiT sequence-parallel
    fast: bool = False  # --fast: the torch backend's fast GPU path (wan_trt.runtime.fast)
    fp8_attention_kernel: str = "auto"  # with --fast: auto | cudnn | fa3
    fp8_attention_smoothing: str = "auto"  # with --fast and fp8 engines: auto | none | k | v | kv
    max_gpu_memory: int | None = None  # with --fast: bytes the run may use on the GPU (--max-gpu-memory)
    # the pre-flight's plan for max_gpu_memory: None (as without it), or loaded on the host and this many
    # DiT blocks streamed from there (0: none; the rest stay on the GPU)
    stream_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.gpus > 1:
            self._check_sequence_parallel()
        if self.fast and (self.backend != "torch" or self.device != "cuda" or self.gpus > 1):
            raise BadInputError(f"--fast runs on --backend torch --device cuda with one GPU (got --backend "
                                f"{self.backend} --device {self.device} --gpus {self.gpus}): use those options or "
                                "drop --fast")
        if self.fp8_attention_kernel != "auto" and not self.fast:
            raise BadInputError(f"--fp8-attention-kernel {self.fp8_attention_kernel} chooses the FP8 attention of "
                                "--fast: add --fast or drop it")
        if (self.max_gpu_memory is not None or self.stream_blocks is not None) and not self.fast:
            raise BadInputError("--max-gpu-memory plans the memory of --fast (--backend torch --device cuda): "
                                "add --fast or drop it")
        if self.fp8_attention_smoothing != "auto" and not self.fast:
            raise BadInputError(f"--fp8-attention-smoothing {self.fp8_attention_smoothing} sets the FP8 attention of "
                                "--fast: add --fast or drop it")

    def _check_sequence_parallel(self) -> None:
        if self.backend != "torch":
            raise BadInputError(f"--gpus {self.gpus} needs --backend torch (the sequence-parallel DiT runs in PyTorch)")
        if self.device not in ("cpu", "cuda"):
            raise BadInputError(f"--gpus {self.gpus} --device {self.device}: use --device cuda "
                                "(or cpu: gloo processes)")

    @property
    def engine_device(self) -> str:
        """The device the engines run on: ``--backend tensorrt`` implies cuda."""
        return "cuda" if self.backend == "tensorrt" else self.device

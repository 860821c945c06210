"""Where work on a tensor runs: on its own device, except that inside :func:`host_work_on_gpu` work on a host
tensor runs on the GPU. Used where the result is the same on either (exact integer hashing, maxima,
tensor-by-tensor IEEE arithmetic, casts) and the host is the slow side: the random weights, the weight
scales and the quantized weights of a model loaded on the host (``infer --fast --max-gpu-memory``'s host
plans, 17 B weights). Outside that context nothing changes: a CPU run stays on the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_GPU_FOR_HOST_WORK = False


@contextlib.contextmanager
def host_work_on_gpu() -> Iterator[None]:
    """Inside: host tensors' work goes to the GPU, when there is one."""
    global _GPU_FOR_HOST_WORK
    before, _GPU_FOR_HOST_WORK = _GPU_FOR_HOST_WORK, torch.cuda.is_available()
    try:
        yield
    finally:
        _GPU_FOR_HOST_WORK = before


def compute_device(device: torch.device | str) -> torch.device:
    """The device that computes for tensors that live on ``device``."""
    device = torch.device(device)
    return torch.device("cuda") if device.type == "cpu" and _GPU_FOR_HOST_WORK else device


def to_compute_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where its work runs (:func:`compute_device`): itself, or a GPU copy of a host tensor."""
    return tensor.to(compute_device(tensor.device))

"""Where work on a tensor runs: on its own device, except that work on a host tensor runs on the GPU when
there is one. Used where the result is the same on either (exact integer hashing, maxima, IEEE-rounded
elementwise arithmetic, casts) and the host is the slow side: the random weights, the weight scales and the
quantized weights of a model loaded on the host (``infer --fast --max-gpu-memory``'s host plans, 17 B weights)."""

from __future__ import annotations

import torch


def compute_device(device: torch.device | str) -> torch.device:
    """The device that computes for tensors that live on ``device``."""
    device = torch.device(device)
    return torch.device("cuda") if device.type == "cpu" and torch.cuda.is_available() else device

"""Random weights that are the same on every device, in their own dtype, made where they will live
(a host tensor's values drawn on the GPU inside ``wan_trt.devices.host_work_on_gpu``: the same values).

The ``counter`` scheme of presets that need a checkpoint (``animate-14b --random-weights``, and
``tiny-gpu`` so that CI runs the same code on the CPU): each module is built with its parameters on
the meta device (``wan_trt.checkpoints.parameters_on_meta``), then every parameter gets storage on
the target device and values from a counter-based integer hash of (seed, component, parameter name,
element index) — no random-number generator state, so the values do not depend on the device, on the
order of generation or on chunking, and the fp32 value of every element is exact. A parameter is
generated in fp32 chunk by chunk and cast to its dtype as it is written, so neither the host nor the
GPU ever holds an fp32 copy of the model: ``animate-14b``'s 23.7 B parameters appear on an H100 in
bf16 in seconds, and its weights hash is a digest of the scheme's inputs (no pass over 95 GB).

Distributions (uniform, with the standard deviation of the init they stand for): Linear and Conv
weights and biases as torch's ``reset_parameters`` (±1/√fan_in); Embedding std 1; norm weights 1 and
biases 0; diffusers' ``scale_shift_table`` std 1/√dim; zeros for other biases, paddings and position
embeddings; std 1 for every other parameter (custom modules that scale their weights at run time, as
the motion encoder's). Persistent buffers keep the values their constructors computed.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from wan_trt.devices import compute_device
from wan_trt.dtypes import keeps_fp32

SCHEME = "counter-v1"  # bump when the values below change: it is part of every weights hash of this scheme
_CHUNK = 1 << 24  # elements drawn at once on a GPU (int64 intermediates: 128 MiB; fewer kernel launches)
_CPU_CHUNK = 1 << 18  # on the CPU: intermediates that stay in cache (measured: 15x faster than 1 << 24)
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B
_STANDARD = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


def _key(seed: int, component: str, name: str) -> tuple[int, int]:
    digest = hashlib.sha256(f"{SCHEME}:{seed}:{component}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def _mix(h: torch.Tensor) -> torch.Tensor:
    """One round of a 32-bit integer finaliser on int64 values below 2**32 (no overflow anywhere)."""
    h = torch.bitwise_xor(h, h >> 16)
    return (h * _MIX) & _MASK32


def uniform_values(count: int, start: int, key: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """fp32 values in [-1, 1) for elements ``start .. start+count`` of the stream ``key`` (exact, device-free)."""
    index = torch.arange(start, start + count, device=device, dtype=torch.int64)
    h = _mix(_mix((index + key[0]) & _MASK32))
    h = _mix(torch.bitwise_xor(h, key[1]))
    h = torch.bitwise_xor(h, h >> 16)
    return (h >> 8).to(torch.float32) * (2.0 / (1 << 24)) - 1.0  # 24 bits: exact in fp32


def fill_uniform_(tensor: torch.Tensor, key: tuple[int, int], bound: float,
                  draw_on: torch.device | str | None = None) -> torch.Tensor:
    """Fill ``tensor`` (any device and float dtype) with U(-bound, bound) values of stream ``key``, in chunks
    computed on ``draw_on`` (default: :func:`wan_trt.devices.compute_device`) and written into ``tensor`` in its dtype."""
    draw_on = compute_device(tensor.device) if draw_on is None else torch.device(draw_on)
    chunk = _CPU_CHUNK if draw_on.type == "cpu" else _CHUNK
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), chunk):
        count = min(chunk, flat.numel() - start)
        flat[start:start + count] = (uniform_values(count, start, key, draw_on) * bound).to(tensor.dtype)
    return tensor


def _bound(module: torch.nn.Module, name: str, shape: tuple[int, ...]) -> float:
    """Half-width of the uniform distribution of parameter ``name`` of ``module`` (0: constant fill)."""
    sqrt3 = math.sqrt(3.0)
    if isinstance(module, _STANDARD):
        weight = module.weight
        fan_in = weight.numel() // weight.shape[0] if weight.dim() > 1 else weight.numel()
        return 1.0 / math.sqrt(max(fan_in, 1))
    if isinstance(module, torch.nn.Embedding):
        return sqrt3
    if name == "scale_shift_table":
        return sqrt3 / math.sqrt(shape[-1])
    if "bias" in name or "padding" in name or "pos_embed" in name or isinstance(module, _NORMS) \
            or ("Norm" in type(module).__name__ and name == "weight"):
        return 0.0
    return sqrt3


def _constant(module: torch.nn.Module, name: str) -> float:
    norm = isinstance(module, _NORMS) or "Norm" in type(module).__name__
    return 1.0 if norm and name == "weight" else 0.0


@torch.no_grad()
def materialize_random_(model: torch.nn.Module, component: str, *, seed: int, device: torch.device | str,
                        dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give every meta parameter of ``model`` storage on ``device`` and its ``counter`` values, in ``dtype``
    (fp32 where a dotted name contains one of ``keep_fp32``); move the buffers there too."""
    def target(full: str) -> torch.dtype:
        return torch.float32 if keeps_fp32(full, keep_fp32) else dtype

    # Tied tensors (one under several names) stay tied; the originals are kept alive so that ids stay unique.
    made: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in made:
                module._parameters[name] = made[id(param)][1]
                continue
            if param.device.type != "meta":
                raise ValueError(f"{component}: parameter {mod_name}.{name} is not on the meta device")
            full = f"{mod_name}.{name}" if mod_name else name
            value = torch.empty(param.shape, device=device, dtype=target(full) if param.is_floating_point()
                                else param.dtype)
            bound = _bound(module, name, tuple(param.shape))
            if bound:
                fill_uniform_(value, _key(seed, component, full), bound)
            else:
                value.fill_(_constant(module, name))
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            made[id(param)] = (param, module._parameters[name])
            made[id(module._parameters[name])] = (module._parameters[name], module._parameters[name])
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) not in moved:
                full = f"{mod_name}.{name}" if mod_name else name
                new = buffer.to(device=device, dtype=target(full) if buffer.is_floating_point() else buffer.dtype)
                moved[id(buffer)], moved[id(new)] = (buffer, new), (new, new)
            module._buffers[name] = moved[id(buffer)][1]
    return model.eval().requires_grad_(False)


def counter_weights_hash(preset_json: dict[str, Any], seed: int, vocab_size: int,
                         lora: dict[str, Any] | None = None) -> str:
    """The weights hash of the ``counter`` scheme: a digest of what determines every value."""
    payload = json.dumps({"scheme": SCHEME, "preset": preset_json, "seed": seed, "vocab_size": vocab_size,
                          "lora": lora}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

"""One rule for casting a module to an inference dtype, used by every caller that casts.

A float tensor stays fp32 when a component of its dotted name (``blocks.0.norm2.weight`` →
``blocks``, ``0``, ``norm2``, ``weight``) is one of the ``keep`` names — diffusers'
``_keep_in_fp32_modules`` and ``from_pretrained(torch_dtype=...)`` semantics; everything else floating
takes the target dtype. Integer and FP8/INT8 (already quantized) tensors are never touched.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import torch

QUANTIZED_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.int8})


def keeps_fp32(name: str, keep: Collection[str]) -> bool:
    """Whether the tensor called ``name`` (dotted) stays fp32 under the ``keep`` names."""
    return not set(name.split(".")).isdisjoint(keep)


def cast_floats(module: torch.nn.Module, dtype: torch.dtype, keep: Iterable[str] = (), *,
                device: torch.device | str | None = None, skip: tuple[str, ...] = (),
                fp32_modules: Collection[str] = ()) -> torch.nn.Module:
    """Cast ``module``'s float parameters and buffers in place to ``dtype`` (fp32 where ``keep`` names them,
    and the tensors owned by the sub-modules at the paths ``fp32_modules``), moving them to ``device`` if given.

    ``skip``: name prefixes left as they are. Parameters keep their identity (tied weights stay tied);
    a buffer shared by several modules becomes one new tensor."""
    keep = frozenset(keep)
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id → (original kept alive: ids stay unique, cast)
    for owner, sub in module.named_modules(remove_duplicate=False):
        for store in (sub._parameters, sub._buffers):
            for name, value in list(store.items()):
                full = f"{owner}.{name}" if owner else name
                if value is None or full.startswith(skip):
                    continue
                if id(value) not in done:
                    done[id(value)] = value, _cast(value, dtype, device,
                                                   fp32=keeps_fp32(full, keep) or owner in fp32_modules)
                if store is sub._buffers:
                    store[name] = done[id(value)][1]
    return module


def _cast(value: torch.Tensor, dtype: torch.dtype, device, fp32: bool) -> torch.Tensor:
    target = value.dtype
    if value.is_floating_point() and value.dtype not in QUANTIZED_DTYPES:
        target = torch.float32 if fp32 else dtype
    if target != value.dtype or (device is not None and value.device != torch.device(device)):
        moved = value.data.to(device=device if device is not None else value.device, dtype=target)
        if isinstance(value, torch.nn.Parameter):
            value.data = moved
        else:
            value = moved
    return value

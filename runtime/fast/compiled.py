"""The fast path's fused element-wise kernels: each function ``torch.compile``-d once per process and
shared by every module that uses it (each new input shape compiles once more, as its options say).

On the GPU the fast modules call :func:`on_device`'s compiled function; on the CPU (tests, CI) they run the
function as written, which is the numerics the compiled kernels are tested against.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

#: Inductor keeps each explicit cast to bf16 (the reference's rounding points) inside a fused kernel; without
#: it, values are carried in fp32 through the kernel and the fast path drifts from the eager reference
#: (tests/test_fast_torch.py::test_compiled_glue_rounds_as_the_reference).
REFERENCE_ROUNDING = {"emulate_precision_casts": True}

_COMPILED: dict[tuple, Callable] = {}


def compile_once(fn: Callable, *, dynamic: bool | None = None, fullgraph: bool = False,
                 options: dict[str, Any] | None = None) -> Callable:
    """``torch.compile(fn, ...)``, made on the first call and returned again for the same arguments."""
    key = (fn, dynamic, fullgraph, tuple(sorted((options or {}).items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=dynamic, fullgraph=fullgraph, options=options)
    return _COMPILED[key]


def on_device(fn: Callable, device: torch.device, **compile_options: Any) -> Callable:
    """``fn`` compiled (:func:`compile_once`) for a CUDA device, ``fn`` itself for any other."""
    return compile_once(fn, **compile_options) if device.type == "cuda" else fn

"""The fast path's fused element-wise kernels: each function ``torch.compile``-d once per process and
shared by every module that uses it (each new input shape compiles once more, as its options say).

On the GPU the fast modules call :func:`on_device`'s compiled function; on the CPU (tests, CI) they run the
function as written, which is the numerics the compiled kernels are tested against.

Compiling them is most of the first denoising step's warm-up on a fresh machine. Inductor keeps what it
compiled on disk and reuses it in the next process, but by default under ``/tmp``, which a reboot or a fresh
container (one ``docker run`` per video) empties: :func:`use_persistent_compile_cache` moves that cache to
a folder that lasts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Where ``--fast`` keeps torch.compile's kernels between runs, if set (else ``~/.cache/wan-trt/torch-compile``).
COMPILE_CACHE_ENV = "WAN_TRT_COMPILE_CACHE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch's own setting, which wins when the user set it

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


def compile_times() -> list[float] | None:
    """Seconds of each torch.compile this process has made so far (Dynamo and Inductor; empty before the
    first), from torch's own compile-time metrics; None if this torch does not keep them under the name read
    here (``torch._dynamo.utils.compilation_time_metrics``, present in torch 2.1 to 2.13)."""
    dynamo_utils = sys.modules.get("torch._dynamo.utils")
    if dynamo_utils is None:
        return []  # nothing compiled: torch.compile imports it
    metrics = getattr(dynamo_utils, "compilation_time_metrics", None)
    if metrics is None:
        return None
    return [float(t) for t in metrics.get("_compile.compile_inner", ())]


def persistent_compile_cache_dir() -> Path:
    """``$WAN_TRT_COMPILE_CACHE``, else ``torch-compile`` under ``$XDG_CACHE_HOME/wan-trt`` (``~/.cache/wan-trt``)."""
    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "wan-trt" / "torch-compile"


def use_persistent_compile_cache() -> Path | None:
    """Point Inductor's on-disk cache at :func:`persistent_compile_cache_dir`, unless the user set
    ``$TORCHINDUCTOR_CACHE_DIR`` (importing ``torch._dynamo``, as diffusers does, sets it to Inductor's default
    folder: that value does not count); call before the first compile. Returns the folder in use, or None
    (logged) when the persistent one cannot be made: Inductor then keeps its default."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    folder = persistent_compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):  # e.g. made by a root container, used by another user
            raise PermissionError(13, "not writable")
    except OSError as exc:
        log.warning("torch.compile's cache stays in its default folder (lost at reboot): cannot write to %s (%s); "
                    "set %s to a writable folder", folder, exc.strerror or exc, COMPILE_CACHE_ENV)
        return None
    os.environ[INDUCTOR_CACHE_ENV] = str(folder.resolve())
    return folder

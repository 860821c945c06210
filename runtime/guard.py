"""Guard on every engine call: NaN/Inf in an output (a cheap reduction per output) and an allocation failure
inside the engine each become one line naming the graph (exit 3) instead of a backend's traceback.

With a fallback engine (``--fallback torch``) the failing call is re-run on the PyTorch reference
instead of stopping the run; the substitution is logged loudly.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Mapping

import torch

from wan_trt.errors import EngineError, WanTrtError
from wan_trt.runtime.engines import Engine

log = logging.getLogger(__name__)


class FiniteGuard:
    """Engine wrapper that refuses (or replaces) outputs containing NaN or Inf, and turns an allocation failure
    inside the engine into one line."""

    def __init__(self, engine: Engine, fallback: Callable[[], Engine] | None = None) -> None:
        self.engine, self.spec = engine, engine.spec
        self._fallback_factory, self._fallback = fallback, None
        self.calls = 0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        try:  # with a fallback, the engine gets a copy: streamed caches it takes stay here for the re-run
            # (so --fallback torch keeps two generations of the fast VAE's caches alive, as explicit caches do)
            outputs = self.engine.run(dict(feed) if self._fallback_factory else feed)
        except Exception as error:  # noqa: BLE001 - ORT's Fail is a plain Exception; torch's OutOfMemoryError
            raise out_of_memory(self.spec.name, error) or error
        bad = [name for name, value in outputs.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if not bad:
            return outputs
        where = f"{self.spec.name} (call {self.calls}) produced NaN/Inf in {', '.join(bad)}"
        if self._fallback_factory is None:
            raise EngineError(f"{where}: re-run with --fallback torch to use the PyTorch reference for such calls")
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        log.warning("%s; re-running this call on the PyTorch reference (--fallback torch)", where)
        return self._fallback.run(feed)


_ALLOCATION_FAILURES = ("Failed to allocate memory", "can't allocate memory", "out of memory", "bad_alloc")
_REQUESTED_BYTES = re.compile(r"(?:buffer of size|you tried to allocate) (\d+)")


def out_of_memory(graph: str, error: BaseException) -> EngineError | None:
    """An allocation failure inside an engine as one line naming the graph and the bytes asked for (exit 3),
    or None when ``error`` is something else. Pre-flight refuses the runs it can foresee; this is for the rest."""
    text = str(error)
    allocation = isinstance(error, MemoryError) or any(marker in text for marker in _ALLOCATION_FAILURES)
    if isinstance(error, WanTrtError) or not allocation:
        return None
    requested = _REQUESTED_BYTES.search(text)
    asked = f" (it asked for {int(requested.group(1)) / 1024**3:.1f} GiB in one buffer)" if requested else ""
    return EngineError(f"{graph} ran out of memory{asked}: this size needs more memory than this machine has: "
                       "preprocess the driving video smaller (wan-trt preprocess --resolution), use shorter "
                       "--segment-frames, or run on a GPU with more memory")


def guard_engines(engines: Mapping[str, Engine], fallback: Callable[[], Mapping[str, Engine]] | None = None
                  ) -> dict[str, FiniteGuard]:
    """Wrap every engine; ``fallback`` builds the reference engines only if some call needs them."""
    cache: dict[str, Mapping[str, Engine]] = {}

    def reference(name: str) -> Callable[[], Engine]:
        def make() -> Engine:
            if "engines" not in cache:
                cache["engines"] = fallback()
            return cache["engines"][name]
        return make

    return {name: FiniteGuard(engine, reference(name) if fallback else None) for name, engine in engines.items()}

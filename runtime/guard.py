"""NaN/Inf guard on every engine call: a cheap reduction per output, naming the graph and the call.

With a fallback engine (``--fallback torch``) the failing call is re-run on the PyTorch reference
instead of stopping the run; the substitution is logged loudly.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch

from wan_trt.errors import EngineError
from wan_trt.runtime.engines import Engine

log = logging.getLogger(__name__)


class FiniteGuard:
    """Engine wrapper that refuses (or replaces) outputs containing NaN or Inf."""

    def __init__(self, engine: Engine, fallback: Callable[[], Engine] | None = None) -> None:
        self.engine, self.spec = engine, engine.spec
        self._fallback_factory, self._fallback = fallback, None
        self.calls = 0

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        outputs = self.engine.run(feed)
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

"""NaN/Inf guard: one clear error naming the graph, or a logged re-run on the reference (--fallback torch)."""

from __future__ import annotations

import pytest
import torch

from wan_trt.components import GraphSpec, TensorSpec
from wan_trt.errors import EngineError
from wan_trt.runtime.guard import guard_engines

SPEC = GraphSpec("transformer", "transformer", (TensorSpec("x", "float32", ("B",)),),
                 (TensorSpec("velocity", "float32", ("B",)),))


class Fixed:
    def __init__(self, value: float) -> None:
        self.spec, self.value, self.calls = SPEC, value, 0

    def run(self, feed):
        self.calls += 1
        return {"velocity": torch.full_like(feed["x"], self.value)}


def test_nan_is_refused_naming_the_graph_and_call():
    engines = guard_engines({"transformer": Fixed(float("nan"))})
    with pytest.raises(EngineError, match=r"transformer \(call 1\) produced NaN/Inf in velocity.*--fallback torch"):
        engines["transformer"].run({"x": torch.zeros(2)})


def test_finite_outputs_pass_and_fallback_is_built_only_when_needed(caplog):
    built = []

    def reference():
        built.append(1)
        return {"transformer": Fixed(1.0)}

    healthy = guard_engines({"transformer": Fixed(0.5)}, reference)
    assert torch.equal(healthy["transformer"].run({"x": torch.zeros(2)})["velocity"], torch.full((2,), 0.5))
    assert built == []
    broken = guard_engines({"transformer": Fixed(float("inf"))}, reference)
    out = broken["transformer"].run({"x": torch.zeros(3)})
    assert torch.equal(out["velocity"], torch.ones(3)) and built == [1]
    assert "re-running this call on the PyTorch reference" in caplog.text


def test_loading_phases_sum_per_name_in_order_and_parse_back(monkeypatch):
    """``run_report.Phases`` (the fast path's one 'loaded' log line) adds repeated phases, keeps their order,
    and ``benchmarks/end_to_end.py`` reads the line back into seconds per phase (a fake clock: 1 s a tick)."""
    import itertools

    from benchmarks.end_to_end import _LOADED_LINE, _PHASE
    from wan_trt.runtime import run_report

    clock = itertools.count()
    monkeypatch.setattr(run_report.time, "perf_counter", lambda: float(next(clock)))
    phases = run_report.Phases()
    for name in ("modules", "to GPU", "modules"):
        with phases(name):
            pass
    assert phases.seconds == {"modules": 2.0, "to GPU": 1.0} and list(phases.seconds) == ["modules", "to GPU"]
    line = _LOADED_LINE.search(f"INFO fast path loaded: {phases}\n").group(1)
    assert {m.group(1).strip(): float(m.group(2)) for m in _PHASE.finditer(line)} == phases.seconds

"""``--compare torch``: per-component errors of the engines against the PyTorch reference.

While the engines run, a recorder keeps the first call of every graph (inputs and outputs). Each
recorded call is then replayed on the PyTorch reference and compared; the whole video is also
generated on the reference and compared as pictures (PSNR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from wan_trt import registry
from wan_trt.components import CACHE_OUTPUT_PREFIX
from wan_trt.metrics import max_abs, relative_l2
from wan_trt.registry import COMPONENT_TOLERANCE, QDQ_TOLERANCE, VAE_QDQ_TOLERANCE  # noqa: F401  (re-exported)
from wan_trt.runtime.engines import Engine

VIDEO_PSNR_MIN = 40.0  # dB, engines' video vs the reference's
# The graphs a policy's ``vae_decoder_convs`` makes Q/DQ (the registry's ``quantized_by``); read by the build.
VAE_DECODER_GRAPHS = tuple(name for name, graph in registry.GRAPHS.items()
                           if graph.quantized_by == registry.VAE_DECODER_CONVS)


def graph_tolerances(manifest) -> dict[str, float]:
    """Per-graph rel-L2 tolerances of a manifest's engines vs the PyTorch reference (others: 1e-4)."""
    return registry.graph_tolerances(manifest.quantization)


class RecordingEngine:
    """Wraps an engine and keeps a copy of its first call."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.spec = engine, engine.spec
        self.feed: dict[str, torch.Tensor] | None = None
        self.outputs: dict[str, torch.Tensor] | None = None

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = self.feed is None
        if first:  # before the call: an engine may take streamed caches out of ``feed``
            self.feed = {k: v.detach().clone() for k, v in feed.items()}
        outputs = self.engine.run(feed)
        if first:
            self.outputs = {k: v.detach().clone() for k, v in outputs.items()}
        return outputs


@dataclass
class ComponentError:
    graph: str
    output: str
    rel_l2: float
    max_abs: float
    tolerance: float = COMPONENT_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.rel_l2 <= self.tolerance


@dataclass
class CompareReport:
    backend: str
    rows: list[ComponentError] = field(default_factory=list)
    video_psnr: float | None = None

    @property
    def passed(self) -> bool:
        video_ok = self.video_psnr is None or self.video_psnr >= VIDEO_PSNR_MIN
        return video_ok and all(row.passed for row in self.rows)

    def table(self) -> str:
        lines = [f"{'graph':<20} {'output':<16} {'rel-L2':>10} {'max-abs':>10} {'tolerance':>10}  ok"]
        for row in self.rows:
            lines.append(f"{row.graph:<20} {row.output:<16} {row.rel_l2:>10.2e} {row.max_abs:>10.2e} "
                         f"{row.tolerance:>10.0e}  {'yes' if row.passed else 'NO'}")
        if self.video_psnr is not None:
            ok = "yes" if self.video_psnr >= VIDEO_PSNR_MIN else "NO"
            lines.append(f"video PSNR {self.backend} vs torch: {self.video_psnr:.2f} dB  ok (>= {VIDEO_PSNR_MIN:g} dB): {ok}")
        return "\n".join(lines)

    def failure_summary(self) -> str:
        bad = [f"{r.graph}.{r.output} rel-L2 {r.rel_l2:.2e}" for r in self.rows if not r.passed]
        if self.video_psnr is not None and self.video_psnr < VIDEO_PSNR_MIN:
            bad.append(f"video PSNR {self.video_psnr:.2f} dB < {VIDEO_PSNR_MIN:g}")
        return "; ".join(bad) + " (past tolerance)"


def compare_components(recorded: Mapping[str, RecordingEngine], reference: Mapping[str, Engine],
                       tolerances: Mapping[str, float] | None = None) -> list[ComponentError]:
    """Replay each graph's recorded first call on the reference engines and measure every output.

    ``tolerances`` overrides the rel-L2 tolerance per graph (Q/DQ graphs: 1e-3 against fake-quant).
    """
    rows = []
    for name, recorder in recorded.items():
        if recorder.feed is None:
            continue
        want = reference[name].run(recorder.feed)
        tol = (tolerances or {}).get(name, COMPONENT_TOLERANCE)
        caches = [t.name for t in recorder.spec.outputs if t.name.startswith(CACHE_OUTPUT_PREFIX)]
        for output in recorder.spec.output_names:
            if output not in caches:
                got = recorder.outputs[output]
                rows.append(ComponentError(name, output, relative_l2(got, want[output]), max_abs(got, want[output]), tol))
        if caches:  # the streamed VAE's feature caches: one row, the worst of them
            worst = max(caches, key=lambda c: relative_l2(recorder.outputs[c], want[c]))
            got = recorder.outputs[worst]
            rows.append(ComponentError(name, "caches (worst)", relative_l2(got, want[worst]), max_abs(got, want[worst]), tol))
    return rows



# ----------------------------------------------------------------------------------------------------
# wan-trt compare: every graph on several backends at fixed inputs, through Polygraphy's Comparator
# ----------------------------------------------------------------------------------------------------

def _runner(engine: Engine, label: str):
    """Polygraphy runner over one of our engines (numpy in, numpy out)."""
    import time
    from collections import OrderedDict

    import numpy as np
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EngineRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=label, prefix="wan-trt")

        def activate_impl(self) -> None:
            pass

        def deactivate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in engine.spec.inputs:
                meta.add(t.name, np.dtype(t.dtype), [-1] * len(t.dims))
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            outputs = engine.run({k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()})
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in outputs.items())

    return EngineRunner()


@dataclass
class BackendRow:
    graph: str
    backend: str
    output: str
    rel_l2: float
    median_abs: float
    p99_abs: float
    max_abs: float
    polygraphy_passed: bool


def compare_backends(backends: Mapping[str, Mapping[str, Engine]], sizes: Mapping[str, int], *, seed: int = 0,
                     atol: float = 1e-4, rtol: float = 1e-3) -> list[BackendRow]:
    """Run every graph on every backend at the same inputs; the first backend is the reference."""
    import numpy as np
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-output report goes to stdout; ours is the table
    names = list(backends)
    reference = names[0]
    rows = []
    for graph, engine in backends[reference].items():
        feed = engine.spec.sample_inputs(sizes, seed=seed)
        runners = [_runner(backends[name][graph], f"{name}:{graph}") for name in names]
        results = Comparator.run(runners, data_loader=[feed])
        accuracy = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="median"))
        passed = bool(accuracy)
        pairs = list(results.items())  # (runner name, [one IterationResult per feed])
        want = pairs[0][1][0]
        for name, (_, iterations) in zip(names[1:], pairs[1:]):
            got = iterations[0]
            for output in engine.spec.output_names:
                diff = np.abs(np.asarray(got[output], np.float64) - np.asarray(want[output], np.float64))
                rows.append(BackendRow(graph, name, output, relative_l2(got[output], want[output]),
                                       float(np.median(diff)), float(np.quantile(diff, 0.99)), float(diff.max()),
                                       passed))
    return rows


def backend_table(rows: list[BackendRow], reference: str) -> str:
    lines = [f"reference: {reference}",
             f"{'graph':<20} {'backend':<12} {'output':<16} {'rel-L2':>9} {'median':>9} {'p99':>9} {'max':>9}  polygraphy"]
    for r in rows:
        if r.output.startswith(CACHE_OUTPUT_PREFIX) and r.rel_l2 <= COMPONENT_TOLERANCE:
            continue  # caches print only when they are off
        lines.append(f"{r.graph:<20} {r.backend:<12} {r.output:<16} {r.rel_l2:>9.2e} {r.median_abs:>9.2e} "
                     f"{r.p99_abs:>9.2e} {r.max_abs:>9.2e}  {'PASSED' if r.polygraphy_passed else 'FAILED'}")
    return "\n".join(lines)

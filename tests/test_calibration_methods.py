"""Histogram calibration (MSE and entropy searches) and calibration with classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_trt.calibration.cache import load_cache
from wan_trt.calibration.collect import run_calibration
from wan_trt.calibration.histogram import AbsHistogram, entropy_amax, mse_amax
from wan_trt.calibration.quantize import QMAX, fake_quant
from wan_trt.calibration.quantized import QuantizationRequest
from wan_trt.demo_media import make_demo_inputs
from wan_trt.errors import BadInputError
from wan_trt.export.build import build_engines

FRAMES, STEPS = 5, 2


def _activations(seed: int) -> torch.Tensor:
    """Gaussian activations with a few large outliers, as LLM/DiT activations have."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200_000, generator=generator)
    x[torch.randint(0, x.numel(), (20,), generator=generator)] *= 60.0
    return x


def _error(x: torch.Tensor, amax: float, precision: str) -> float:
    return float(((fake_quant(x, amax / QMAX[precision], precision) - x) ** 2).mean())


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_mse_search_is_never_worse_than_max(precision):
    x = _activations(0)
    hist = AbsHistogram()
    for chunk in x.split(50_000):  # several calls; the range grows as outliers arrive
        hist.add(chunk)
    largest = float(x.abs().max())
    assert hist.counts.sum() == x.numel() and hist.upper > largest
    amax = mse_amax(hist, precision)
    assert 0 < amax <= largest
    assert _error(x, amax, precision) <= _error(x, largest, precision)
    if precision == "int8":  # uniform levels: trading the largest outliers' clipping for finer steps pays
        assert amax < largest and _error(x, amax, precision) < _error(x, largest, precision)

def test_entropy_search_clips_outliers_for_the_bulks_resolution():
    """KL calibration keeps the distribution's shape: it clips rare outliers (unlike max), which buys
    the bulk of the values finer INT8 steps — at the price of the outliers themselves."""
    x = _activations(2)
    hist = AbsHistogram()
    hist.add(x)
    amax = entropy_amax(hist)
    assert float(torch.quantile(x.abs()[:100_000], 0.99)) < amax < 0.5 * float(x.abs().max())
    bulk = x[x.abs() < 4.0]
    assert _error(bulk, amax, "int8") < 0.5 * _error(bulk, float(x.abs().max()), "int8")
    gaussian = AbsHistogram()
    gaussian.add(torch.randn(200_000, generator=torch.Generator().manual_seed(3)))
    assert 2.5 < entropy_amax(gaussian) <= gaussian.largest


def test_histogram_keeps_every_count_when_its_range_doubles():
    hist = AbsHistogram()
    hist.add(torch.full((10,), 1.0))
    hist.add(torch.full((5,), 1000.0))
    assert hist.counts.sum() == 15 and hist.upper > 1000.0
    centers = hist.centers()
    assert np.isclose(hist.counts[np.searchsorted(centers, 1000.0) - 1: np.searchsorted(centers, 1000.0) + 1].sum(), 5)


@pytest.fixture(scope="module")
def calibrations(tiny_engines, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("methods")
    sample = [make_demo_inputs(scratch / "s", width=64, height=48, num_frames=FRAMES, seed=4)]
    out = {}
    for name, method, guidance in (("max", "max", 1.0), ("mse", "mse", 1.0), ("cfg", "max", 2.0)):
        out[name] = run_calibration(tiny_engines, sample, scratch / f"{name}.json", steps=STEPS, method=method,
                                    percentile=99.99, segment_frames=FRAMES, target="int8", guidance_scale=guidance)
    return scratch, out


def test_mse_calibration_of_the_dit(calibrations):
    scratch, caches = calibrations
    mse, largest = caches["mse"], caches["max"]
    assert mse.method == "mse" and mse.target == "int8"
    assert set(mse.layers) == set(largest.layers)
    ratios = [mse.layers[p].amax / largest.layers[p].amax for p in mse.layers]
    assert all(0 < r <= 1.0 + 1e-6 for r in ratios) and min(ratios) < 1.0  # never past the max; clips some
    assert load_cache(scratch / "mse.json").to_json() == mse.to_json()


def test_cfg_calibration_observes_both_branches(calibrations):
    _, caches = calibrations
    cfg, plain = caches["cfg"], caches["max"]
    assert cfg.guidance_scale == 2.0
    for path, stats in plain.layers.items():
        if path.startswith("vae."):  # the VAE runs as often with CFG as without
            assert cfg.layers[path].calls == stats.calls > 0
            continue
        assert cfg.layers[path].calls == stats.calls == STEPS  # one batch-2 DiT call per step
        assert cfg.layers[path].rows == 2 * stats.rows  # ... carrying both branches


def test_a_cache_searched_for_int8_is_refused_for_fp8(calibrations, preset, tmp_path):
    scratch, _ = calibrations
    with pytest.raises(BadInputError, match="--target fp8"):
        build_engines(preset, tmp_path / "e", quantization=QuantizationRequest("fp8", scratch / "mse.json"))
    assert not (tmp_path / "e").exists()

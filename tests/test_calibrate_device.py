"""``wan-trt calibrate --device cuda`` without a GPU: its code path (the bf16 reference, deferred observers, the
fused softmax maximum) run on the CPU with ``--dtype bf16``, against the fp32 CPU calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from wan_trt.calibration import histogram
from wan_trt.calibration.attention import (FUSED_TOLERANCE, AttentionObserver, exact_max_probability,
                                           fused_max_probability, max_probability)
from wan_trt.calibration.cache import BF16_RANGE_TOLERANCE, load_cache, range_differences
from wan_trt.calibration.collect import RangeObserver, run_calibration
from wan_trt.calibration.conv_quant import observe_convs
from wan_trt.calibration.histogram import AbsHistogram

def _calls(dtype: torch.dtype, seed: int = 0, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for i in range(count):
        x = torch.randn(2, 37 + i, 24, generator=generator) * (1 + i)
        x[0, i, i] = -40.0 * (i + 1) if i % 2 else 40.0 * (i + 1)  # outliers of either sign
        calls.append(x.to(dtype))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_maxima_equal_the_per_call_ones_exactly(dtype):
    calls = _calls(dtype)
    observer = RangeObserver("max", 99.99)
    for x in calls:
        observer.observe(x)
    per_call = [x.to(torch.float32).abs().reshape(-1, x.shape[-1]).amax(0) for x in calls]  # the old observer's
    assert observer.final_amax("fp8") == max(float(c.max()) for c in per_call)
    assert observer.channel_amax == torch.stack(per_call).amax(0).tolist()
    assert observer.calls == 4 and observer.rows == sum(x.shape[0] * x.shape[1] for x in calls)
    percentile = RangeObserver("percentile", 99.0)
    for x in calls:
        percentile.observe(x)
    assert percentile.final_amax("fp8") == max(float(torch.quantile(x.to(torch.float32).abs().reshape(-1), 0.99))
                                               for x in calls)


def test_histogram_of_bf16_in_chunks_equals_the_fp32_histogram(monkeypatch):
    calls = _calls(torch.bfloat16, seed=1)
    whole = AbsHistogram()
    for x in calls:
        whole.add(x.to(torch.float32).abs())
    monkeypatch.setattr(histogram, "_CHUNK", 100)  # several chunks per call
    chunked = AbsHistogram()
    for x in calls:
        chunked.add(x)
    assert (chunked.counts == whole.counts).all() and chunked.counts.sum() == sum(x.numel() for x in calls)
    assert chunked.upper == whole.upper and chunked.largest == whole.largest


def test_conv_ranges_are_deferred_and_equal_the_per_call_ones():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1)).requires_grad_(False)
    inputs = [torch.randn(1, 3, 8, 8) * scale for scale in (1.0, 7.0, 3.0)]
    with observe_convs(module) as observer:
        for x in inputs:
            module(x)
    first = max(float(x.abs().max()) for x in inputs)
    second = max(float(module[0](x).abs().max()) for x in inputs)
    assert observer.amax == {"0": first, "1": second} and observer.calls == {"0": 3, "1": 3}


def _attention_inputs(logit_std: float, dtype: torch.dtype, seed: int, tokens: int = 320, heads: int = 2,
                      dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, H, D] q and k whose attention logits q·k/√D have standard deviation ``logit_std`` (0.3: flat rows,
    largest P ≈ a few / keys; 3: peaked rows, largest P near 1)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, tokens, heads, dim, generator=generator) * math.sqrt(logit_std)
    k = torch.randn(2, tokens, heads, dim, generator=generator) * math.sqrt(logit_std)
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("logit_std", [0.3, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("dim", [12, 64, 128])  # the tiny preset's head size, and tiny-gpu's and full size's
def test_fused_max_probability_is_the_exact_one_within_its_tolerance(logit_std, dim):
    q, k = _attention_inputs(logit_std, torch.bfloat16, seed=int(logit_std * 10) + dim, dim=dim)
    exact, fused = float(exact_max_probability(q, k)), float(fused_max_probability(q, k))
    assert 0.0 < exact < 1.0  # not saturated: the row maximum and the log-sum-exp both matter
    assert abs(fused - exact) <= FUSED_TOLERANCE * exact, (exact, fused)


def test_fused_max_probability_refuses_fp32():
    q, k = _attention_inputs(1.0, torch.float32, seed=0)
    with pytest.raises(ValueError, match="exact_max_probability"):
        fused_max_probability(q, k)


def test_attention_observer_keeps_the_softmax_maximum_on_the_device():
    seen: dict[str, list[torch.Tensor]] = {}
    observer = AttentionObserver(lambda name, x: seen.setdefault(name, []).append(x),
                                 lambda q, k, v: q, exact_max_probability)
    calls = [_attention_inputs(s, torch.float32, seed=i, tokens=64) for i, s in enumerate((1.0, 8.0, 2.0))]
    for q, k in calls:
        observer(q, k, k)
    assert isinstance(observer._softmax_amax, torch.Tensor)
    assert observer.softmax_amax == max(max_probability(q, k) for q, k in calls)
    assert [len(seen[name]) for name in ("q", "k", "v", "k_smooth", "v_smooth")] == [3] * 5


def test_cache_records_device_and_dtype_and_older_caches_load(tmp_path):
    old = {"format_version": 1, "weights_hash": "abc", "preset": "tiny", "method": "max", "samples": ["s"],
           "steps": 2, "layers": {"transformer.blocks.0.ffn.net.0.proj": {"amax": 1.0, "channel_amax": [1.0]}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    cache = load_cache(tmp_path / "old.json")
    assert cache.device is None and cache.dtype is None
    cache.device, cache.dtype = "cuda", "bf16"
    cache.save(tmp_path / "new.json")
    again = load_cache(tmp_path / "new.json")
    assert (again.device, again.dtype) == ("cuda", "bf16") and again.to_json() == cache.to_json()


# ----------------------------------------------------------------------------- the whole pass, tiny preset


@pytest.fixture(scope="module")
def fp32_and_bf16(tiny_engines, tiny_build, tmp_path_factory) -> tuple:
    """The shared fp32 CPU calibration and the bf16 one (``--device cpu --dtype bf16``) of its samples and steps."""
    fp32 = load_cache(tiny_build("calibration"))
    out = tmp_path_factory.mktemp("bf16") / "bf16.json"
    bf16 = run_calibration(tiny_engines, [Path(s) for s in fp32.samples], out, steps=fp32.steps, method="max",
                           percentile=99.99, segment_frames=9, device="cpu", dtype="bf16")
    return fp32, bf16, out


def test_bf16_calibration_records_what_the_fp32_one_does_within_bf16_rounding(fp32_and_bf16):
    fp32, bf16, out = fp32_and_bf16
    assert (fp32.device, fp32.dtype) == ("cpu", "fp32") and (bf16.device, bf16.dtype) == ("cpu", "bf16")
    assert load_cache(out).to_json() == bf16.to_json()
    worst = range_differences(fp32, bf16)  # same layers, calls and rows, or it raises
    assert max(worst.values()) <= BF16_RANGE_TOLERANCE, worst
    assert worst["dit"] > 1e-4 and worst["softmax"] > 0.0, worst  # bf16 arithmetic did run

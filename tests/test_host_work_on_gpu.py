"""Work on host tensors runs on the GPU when there is one (``wan_trt.devices.compute_device``), with the same
results as on the CPU: the random weights' values, the weight scales of a quantization plan (FP8, and INT8
with SmoothQuant) and the fast path's quantized FP8/INT8 weights of a model loaded on the host (the host
plans of ``infer --fast --max-gpu-memory``). Needs a CUDA GPU: run on the lent GPU, skipped in CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_trt.devices import compute_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: host work drawn on the GPU is compared with the CPU's on the lent GPU")


def _cpu_only(monkeypatch, *modules) -> None:
    for module in modules:
        monkeypatch.setattr(module, "compute_device", lambda device: torch.device(device))


def test_host_work_goes_to_the_gpu():
    assert compute_device("cpu").type == "cuda"
    assert compute_device("cuda").type == "cuda" and compute_device("meta").type == "meta"


def test_random_values_drawn_on_the_gpu_equal_the_cpus():
    from wan_trt.random_weights import fill_uniform_

    on_cpu = fill_uniform_(torch.empty(5, 1 << 20, dtype=torch.bfloat16), (3, 4), 0.02, draw_on="cpu")
    on_gpu = fill_uniform_(torch.empty(5, 1 << 20, dtype=torch.bfloat16), (3, 4), 0.02)
    assert on_gpu.device.type == "cpu" and torch.equal(on_gpu, on_cpu)


def _linears_and_cache(precision: str):
    from wan_trt.calibration.cache import CalibrationCache

    torch.manual_seed(0)
    linears = {f"l{i}": torch.nn.Linear(384, 256).to(torch.bfloat16) for i in range(2)}
    rng = np.random.default_rng(0)
    maxima = {name: list(rng.uniform(0.1, 20.0, 384)) for name in linears}
    return linears, CalibrationCache.from_channel_maxima(maxima, "test", precision)


class _Policy:
    source = "test"

    def quantized_layers(self, num_blocks: int) -> list[str]:
        return ["l0", "l1"]

    def attention_blocks(self, num_blocks: int, precision: str) -> list[int]:
        return []


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_plans_and_quantized_weights_made_on_the_gpu_equal_the_cpus(monkeypatch, precision):
    import wan_trt.calibration.quantize as quantize
    import wan_trt.runtime.fast.int8 as int8
    import wan_trt.runtime.fast.linear as linear

    linears, cache = _linears_and_cache(precision)

    def made():
        plan = quantize.make_plan(linears, cache, _Policy(), precision, 1)
        if precision == "fp8":
            ops = [linear.Fp8Linear.from_linears([linears[p]], [plan.layers[p]]) for p in ("l0", "l1")]
        else:
            ops = [int8.Int8Linear(linears[p], plan.layers[p]) for p in ("l0", "l1")]
        return plan, ops

    gpu_plan, gpu_ops = made()
    _cpu_only(monkeypatch, quantize, linear, int8)
    cpu_plan, cpu_ops = made()
    for path in ("l0", "l1"):
        assert np.array_equal(gpu_plan.layers[path].weight_scale, cpu_plan.layers[path].weight_scale)
        assert gpu_plan.layers[path].act_scale == cpu_plan.layers[path].act_scale
    for gpu_op, cpu_op in zip(gpu_ops, cpu_ops):
        assert gpu_op.weight_q.device.type == "cpu"  # back where the weights live
        assert torch.equal(gpu_op.weight_q.view(torch.uint8), cpu_op.weight_q.view(torch.uint8))
        assert torch.equal(gpu_op.weight_scale, cpu_op.weight_scale)

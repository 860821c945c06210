"""Inside ``wan_trt.devices.host_work_on_gpu`` (the fast path's loading: a model loaded on the host for
``infer --fast --max-gpu-memory``), work on host tensors runs on the GPU with the same results as on the
CPU: the random weights' values, the weight scales of a quantization plan (FP8, and INT8 with SmoothQuant)
and the fast path's quantized FP8/INT8 weights. Outside it a CPU run stays on the CPU. The comparisons
need a CUDA GPU: run on the lent GPU, skipped in CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wan_trt.devices import compute_device, host_work_on_gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: host work done on the GPU is compared with the CPU's on the lent GPU")


def test_only_inside_the_context_and_only_with_a_gpu():
    assert compute_device("cpu").type == "cpu"  # a CPU run stays on the CPU, GPU or not
    with host_work_on_gpu():
        assert compute_device("cpu").type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert compute_device("meta").type == "meta"
    assert compute_device("cpu").type == "cpu"


def _ran_on_gpu(work):
    """``work()``'s result, and whether it allocated GPU memory (the work went there)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = work()
    return result, torch.cuda.max_memory_allocated() > before


@needs_cuda
def test_random_values_drawn_on_the_gpu_equal_the_cpus():
    from wan_trt.random_weights import fill_uniform_

    on_cpu = fill_uniform_(torch.empty(5, 1 << 20, dtype=torch.bfloat16), (3, 4), 0.02)
    with host_work_on_gpu():
        on_gpu, used_gpu = _ran_on_gpu(lambda: fill_uniform_(torch.empty(5, 1 << 20, dtype=torch.bfloat16), (3, 4), 0.02))
    assert used_gpu and on_gpu.device.type == "cpu" and torch.equal(on_gpu, on_cpu)


class _Policy:
    source = "test"

    def quantized_layers(self, num_blocks: int) -> list[str]:
        return ["l0", "l1"]

    def attention_blocks(self, num_blocks: int, precision: str) -> list[int]:
        return []


@needs_cuda
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_plans_and_quantized_weights_made_on_the_gpu_equal_the_cpus(precision):
    from wan_trt.calibration.cache import CalibrationCache
    from wan_trt.calibration.quantize import make_plan
    from wan_trt.runtime.fast.int8 import Int8Linear
    from wan_trt.runtime.fast.linear import Fp8Linear, fp8_plan

    torch.manual_seed(0)
    linears = {f"l{i}": torch.nn.Linear(384, 256).to(torch.bfloat16) for i in range(2)}
    rng = np.random.default_rng(0)
    maxima = {name: list(rng.uniform(0.1, 20.0, 384)) for name in linears}
    cache = CalibrationCache.from_channel_maxima(maxima, "test", precision)

    def made():
        plan = make_plan(linears, cache, _Policy(), precision, 1)
        if precision == "fp8":
            ops = [Fp8Linear.from_linears([linears[p]], [plan.layers[p]]) for p in ("l0", "l1")]
            return plan, ops, fp8_plan(linears, {p: max(maxima[p]) for p in linears}, _Policy(), 1)
        return plan, [Int8Linear(linears[p], plan.layers[p]) for p in ("l0", "l1")], None

    cpu_plan, cpu_ops, cpu_fp8 = made()
    with host_work_on_gpu():
        (gpu_plan, gpu_ops, gpu_fp8), used_gpu = _ran_on_gpu(made)
    assert used_gpu
    for path in ("l0", "l1"):
        assert np.array_equal(gpu_plan.layers[path].weight_scale, cpu_plan.layers[path].weight_scale)
        assert gpu_plan.layers[path].act_scale == cpu_plan.layers[path].act_scale
        if gpu_fp8 is not None:
            assert np.array_equal(gpu_fp8.layers[path].weight_scale, cpu_fp8.layers[path].weight_scale)
    for gpu_op, cpu_op in zip(gpu_ops, cpu_ops):
        assert gpu_op.weight_q.device.type == "cpu"  # back where the weights live
        assert torch.equal(gpu_op.weight_q.view(torch.uint8), cpu_op.weight_q.view(torch.uint8))
        assert torch.equal(gpu_op.weight_scale, cpu_op.weight_scale)

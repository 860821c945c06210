"""The fast PyTorch path (runtime/fast/) on the CPU: its math against the references.

What needs a GPU (cuDNN FP8 attention, torch.compile'd glue, the speed) is measured by
``python -m benchmarks.run gpu`` on the H100 (results in benchmarks/results/). Here, in fp32 so that
only the quantization differs: the FP8 ``_scaled_mm`` Linear = the fake-quant Linear the Q/DQ graph
is proven against, the fast DiT = ``TransformerGraph`` (bf16 Linears) and = the fake-quant DiT (FP8).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import fresh_reference_models
from wan_trt.calibration.cache import CalibrationCache, LayerStats
from wan_trt.calibration.policy import PrecisionPolicy, load_policy
from wan_trt.calibration.quantize import (
    FakeQuantLinear,
    apply_fake_quant,
    linear_layers,
    make_plan,
)
from wan_trt.calibration.attention import smooth_kv
from wan_trt.runtime.fast.attention import Fa3Fp8Attention, fa3_available, fp8_attention_kernel, sdpa
from wan_trt.runtime.fast.engines import fast_torch_engines
from wan_trt.runtime.fast.glue import Glue, qk_norm_rope, qk_norm_rope_fp8, quant_dynamic, residual_norm_affine, to_out_input
from wan_trt.runtime.fast.linear import AmaxObserver, FP8, FP8_MAX, Fp8Linear, fp8_plan, quantize_fp8
from wan_trt.runtime.fast.transformer import BLOCK_LINEARS, FastOptions, FastTransformer
from wan_trt.runtime.fast.vae import VAE_SPEEDUPS, decode_streamed, speed_up_vae

from wan_trt.components import segment_sizes
from wan_trt.errors import BadInputError, EngineError
from wan_trt.metrics import relative_l2

SCALED_MM_ON_CPU = True
try:
    torch._scaled_mm(torch.zeros(16, 16).to(FP8), torch.zeros(16, 16).to(FP8).t(), torch.ones(16, 1),
                     torch.ones(1, 16), out_dtype=torch.float32)
except (RuntimeError, NotImplementedError):
    SCALED_MM_ON_CPU = False
needs_scaled_mm = pytest.mark.skipif(not SCALED_MM_ON_CPU, reason="this torch has no CPU torch._scaled_mm")
# the tiny DiT has 10 blocks: keep 1 first and 1 last in high precision so that 8 blocks are quantized
TINY_POLICY = PrecisionPolicy(1, 1, load_policy().block_layers, "test")
# every Linear of a block in FP8, the cross-attention's too (its FP8 q input and FP8 merged-heads output)
ALL_LINEARS_POLICY = PrecisionPolicy(1, 1, BLOCK_LINEARS, "test-all-linears")


def _graph(seed: int = 0):
    from wan_trt.models.graphs import TransformerGraph

    return TransformerGraph(fresh_reference_models(seed).transformer).eval()


def _feed(graph, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    tr = graph.transformer.config
    sizes = segment_sizes(9, 32, 48, batch=batch)
    f, h, w = sizes["F"], 2 * sizes["h2"], 2 * sizes["w2"]
    return (torch.from_numpy(rng.standard_normal((batch, tr.in_channels, f + 1, h, w), dtype=np.float32)),
            torch.full((batch,), 700.0),
            torch.from_numpy(rng.standard_normal((batch, 512, tr.text_dim), dtype=np.float32)),
            torch.from_numpy(rng.standard_normal((batch, 257, tr.image_dim), dtype=np.float32)),
            torch.from_numpy(rng.standard_normal((batch, 16, f, h, w), dtype=np.float32)),
            torch.from_numpy(rng.standard_normal((batch, 4 * f - 3, tr.motion_encoder_dim), dtype=np.float32)))


def _calibrated_plan(graph, feed, policy: PrecisionPolicy = TINY_POLICY):
    quantized = {p: m for p, m in linear_layers(graph).items() if p in set(policy.quantized_layers(10))}
    observer = AmaxObserver(quantized)
    with torch.no_grad():
        graph(*feed)
    amax = observer.remove()
    return amax, fp8_plan(linear_layers(graph), amax, policy, 10)


@needs_scaled_mm
def test_fp8_linear_equals_fake_quant_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(3, 50, 96) * 2.5
    layer = fp8_plan({"l": linear}, {"l": float(x.abs().max())}, _OnePolicy("l"), 1).layers["l"]
    fast = Fp8Linear.from_linears([linear], [layer], out_dtype=torch.float32)
    want = FakeQuantLinear(linear, layer, "fp8")(x)
    got = fast(x)
    assert got.shape == want.shape
    assert relative_l2(got.detach(), want.detach()) <= 1e-6
    # and the quantization is real: FP8 differs from the plain fp32 Linear by about E4M3's precision
    assert 1e-3 < relative_l2(got.detach(), linear(x).detach()) < 0.1


class _OnePolicy:
    source = "test"

    def __init__(self, path: str) -> None:
        self.path = path

    def quantized_layers(self, num_blocks: int) -> list[str]:
        return [self.path]

    def attention_blocks(self, num_blocks: int, precision: str) -> list[int]:
        return []


def test_fp8_plan_equals_make_plan():
    graph = _graph()
    linears = linear_layers(graph)
    rng = np.random.default_rng(3)
    paths = TINY_POLICY.quantized_layers(10)
    cache = CalibrationCache("w", "tiny", "max", ["s"], 1,
                             {p: LayerStats(float(rng.uniform(0.5, 9.0)), []) for p in paths})
    want = make_plan(linears, cache, TINY_POLICY, "fp8", 10)
    got = fp8_plan(linears, {p: s.amax for p, s in cache.layers.items()}, TINY_POLICY, 10)
    assert set(got.layers) == set(want.layers) and len(got.layers) == 8 * len(TINY_POLICY.block_layers)
    for path, layer in want.layers.items():
        assert got.layers[path].act_scale == layer.act_scale
        np.testing.assert_array_equal(got.layers[path].weight_scale, layer.weight_scale)


def test_fast_dit_bf16_linears_equals_transformer_graph():
    """No plan: the fast block math (fused glue functions, SDPA) = the exported graph module, in fp32."""
    graph = _graph()
    feed = _feed(graph, seed=1, batch=2)
    with torch.no_grad():
        want = graph(*feed)[0]
    fast = FastTransformer(graph, None, FastOptions(attention="bf16", compile=False, dtype=torch.float32))
    got = fast(*feed)[0]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert relative_l2(got, want) <= 1e-5


@needs_scaled_mm
@pytest.mark.parametrize("policy", [TINY_POLICY, ALL_LINEARS_POLICY], ids=["default-layers", "all-linears"])
def test_fast_dit_fp8_equals_fake_quant_dit(policy):
    """FP8 plan: the fast DiT (_scaled_mm, fused q|k|v, quantization fused into the glue) = the fake-quant DiT."""
    graph = _graph()
    feed = _feed(graph, seed=2)
    _, plan = _calibrated_plan(graph, feed, policy)
    assert len(plan.layers) == 8 * len(policy.block_layers)
    reference = apply_fake_quant(copy.deepcopy(graph), plan)
    with torch.no_grad():
        want = reference(*feed)[0]
        fp32 = graph(*feed)[0]
    fast = FastTransformer(graph, plan, FastOptions(attention="bf16", compile=False, dtype=torch.float32))
    assert sum(ops.qkv is not None for ops in fast.block_ops) == 8
    got = fast(*feed)[0]
    assert relative_l2(got, want) <= 1e-4
    assert relative_l2(got, fp32) > 1e-4  # FP8 changed something: the comparison above is not vacuous


@needs_scaled_mm
def test_tiny_gpu_preset_fits_the_fp8_kernels():
    """``tiny-gpu`` (the GPU smoke test's preset): head dim 128 (cuDNN FP8 attention), every Linear any shipped
    policy quantizes has in/out features divisible by 16 (torch._scaled_mm), and the fast DiT = its graph."""
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.presets import get_preset
    from wan_trt.reference_models import build_reference_models
    from wan_trt.tokenizer import build_tiny_tokenizer

    preset = get_preset("tiny-gpu")
    assert preset.transformer["attention_head_dim"] == 128
    models = build_reference_models(preset, seed=0, vocab_size=build_tiny_tokenizer().get_vocab_size())
    graph = TransformerGraph(models.transformer).eval()
    blocks = len(graph.transformer.blocks)
    for path in load_policy("all-layers").quantized_layers(blocks):
        linear = graph.get_submodule(path)
        assert linear.in_features % 16 == 0 and linear.out_features % 16 == 0, path
    feed = _feed(graph, seed=6)
    with torch.no_grad():
        want = graph(*feed)[0]
    fast = FastTransformer(graph, None, FastOptions(attention="bf16", compile=False, dtype=torch.float32))
    assert relative_l2(fast(*feed)[0], want) <= 1e-5


def _fa3_stand_in(calls: list, bf16_calls: list | None = None):
    """FA3's ``flash_attn_func`` contract in fp32 on the CPU: E4M3 ``[B, L, H, D]`` q, k, v, (B, H) descales, bf16 out;
    without descales (``bf16_calls`` given) its high-precision forward, output in the inputs' dtype."""
    def attention(q, k, v, causal, q_descale=None, k_descale=None, v_descale=None):
        if q_descale is None and bf16_calls is not None:
            assert q.dtype == k.dtype == v.dtype != FP8 and not causal
            bf16_calls.append(q.shape)
            return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(
                1, 2)
        batch, _, heads, _ = q.shape
        assert q.dtype == k.dtype == v.dtype == FP8 and not causal
        for d in (q_descale, k_descale, v_descale):
            assert d.shape == (batch, heads) and d.dtype == torch.float32
        deq = [t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale))]
        # the shape, and how far k's and v's token means are from 0 relative to their range (smoothing: ~0)
        calls.append((q.shape, *(float(t.mean(1).abs().max() / t.abs().max()) for t in deq[1:])))
        return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in deq)).transpose(
            1, 2).to(torch.bfloat16)
    return attention


@needs_scaled_mm
@pytest.mark.parametrize("smoothing", ["none", "k", "v", "kv"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic-scales", "calibrated-scales"])
def test_fast_dit_fa3_fp8_attention_path(static, smoothing):
    """The FA3 branch of FP8 self-attention (bf16 output, quantized by to_out with its calibrated scale), with a
    stand-in for FA3's kernel: every FP8-attention block calls it, and the DiT differs from the same fast DiT
    with bf16 attention by FP8 rounding only (a wrong layout, descale or output scale is an O(1) error). With
    smoothing, the kernel gets k (and v) with a zero token mean, and v's mean comes back on the output (a lost
    or doubled mean is an O(1) error too)."""
    graph = _graph()
    feed = _feed(graph, seed=7)
    _, plan = _calibrated_plan(graph, feed)
    bf16 = FastTransformer(graph, plan, FastOptions(attention="bf16", compile=False, dtype=torch.float32))
    want = bf16(*feed)[0]
    options = FastOptions(attention="fp8", fp8_attention_kernel="fa3", compile=False, dtype=torch.float32,
                             attention_smoothing=smoothing)
    fast = FastTransformer(graph, plan, options)
    calls: list = []
    bf16_calls: list = []  # the policy-kept blocks' bf16 attention follows the FP8 kernel choice: FA3 too
    fast._fp8_attn = fast._fa3_bf16 = Fa3Fp8Attention(_fa3_stand_in(calls, bf16_calls))
    if static:
        fast.record_attention_amax()
        fast(*feed)
        fast.use_static_attention()
        calls.clear()
        bf16_calls.clear()
    got = fast(*feed)[0]
    assert len(calls) == len(fast.fp8_attention) == 8
    assert len(bf16_calls) == 2 and fast.bf16_kernel_name == "fa3"
    assert 1e-4 < relative_l2(got, want) <= 5e-2
    k_mean, v_mean = max(c[1] for c in calls), max(c[2] for c in calls)
    assert (k_mean < 0.02) == (smoothing in ("k", "kv")) and (v_mean < 0.02) == (smoothing in ("v", "kv")), (
        k_mean, v_mean)


@needs_scaled_mm
def test_v_smoothing_takes_a_large_v_offset_out_of_the_fp8_rounding():
    """With v offset by far more than it varies (+3 on every to_v bias; v's spread is ~0.6), FP8 v rounds the
    offset: v smoothing halves the DiT's distance to the bf16-attention DiT (FA3 stand-in, no P rounding), and
    the restored mean matters (dropped, the output is O(1) off)."""
    graph = _graph()
    with torch.no_grad():
        for block in graph.transformer.blocks:
            block.attn1.to_v.bias += 3.0
    feed = _feed(graph, seed=7)
    _, plan = _calibrated_plan(graph, feed)
    want = FastTransformer(graph, plan, FastOptions(attention="bf16", compile=False, dtype=torch.float32))(
        *feed)[0]

    def error(smoothing: str, glue: Glue | None = None) -> float:
        options = FastOptions(attention="fp8", fp8_attention_kernel="fa3", compile=False, dtype=torch.float32,
                                 attention_smoothing=smoothing)
        fast = FastTransformer(graph, plan, options)
        fast._fp8_attn = fast._fa3_bf16 = Fa3Fp8Attention(_fa3_stand_in([], []))
        fast._glue = glue
        return relative_l2(fast(*feed)[0], want)

    plain, smoothed = error("none"), error("v")
    assert smoothed < 0.6 * plain and plain < 5e-2, (smoothed, plain)  # measured: 6.5e-3 vs 1.4e-2
    mean_dropped = Glue(to_out_input=lambda o, d, v_mean, act, dtype: to_out_input(o, d, None, act, dtype))
    assert error("v", mean_dropped) > 0.3


def test_smooth_kv_leaves_attention_unchanged():
    """Subtracting k's token mean does not change softmax(q·kᵀ); v's, added back to the output, does not
    change P·v (offsets as large as the varying part; smooth_kv computes in fp32); the smoothed k and v have a
    zero token mean.
    ``to_out_input`` puts the mean back on an FP8 output with its descale too."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 3, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k, v = k + 2 * torch.randn(1, 1, 3, 16, generator=gen, dtype=torch.float64), v - 3
    want = sdpa(q, k, v)
    for mode in ("k", "v", "kv"):
        ks, vs, v_mean = smooth_kv(k, v, mode)
        assert (ks.mean(1).abs().max() < 1e-5) == (mode != "v") and (v_mean is None) == (mode == "k")
        got = sdpa(q, ks.double(), vs.double())
        if v_mean is not None:
            assert vs.mean(1).abs().max() < 1e-5
            got = to_out_input(got.unflatten(-1, (3, 16)), None, v_mean, None, torch.float64)
        assert relative_l2(got, want) < 1e-6, mode  # smooth_kv computes in fp32
    ks, vs, v_mean = smooth_kv(k, v, "none")
    assert ks is k and vs is v and v_mean is None
    o = torch.randn(2, 64, 3, 16, generator=gen)
    descale = torch.tensor(0.01)
    o8 = quantize_fp8(o, descale)
    v_mean = torch.randn(2, 1, 3, 16, generator=gen)
    got = to_out_input(o8, descale, v_mean, None, torch.float32)
    assert torch.allclose(got, (o8.float() * descale + v_mean).flatten(2, 3))
    act = torch.tensor(0.02)  # cuDNN's FP8 output into an FP8 to_out: requantized with to_out's input scale
    got = to_out_input(o8, descale, v_mean, act, torch.bfloat16)
    want = quantize_fp8((o8.float() * descale + v_mean).flatten(2, 3), act)
    assert got.dtype == FP8 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_fast_dit_fa3_bf16_attention_equals_sdpa():
    """``bf16_attention_kernel`` fa3 sends every block's self-attention through FA3's high-precision forward (a
    stand-in here): the same function as SDPA's; auto follows the FP8 kernel choice; unknown names are refused."""
    graph = _graph()
    feed = _feed(graph, seed=5)
    options = FastOptions(attention="bf16", compile=False, dtype=torch.float32)
    want = FastTransformer(graph, None, options)(*feed)[0]
    fast = FastTransformer(graph, None, FastOptions(attention="bf16", compile=False, dtype=torch.float32,
                                                          bf16_attention_kernel="fa3"))
    calls: list = []
    fast._fa3_bf16 = Fa3Fp8Attention(_fa3_stand_in([], calls))
    got = fast(*feed)[0]
    assert len(calls) == 10
    assert relative_l2(got, want) < 1e-6
    calls.clear()  # the same stand-in in place, the kernel pinned to sdpa: FA3 is not called
    sdpa_pinned = fast.with_options(bf16_attention_kernel="sdpa")
    sdpa_pinned._fa3_bf16 = fast._fa3_bf16
    sdpa_pinned(*feed)
    assert not calls
    assert FastTransformer(graph, None, options).bf16_kernel_name == ("fa3" if fa3_available() else "sdpa")
    pinned = FastTransformer(graph, None, FastOptions(fp8_attention_kernel="cudnn", compile=False))
    assert pinned.bf16_kernel_name == "sdpa"
    assert pinned.with_options(fp8_attention_kernel="fa3").bf16_kernel_name == "fa3"
    with pytest.raises(EngineError, match="choose one of auto, sdpa, fa3"):
        FastTransformer(graph, None, FastOptions(bf16_attention_kernel="flash"))
    with pytest.raises(EngineError, match="choose one of auto, sdpa, fa3"):
        pinned.with_options(bf16_attention_kernel="flash")


def test_fp32_residual_stream_is_closer_to_the_fp32_model():
    """``residual="fp32"`` keeps the residual stream in fp32 between the bf16 ops: on the tiny DiT the bf16 fast
    path then lands about half as far from the fp32 model as with the reference's bf16 rounding of each update."""
    graph = _graph()
    feed = _feed(graph, seed=3)
    with torch.no_grad():
        truth = graph(*feed)[0]
    bf16 = copy.deepcopy(graph).to(torch.bfloat16)
    err = {res: relative_l2(FastTransformer(bf16, None, FastOptions(compile=False, residual=res))(*feed)[0],
                            truth) for res in ("model", "fp32")}
    assert 1e-3 < err["fp32"] < 0.75 * err["model"], err
    with pytest.raises(EngineError, match="choose one of model, fp32"):
        FastTransformer(bf16, None, FastOptions(residual="bf16"))


def test_fp8_attention_kernel_choice():
    with pytest.raises(EngineError, match="choose one of auto, cudnn, fa3"):
        fp8_attention_kernel("flash")
    if not fa3_available():
        with pytest.raises(EngineError, match="FlashAttention-3"):
            fp8_attention_kernel("fa3")


def test_release_bf16_keeps_the_function_and_drops_the_weights():
    graph = _graph()
    feed = _feed(graph, seed=4)
    _, plan = _calibrated_plan(graph, feed)
    options = FastOptions(attention="bf16", compile=False, dtype=torch.float32)
    want = FastTransformer(copy.deepcopy(graph), plan, options)(*feed)[0]
    fast = FastTransformer(graph, plan, options, release_bf16=True)
    assert isinstance(graph.transformer.blocks[4].ffn.net[2], torch.nn.Identity)
    assert isinstance(graph.transformer.blocks[0].ffn.net[2], torch.nn.Linear)  # kept block
    assert torch.equal(fast(*feed)[0], want)


@pytest.mark.slow
def test_compiled_glue_rounds_as_the_reference():
    """The compiled glue keeps the reference's intermediate bf16 roundings (RMSNorm output before RoPE, the
    residual stream before the next LayerNorm): bit-equal to the eager functions. Without inductor's
    emulate_precision_casts both differ (carried in fp32), which moved the tiny bf16 DiT 6e-3 off diffusers."""
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen).to(dtype)

    heads, dim, length = 2, 16, 24
    compiled = Glue.compiled()
    q, k, wq, wk = rnd(1, length, heads * dim), rnd(1, length, heads * dim), rnd(heads * dim), rnd(heads * dim)
    cos, sin = rnd(1, length, 1, dim, dtype=torch.float32), rnd(1, length, 1, dim, dtype=torch.float32)
    for want, got in zip(qk_norm_rope(q, k, wq, wk, 1e-6, heads, cos, sin),
                         compiled.qk_norm_rope(q, k, wq, wk, 1e-6, heads, cos, sin), strict=True):
        assert torch.equal(want, got)
    x, y = rnd(1, length, heads * dim) * 30, rnd(1, length, heads * dim)
    gate, weight, bias = rnd(1, 1, heads * dim, dtype=torch.float32), rnd(heads * dim), rnd(heads * dim)
    for want, got in zip(residual_norm_affine(x, y, gate, weight, bias, 1e-6, None),
                         compiled.residual_norm_affine(x, y, gate, weight, bias, 1e-6, None), strict=True):
        assert torch.equal(want, got)


def test_quant_dynamic_round_trip():
    x = torch.randn(2, 40, 3, 16) * 7
    q, descale = quant_dynamic(x)
    assert q.dtype == FP8 and descale.shape == (1, 1, 1, 1)
    assert float(q.float().abs().max()) == FP8_MAX  # the amax lands on the top of the range
    assert relative_l2(q.float() * descale, x) < 2 ** -4


def test_the_fast_path_s_cast_keeps_named_modules_fp32():
    from wan_trt.dtypes import cast_floats

    model = fresh_reference_models().transformer
    cast_floats(model, torch.bfloat16, tuple(model._keep_in_fp32_modules))
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.motion_encoder.motion_synthesis_weight.dtype == torch.float32


def test_fast_refuses_other_backends_and_cpu():
    from wan_trt.runtime.options import RuntimeOptions

    with pytest.raises(BadInputError, match="--backend torch"):
        RuntimeOptions(backend="onnxruntime", fast=True)
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA GPU"):
            fast_torch_engines(None, None, RuntimeOptions(backend="torch", device="cuda", fast=True))


def _int8_plan(graph, feed, policy: PrecisionPolicy = TINY_POLICY):
    """The INT8 plan (SmoothQuant, alpha 0.5) of a cache calibrated on ``feed``: per-tensor and per-channel maxima."""
    quantized = {p: m for p, m in linear_layers(graph).items() if p in set(policy.quantized_layers(10))}
    observer = AmaxObserver(quantized, channels=True)  # the GPU benchmark's INT8 calibration
    with torch.no_grad():
        graph(*feed)
    cache = CalibrationCache.from_channel_maxima(observer.remove_channels(), "tiny", "one forward")
    return make_plan(linear_layers(graph), cache, policy, "int8", 10)


def test_int8_linear_equals_fake_quant_linear():
    """``torch._int_mm`` with SmoothQuant = the INT8 Q/DQ graph's fake-quant Linear (fresh inputs, an outlier channel)."""
    from wan_trt.runtime.fast.int8 import Int8Linear

    torch.manual_seed(4)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(3, 50, 96) * 2.5
    x[..., 7] *= 30  # the outlier SmoothQuant moves into the weight
    cache = CalibrationCache("w", "tiny", "max", ["s"], 1,
                             {"l": LayerStats(float(x.abs().max()), x.abs().amax(dim=(0, 1)).tolist())})
    layer = make_plan({"l": linear}, cache, _OnePolicy("l"), "int8", 1).layers["l"]
    assert layer.smooth is not None
    fresh = torch.randn(2, 40, 96) * 2.5
    for inputs in (x, fresh):
        want = FakeQuantLinear(linear, layer, "int8")(inputs).detach()
        got = Int8Linear(linear, layer, torch.float32)(inputs).detach()
        assert got.shape == want.shape and relative_l2(got, want) <= 1e-5
        assert 1e-3 < relative_l2(got, linear(inputs).detach()) < 0.1  # INT8 is really there


@pytest.mark.parametrize("policy", [TINY_POLICY, ALL_LINEARS_POLICY], ids=["default-layers", "all-linears"])
def test_fast_dit_int8_equals_fake_quant_dit(policy):
    """INT8 plan: the fast DiT (``torch._int_mm`` W8A8 Linears, bf16-path attention) = the INT8 fake-quant DiT."""
    from wan_trt.runtime.fast.int8 import Int8Linear

    graph = _graph()
    plan = _int8_plan(graph, _feed(graph, seed=2), policy)
    feed = _feed(graph, seed=6)  # fresh inputs, not the calibration's
    reference = apply_fake_quant(copy.deepcopy(graph), plan)
    with torch.no_grad():
        want = reference(*feed)[0]
        fp32 = graph(*feed)[0]
    fast = FastTransformer(graph, plan, FastOptions(attention="bf16", compile=False, dtype=torch.float32))
    assert sum(isinstance(op, Int8Linear) for ops in fast.block_ops for op in ops.ops.values()) == len(plan.layers)
    got = fast(*feed)[0]
    assert relative_l2(got, want) <= 1e-4
    assert relative_l2(got, fp32) > 1e-4  # INT8 changed something: the comparison above is not vacuous


def test_fast_refuses_other_plans_and_fp8_attention_with_int8():
    graph = _graph()
    plan = fp8_plan(linear_layers(graph), {p: 1.0 for p in TINY_POLICY.quantized_layers(10)}, TINY_POLICY, 10)
    plan.precision = "fp16"
    with pytest.raises(EngineError, match="FP8 and INT8 plans only"):
        FastTransformer(graph, plan, FastOptions(compile=False))
    plan.precision = "int8"
    with pytest.raises(EngineError, match="INT8 plans run their attention in bf16"):
        FastTransformer(graph, plan, FastOptions(attention="fp8", compile=False))


def test_a_lazy_engine_is_made_on_its_first_call_only():
    from wan_trt.runtime.fast.engines import LazyEngine

    made = []

    class Echo:
        seconds = 1.5

        def run(self, feed):
            return dict(feed)

    engine = LazyEngine("spec", lambda: made.append(1) or Echo())
    assert made == [] and engine.seconds == 0.0  # a run whose prompts are all cached never loads umT5
    assert engine.run({"x": 1}) == {"x": 1} and engine.run({"x": 2}) == {"x": 2}
    assert made == [1] and engine.seconds == 1.5


def test_meta_built_transformer_runs():
    """benchmarks/models.py: meta construction + on-device init gives a complete, finite model (tiny, CPU)."""
    from wan_trt.models.graphs import TransformerGraph

    from benchmarks.models import build_transformer
    from wan_trt.presets import get_preset

    model = build_transformer(get_preset("tiny"), device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    graph = TransformerGraph(model)
    with torch.no_grad():
        out = graph(*_feed(graph, seed=5))[0]
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_qk_norm_rope_fp8_equals_quantized_qk_norm_rope():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 30, 24) for _ in range(3))
    wq, wk = torch.rand(24) + 0.5, torch.rand(24) + 0.5
    cos, sin = torch.randn(1, 30, 1, 12), torch.randn(1, 30, 1, 12)
    inv = torch.tensor([40.0, 60.0, 100.0])
    qr, kr = qk_norm_rope(q, k, wq, wk, 1e-6, 2, cos, sin)
    for smoothing in ("none", "kv"):  # kv: the same cast of the smoothed k and v, and v's mean returned
        q8, k8, v8, v_mean = qk_norm_rope_fp8(q, k, v, wq, wk, 1e-6, 2, cos, sin, inv, smoothing)
        ks, vs, v_mean_want = smooth_kv(kr, v.unflatten(-1, (2, -1)), smoothing)
        assert torch.equal(q8.view(torch.uint8), quantize_fp8(qr, 1 / 40.0).view(torch.uint8))
        assert torch.equal(k8.view(torch.uint8), quantize_fp8(ks, 1 / 60.0).view(torch.uint8))
        assert torch.equal(v8.view(torch.uint8), quantize_fp8(vs, 1 / 100.0).view(torch.uint8))
        assert (v_mean is None) == (smoothing == "none") and (v_mean is None or torch.equal(v_mean, v_mean_want))


def test_decode_streamed_equals_decoder_graphs():
    """Caches handed over (``forward_taking_caches``, as the fast path) = the vae_decoder_first/step graphs'
    explicit cache I/O, over 3 latent frames."""
    from wan_trt.models.graphs import VaeDecoderFirst, VaeDecoderStep

    vae = fresh_reference_models().vae
    first, step = VaeDecoderFirst(vae).eval(), VaeDecoderStep(vae).eval()
    latents = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = first(latents[:, :, :1])
        chunks, caches = [outs[0]], outs[1:]
        for i in range(1, 3):
            outs = step(latents[:, :, i:i + 1], *caches)
            chunks.append(outs[0])
            caches = outs[1:]
    want = torch.cat(chunks, dim=2)
    got = torch.cat(list(decode_streamed(vae, latents)), dim=2)
    assert got.shape == want.shape == (1, 3, 9, 48, 64)
    assert relative_l2(got, want) <= 1e-6


def test_fast_vae_engines_free_each_old_cache_within_the_chunk(monkeypatch):
    """The pipeline's streamed VAE encode and decode through ``--fast``'s engines (``FastEngine``, here on the
    CPU in fp32) = through engines with explicit cache I/O (the ONNX graphs' form, ``TorchEngine``); and with
    the caches handed over, every old cache is freed before its chunk ends (one generation of the feature
    cache alive instead of two: at 1280x720 on the H100 the decode's peak went 13.1 -> 9.7 GiB). Fails if
    anything (the pipeline's last outputs, the guard, the engine's arguments) still holds an old cache."""
    import weakref

    from wan_trt.models.graphs import _StreamedVae, cache_layouts, graph_modules
    from wan_trt.presets import get_preset
    from wan_trt.registry import graph_specs
    from wan_trt.runtime.engines import TorchEngine
    from wan_trt.runtime.fast.engines import VAE_GRAPHS, FastEngine
    from wan_trt.runtime.guard import guard_engines
    from wan_trt.runtime.pipeline import AnimatePipeline

    models = fresh_reference_models()
    specs = graph_specs(get_preset("tiny"), *cache_layouts(models), vocab_size=0)
    modules = graph_modules(models, VAE_GRAPHS)
    alive_at_chunk_end: list[int] = []
    chunk = _StreamedVae._caches_out

    def counting(self, cache, *args):  # the chunk's last step: how many of the caches it was given live on
        alive_at_chunk_end.append(sum(ref() is not None for ref in self.given))
        return chunk(self, cache, *args)

    def remembering(self, x, caches):
        self.given = [weakref.ref(t) for t in caches]
        return forward_taking_caches(self, x, caches)

    forward_taking_caches = _StreamedVae.forward_taking_caches
    monkeypatch.setattr(_StreamedVae, "_caches_out", counting)
    monkeypatch.setattr(_StreamedVae, "forward_taking_caches", remembering)
    for module in modules.values():
        module.given = []

    def pipeline(engine_class) -> AnimatePipeline:
        engines = {name: engine_class(modules[name], specs[name], "cpu") for name in VAE_GRAPHS}
        return AnimatePipeline(guard_engines(engines), get_preset("tiny"), tokenize=None)

    gen = torch.Generator().manual_seed(5)
    video = torch.rand(1, 3, 13, 48, 64, generator=gen) * 2 - 1
    with torch.inference_mode():
        explicit = pipeline(TorchEngine)
        latents = explicit.vae_encode(video)
        want_video = torch.cat(list(explicit.vae_decode(latents)), 2)
        alive_at_chunk_end.clear()
        fast = pipeline(lambda module, spec, device: FastEngine(module, spec, device, dtype=None))
        assert relative_l2(fast.vae_encode(video), latents) <= 1e-6
        assert relative_l2(torch.cat(list(fast.vae_decode(latents)), 2), want_video) <= 1e-6
    handed = [n for n, module in modules.items() if module.given]
    assert sorted(handed) == ["vae_decoder_step", "vae_encoder_step"]
    assert len(alive_at_chunk_end) == 4 + 4 and max(alive_at_chunk_end) == 0, alive_at_chunk_end  # 13 frames, 4 latents


def test_frame_by_frame_vae_needs_less_memory():
    """``frame_by_frame``'s point, on the allocator's exact counts (CPU, tiny VAE, fp32): the streamed decode
    and diffusers' chunked encode peak lower (at 1280x720 the same counts on the real VAE's config project
    decode 9.2 -> 7.6 GiB and encode 6.8 -> 5.3 GiB: ``benchmarks.vae_speed --device cpu``,
    results/vae_memory_cpu_160x96.json)."""
    from benchmarks.timing import cpu_allocation_peak

    vae = fresh_reference_models().vae.eval()
    frames = speed_up_vae(copy.deepcopy(vae), ["frame_by_frame"])
    gen = torch.Generator().manual_seed(5)
    latents, video = torch.randn(1, 16, 3, 12, 16, generator=gen), torch.rand(1, 3, 9, 96, 128, generator=gen) * 2 - 1
    with torch.inference_mode():
        decode = [cpu_allocation_peak(lambda m=m: list(decode_streamed(m, latents))) for m in (vae, frames)]
        encode = [cpu_allocation_peak(lambda m=m: m.encode(video)) for m in (vae, frames)]
    assert decode[1] < 0.97 * decode[0] and encode[1] < 0.7 * encode[0], (decode, encode)


@pytest.mark.parametrize("speedups", [[name] for name in VAE_SPEEDUPS] + [list(VAE_SPEEDUPS)],
                         ids=[*VAE_SPEEDUPS, "all"])
def test_vae_speedups_compute_the_same_encode_and_decode(speedups):
    """Each of ``speed_up_vae``'s changes (and all of them, twice: idempotent) = the unchanged VAE, fp32, fresh inputs."""
    vae = fresh_reference_models().vae.eval()
    fast = copy.deepcopy(vae)
    for _ in range(2):
        speed_up_vae(fast, speedups)
    names = {type(m).__name__ for m in fast.modules()}
    assert ("RmsNormSiLU" in names) == ("fused_norm_silu" in speedups)
    assert ("PaddedCausalConv3d" in names) == ("conv_padding" in speedups)
    assert ("FrameByFrameResidualBlock" in names) == ("frame_by_frame" in speedups)
    assert ("FrameByFrameSequential" in names) == ("frame_by_frame" in speedups)
    gen = torch.Generator().manual_seed(11)
    latents, video = torch.randn(1, 16, 3, 6, 8, generator=gen), torch.rand(1, 3, 9, 48, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        want_video = torch.cat(list(decode_streamed(vae, latents)), dim=2)
        got_video = torch.cat(list(decode_streamed(fast, latents)), dim=2)
        want_latents, got_latents = (m.encode(video).latent_dist.mode() for m in (vae, fast))
    assert relative_l2(got_video, want_video) <= 1e-5 and relative_l2(got_latents, want_latents) <= 1e-5
    torch.backends.cudnn.benchmark = False  # process-wide: leave it as the other tests expect
    with pytest.raises(ValueError, match="unknown VAE speed-up tiling"):
        speed_up_vae(fast, ["tiling"])


def test_warm_up_seconds_count_what_torch_compile_spends():
    """``infer --fast --timings``' warm-up figures: torch.compile's seconds (torch's own metrics) grow by what
    a new function's compile took, timed around it here, and its count of compiles by one; the cuDNN
    attention graphs' seconds are reported."""
    import time

    from wan_trt.runtime.fast.engines import warm_up_seconds

    def double_sine(x: torch.Tensor) -> torch.Tensor:
        return (2 * x).sin()

    before = warm_up_seconds()
    assert set(before) == {"compiling_s", "compiles", "attention graphs_s"}, before
    started = time.perf_counter()
    torch.compile(double_sine, backend="eager")(torch.randn(8))
    spent = time.perf_counter() - started
    after = warm_up_seconds()
    grown = after["compiling_s"] - before["compiling_s"]
    assert 0 < grown <= spent, (grown, spent)
    assert after["compiles"] == before["compiles"] + 1, (before, after)


def test_compiled_norm_silu_compiles_once_for_every_channel_count(monkeypatch):
    """The fused RMSNorm + SiLU, compiled (on the CPU's inductor here; on the GPU in --fast), over the VAE's
    channel counts and 1 or 2 frames of channels-last input (the VAE's layout in --fast): at most 2 graphs
    (6 when it took the norm's Parameters: one per channel count and shape, past dynamo's limit of 8 on
    the H100); on those and then on contiguous inputs, within one bf16 ulp of the eager norm + SiLU."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
    from torch._dynamo.utils import counters

    import wan_trt.runtime.fast.vae as fast_vae
    from wan_trt.runtime.fast import compiled

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(compiled, "_COMPILED", {})
    monkeypatch.setattr(fast_vae, "on_device", lambda fn, device, **options: compiled.compile_once(fn, **options))
    fused_class = fast_vae._vae_classes().fused_norm
    gen = torch.Generator().manual_seed(5)
    try:
        for layout in (torch.channels_last_3d, torch.contiguous_format):
            for channels in (96, 192, 384):
                norm = WanRMS_norm(channels, images=False).to(torch.bfloat16)
                norm.gamma.data = (torch.rand(norm.gamma.shape, generator=gen) + 0.5).to(torch.bfloat16)
                fused = copy.deepcopy(norm)
                fused.__class__ = fused_class
                for shape in ((1, channels, 2, 8, 8), (1, channels, 1, 16, 16)):
                    x = torch.randn(shape, generator=gen).to(torch.bfloat16).contiguous(memory_format=layout)
                    want = torch.nn.functional.silu(norm(x)).float()
                    ulp = 2.0 ** (torch.floor(torch.log2(want.abs().clamp(min=2.0 ** -126))) - 7)
                    assert ((fused(x).float() - want).abs() <= ulp).all()
            if layout == torch.channels_last_3d:
                assert counters["stats"]["unique_graphs"] <= 2
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("extra", [["--backend", "onnxruntime", "--device", "cuda"], ["--backend", "torch"]])
def test_infer_fast_needs_torch_backend_on_cuda(tmp_path, extra):
    """`infer --fast` with another backend or on the CPU: one line naming the fix, exit 2, nothing written."""
    from click.testing import CliRunner

    from wan_trt.cli import main

    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tmp_path / "engines"), "--input", str(tmp_path),
                                       "--out", str(out), "--fast", *extra])
    assert result.exit_code == 2, result.output
    assert "--fast runs on --backend torch --device cuda" in result.output
    assert not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--fp8-attention-kernel", "fa3", "--fp8-attention-kernel fa3 chooses the FP8 attention of --fast"),
    ("--fp8-attention-smoothing", "none", "--fp8-attention-smoothing none sets the FP8 attention of --fast")])
def test_fp8_attention_options_need_fast(tmp_path, option, value, message):
    from click.testing import CliRunner

    from wan_trt.cli import main

    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tmp_path / "engines"), "--input", str(tmp_path),
                                       "--out", str(out), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_pipeline_outputs_bring_all_but_the_caches_to_the_host():
    """Every engine hands the pipeline host tensors, except the streamed VAE's caches (fed straight back).
    The reference torch engines on CUDA once returned device tensors and `infer --backend torch --device cuda`
    failed in the pipeline's first torch.cat (found by benchmarks/infer_fast_smoke.py on the H200)."""
    from wan_trt.runtime.engines import TorchEngine, pipeline_outputs

    cache, latent = torch.zeros(2, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    got = pipeline_outputs(["latent", "next_cache_0"], (latent, cache), torch.float32)
    assert got["next_cache_0"] is cache and got["latent"].dtype == torch.float32 and got["latent"].device.type == "cpu"
    with pytest.raises(ValueError):  # a graph that returns fewer outputs than it declares is an error, not a drop
        pipeline_outputs(["latent", "next_cache_0"], (latent,))

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x * 2, x

    spec = type("Spec", (), {"inputs": [type("T", (), {"name": "x"})()], "output_names": ["y", "next_cache_0"]})()
    out = TorchEngine(Doubler(), spec).run({"x": torch.ones(2)})
    assert torch.equal(out["y"], torch.full((2,), 2.0)) and set(out) == {"y", "next_cache_0"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned copy back is for GPU outputs: needs CUDA")
def test_pipeline_outputs_copy_gpu_outputs_back_through_pinned_memory():
    """A GPU output reaches the host through a pinned staging copy, converted, complete when the call returns,
    in ordinary host memory (the staging block goes back to torch's pinned cache for the next call)."""
    from wan_trt.runtime.engines import pipeline_outputs

    video = torch.randn(1, 3, 5, 64, 96, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(2, device="cuda")
    got = pipeline_outputs(["video", "next_cache_0"], (video, cache), torch.float32)
    assert got["video"].device.type == "cpu" and not got["video"].is_pinned() and got["video"].dtype == torch.float32
    assert torch.equal(got["video"], video.float().cpu()) and got["next_cache_0"] is cache


def test_benchmark_variant_modifiers():
    """``benchmarks.run gpu --variants NAME+MOD``: a modified variant shares its base's modules and differs only
    in the option the modifier names; an unknown modifier is refused before anything is built."""
    from benchmarks import gpu

    graph = _graph()
    with pytest.raises(ValueError, match="unknown modifier bogus"):
        gpu._variants(graph, {}, ("fast_bf16+bogus",))
    base = FastTransformer(graph, None, FastOptions())  # the defaults each modifier changes
    for modifier, changes in gpu.VARIANT_MODIFIERS.items():
        variant = base.with_options(**changes)
        assert variant.model is base.model and variant.block_ops is base.block_ops, modifier
        for key, value in changes.items():
            assert getattr(variant.options, key) == value and getattr(base.options, key) != value, modifier
    _, plan = _calibrated_plan(graph, _feed(graph))
    fp8 = FastTransformer(graph, plan, FastOptions(attention="fp8", compile=False))
    assert len(fp8.fp8_attention) == 8 and not fp8.with_options(attention="bf16").fp8_attention


def test_vae_speed_benchmark_runs_on_the_cpu(tmp_path):
    """``benchmarks.vae_speed --device cpu`` on the tiny VAE (a smoke test of the script the GPU sessions run):
    every variant's peaks are written, the streamed decode's below the explicit caches', every output
    within bf16 rounding of diffusers'."""
    import json

    from benchmarks.vae_speed import main

    out = tmp_path / "vae.json"
    assert main(["--device", "cpu", "--preset", "tiny", "--sizes", "64x48", "--frames", "9", "--out", str(out),
                 "--speedups", "frame_by_frame,conv_padding"]) == 0
    row = json.loads(out.read_text())["sizes"]["64x48"]
    assert list(row) == ["diffusers_whole_clip", "explicit caches", "streamed", "+frame_by_frame", "+conv_padding"]
    peak = {key: row[key]["decode"]["memory"]["peak_allocated_gib"] for key in row}
    assert peak["streamed"] < peak["explicit caches"]
    assert all(row[key]["decode"]["vs_diffusers_psnr_range_2"]["psnr_db"] > 35 for key in list(row)[1:])

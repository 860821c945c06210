"""FP8 / INT8 Q/DQ DiT graphs: calibration, policy, the ONNX itself, its numerics in ONNX Runtime
(BASIC optimisation, as TensorRT will see the Q/DQ) against fake-quant PyTorch, and end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import CALIBRATION_STEPS, as_torch
from wan_trt.calibration.attention import stats_key
from wan_trt.calibration.cache import load_cache
from wan_trt.calibration.conv_quant import count_conv_qdq
from wan_trt.calibration.policy import load_policy
from wan_trt.calibration.qdq import count_qdq_by_block
from wan_trt.calibration.quantized import QuantizationRequest
from wan_trt.components import segment_sizes
from wan_trt.demo_media import make_demo_inputs
from wan_trt.errors import BadInputError
from wan_trt.export.build import build_engines
from wan_trt.metrics import psnr, relative_l2
from wan_trt.runtime.loading import open_pipeline
from wan_trt.runtime.pipeline import GenerationRequest
from wan_trt.runtime.samplers import Sampling

STEPS = CALIBRATION_STEPS


@pytest.fixture(scope="module")
def calibration(tiny_build) -> Path:
    """The shared calibration cache: 2 demo samples (64×48, 9 frames), every one of 4 steps, method max."""
    return tiny_build("calibration")


@pytest.fixture(scope="module", params=["fp8", "int8"])
def quantized_engines(request, tiny_build) -> tuple[str, Path]:
    return request.param, tiny_build(request.param)


def test_calibration_cache_round_trips_and_covers_every_dit_linear(calibration, manifest, tmp_path):
    cache = load_cache(calibration)
    assert cache.weights_hash == manifest.weights_hash and cache.steps == STEPS and len(cache.samples) == 2
    blocks = manifest.preset.transformer["num_layers"]
    for path in load_policy().quantized_layers(blocks):
        stats = cache.layers[path]
        assert stats.amax > 0 and stats.calls == 2 * STEPS  # every denoising step of every sample observed
        assert len(stats.channel_amax) > 0
    for block in range(blocks):  # every block's self-attention inputs, whatever the policy
        for tensor in ("q", "k", "v", "softmax", "k_smooth", "v_smooth"):  # *_smooth: less their token mean
            stats = cache.layers[stats_key(block, tensor)]
            assert stats.amax > 0 and stats.calls == 2 * STEPS
        assert cache.layers[stats_key(block, "softmax")].amax <= 1.0 + 1e-6
        for tensor in "kv":  # |x - mean| <= 2 amax(x), and not the same range as x's
            smoothed, plain = (cache.layers[stats_key(block, t)].amax for t in (f"{tensor}_smooth", tensor))
            assert smoothed <= 2 * plain and smoothed != plain
    vae_convs = [p for p in cache.layers if p.startswith("vae.")]  # every VAE conv that ran: decoder and encoder
    assert any(p.startswith("vae.decoder.") for p in vae_convs) and any(p.startswith("vae.encoder.") for p in vae_convs)
    assert all(cache.layers[p].amax > 0 and cache.layers[p].calls > 0 for p in vae_convs)
    copy = tmp_path / "again.json"
    cache.save(copy)
    assert load_cache(copy).to_json() == cache.to_json()


def test_cache_for_other_weights_is_refused(calibration, preset, tmp_path):
    with pytest.raises(BadInputError, match="re-run wan-trt calibrate"):
        build_engines(preset, tmp_path / "e", seed=1, quantization=QuantizationRequest("fp8", calibration))
    assert not (tmp_path / "e").exists()


def test_qdq_graph_is_valid_and_follows_the_policy(quantized_engines, preset):
    precision, engines = quantized_engines
    path = engines / "transformer.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 19
    policy = load_policy()
    blocks = preset.transformer["num_layers"]
    counts = count_qdq_by_block(path)
    attention = precision == "fp8" and policy.fp8_self_attention  # q, k, softmax and v quantized per block
    expected = {b: len(policy.block_layers) + 4 * attention for b in policy.quantized_blocks(blocks)}
    assert counts == expected  # kept blocks (first and last 3) have none
    weight_type = onnx.TensorProto.FLOAT8E4M3FN if precision == "fp8" else onnx.TensorProto.INT8
    quantized_weights = [i for i in model.graph.initializer if i.name.endswith("_weight_q")]
    assert len(quantized_weights) == len(policy.block_layers) * len(expected)
    assert all(i.data_type == weight_type for i in quantized_weights)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["precision"] == precision
    assert manifest["quantization"]["quantized_layers"] == len(quantized_weights)
    assert manifest["quantization"]["fp8_attention_blocks"] == (sorted(expected) if attention else [])
    if attention:  # each quantized attention matmul reads two DequantizeLinear outputs: q·kᵀ, then softmax·v
        produced = {out: n for n in model.graph.node for out in n.output}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"
                   and all(getattr(produced.get(i), "op_type", "") == "DequantizeLinear" for i in n.input)
                   and not any(i.endswith("_weight_dq") for i in n.input)]
        assert len(matmuls) == 2 * len(expected)

        def source_of(tensor: str) -> str:  # the op that feeds a Q/DQ pair
            quantize = produced[produced[tensor].input[0]]
            assert quantize.op_type == "QuantizeLinear"
            return produced[quantize.input[0]].op_type

        assert sorted(source_of(n.input[0]) for n in matmuls).count("Softmax") == len(expected)  # softmax·v


def test_qdq_in_ort_equals_fake_quant_pytorch(quantized_engines):
    precision, engines = quantized_engines
    ort_pipeline, _ = open_pipeline(engines, "onnxruntime")
    torch_pipeline, _ = open_pipeline(engines, "torch")
    spec = ort_pipeline.engines["transformer"].spec
    for index, sizes in enumerate([segment_sizes(9, 32, 48), segment_sizes(21, 48, 32, batch=2)]):
        feed = as_torch(spec.sample_inputs(sizes, seed=40 + index))
        got = ort_pipeline.engines["transformer"].run(feed)["velocity"]
        want = torch_pipeline.engines["transformer"].run(feed)["velocity"]
        error = relative_l2(got, want)
        print(f"{precision} Q/DQ (ORT, BASIC) vs fake-quant PyTorch at {sizes}: rel-L2 {error:.2e}")
        assert error <= 1e-3, f"{precision} Q/DQ vs fake-quant at {sizes}: {error:.2e}"


def test_accuracy_report_is_written(quantized_engines):
    precision, engines = quantized_engines
    report = json.loads((engines / "accuracy.json").read_text())
    assert report["precision"] == precision
    assert set(report["denoiser_rel_l2_vs_fp32"]) == {"999", "500", "1"}
    assert all(0 < v < 0.5 for v in report["denoiser_rel_l2_vs_fp32"].values())


@pytest.fixture(scope="module")
def fp32_video(tiny_engines, tmp_path_factory):
    inputs = make_demo_inputs(tmp_path_factory.mktemp("e2e") / "in", width=64, height=48, num_frames=17, seed=5)
    from wan_trt.driving_inputs import load_driving_inputs

    driving = load_driving_inputs(str(inputs))
    request = GenerationRequest(ref_image=driving.ref_image, pose_frames=driving.pose.frames,
                                face_frames=driving.face.frames, seed=3, sampling=Sampling(steps=8), segment_frames=17)
    pipeline, _ = open_pipeline(tiny_engines, "onnxruntime")
    return request, np.concatenate([s.frames for s in pipeline.generate(request)])


def test_quantized_video_psnr_vs_fp32(quantized_engines, fp32_video):
    precision, engines = quantized_engines
    request, reference = fp32_video
    pipeline, _ = open_pipeline(engines, "onnxruntime")
    frames = np.concatenate([s.frames for s in pipeline.generate(request)])
    value = psnr(frames, reference)
    print(f"{precision} video PSNR vs fp32 (tiny preset, seed 3): {value:.2f} dB")
    assert value >= {"fp8": 30.0, "int8": 25.0}[precision]


def test_bad_policy_and_missing_cache_are_clear(preset, tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text('{"keep_first_blocks": 1}')
    with pytest.raises(BadInputError, match="policy"):
        load_policy(bad)
    with pytest.raises(BadInputError, match="does not exist"):
        build_engines(preset, tmp_path / "e", quantization=QuantizationRequest("fp8", tmp_path / "none.json"))


def test_shipped_policies_by_name():
    """--policy default | every-block | all-layers; the default and every-block leave the cross-attention
    Linears (attn2.*) in high precision (they carry most of the FP8 error: fp8_sensitivity_h100_480.json)."""
    default, every, everything = (load_policy(n) for n in ("default", "every-block", "all-layers"))
    assert load_policy(None) == default and default.source == "default"
    assert not any(layer.startswith("attn2.") for layer in default.block_layers)
    assert every.block_layers == default.block_layers and every.source == "every-block"
    assert (every.keep_first_blocks, every.keep_last_blocks) == (0, 0)
    assert (default.keep_first_blocks, default.keep_last_blocks) == (3, 3)
    assert len(everything.block_layers) == 12 and set(default.block_layers) < set(everything.block_layers)
    assert all(p.fp8_self_attention for p in (default, every, everything))
    with pytest.raises(BadInputError, match="every-block"):
        load_policy("fastest")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "policies").glob("*.json")),
                         ids=lambda p: p.name)
def test_benchmark_policies_load_and_name_block_linears(path):
    """The diagnostic policies under benchmarks/policies/ (the GPU benchmark's --policy) are valid policies
    whose layers are the DiT blocks' own Linears."""
    from wan_trt.runtime.fast.transformer import BLOCK_LINEARS

    policy = load_policy(path)
    assert policy.source == str(path) and set(policy.block_layers) <= set(BLOCK_LINEARS)
    assert json.loads(path.read_text())["description"].startswith("Diagnostic")


def test_calibrate_and_inspect_from_the_command_line(tiny_engines, quantized_engines, tmp_path):
    from click.testing import CliRunner

    from wan_trt.cli import main

    sample = make_demo_inputs(tmp_path / "s", width=48, height=32, num_frames=5)
    out = tmp_path / "c.json"
    result = CliRunner().invoke(main, ["calibrate", "--engines", str(tiny_engines), "--data", str(sample),
                                       "--out", str(out), "--steps", "2", "--segment-frames", "5",
                                       "--method", "percentile"])
    assert result.exit_code == 0, result.output
    assert load_cache(out).method == "percentile"

    precision, engines = quantized_engines
    result = CliRunner().invoke(main, ["inspect", str(engines)])
    assert result.exit_code == 0, result.output
    assert f"precision {precision}" in result.stdout
    assert f"{precision:<5} transformer.blocks.3.attn1.to_q" in result.stdout
    assert "fp32  transformer.blocks.2.attn1.to_q" in result.stdout  # first 3 blocks kept
    assert "fp32  transformer.face_adapter.0.to_q" in result.stdout
    attention = "fp8" if precision == "fp8" else "fp32"  # INT8 builds keep attention in high precision
    assert f"{attention:<5} transformer.blocks.3.attn1 q·k" in result.stdout
    assert f"{attention:<5} transformer.blocks.3.attn1 softmax·v" in result.stdout
    assert "fp32  transformer.blocks.2.attn1 softmax·v" in result.stdout


def test_build_cli_needs_calibration_for_fp8(tmp_path):
    from click.testing import CliRunner

    from wan_trt.cli import main

    result = CliRunner().invoke(main, ["build", "--precision", "fp8", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--calibration" in result.stderr


@pytest.fixture(scope="module")
def vae_quantized_engines(tiny_build) -> Path:
    """FP8 engines whose policy also quantizes the VAE decoder's convolutions."""
    return tiny_build("fp8-vae")


def test_vae_decoder_convs_get_qdq_and_the_torch_backend_follows(vae_quantized_engines, fp32_video):
    engines = vae_quantized_engines
    manifest = json.loads((engines / "manifest.json").read_text())
    convs = manifest["quantization"]["vae_decoder_convs"]
    assert convs > 0 and manifest["quantization"]["policy"]["vae_decoder_convs"] is True
    assert count_conv_qdq(engines / "vae_decoder_step.onnx") == convs
    assert 0 < count_conv_qdq(engines / "vae_decoder_first.onnx") <= convs  # the first chunk skips time convs
    assert count_conv_qdq(engines / "vae_encoder_step.onnx") == 0
    onnx.checker.check_model(onnx.load(str(engines / "vae_decoder_step.onnx")), full_check=True)

    request, reference = fp32_video
    ort_pipeline, _ = open_pipeline(engines, "onnxruntime")
    frames = np.concatenate([s.frames for s in ort_pipeline.generate(request)])
    torch_pipeline, _ = open_pipeline(engines, "torch")
    torch_frames = np.concatenate([s.frames for s in torch_pipeline.generate(request)])
    vs_fp32, vs_torch = psnr(frames, reference), psnr(frames, torch_frames)
    report = json.loads((engines / "accuracy.json").read_text())
    print(f"fp8 DiT + fp8 VAE decoder convs ({convs}): video PSNR vs fp32 {vs_fp32:.2f} dB (ORT), "
          f"ORT vs fake-quant torch {vs_torch:.2f} dB, accuracy.json {report['video_psnr_db_vs_fp32']} dB")
    assert vs_fp32 >= 25.0
    assert vs_torch >= 30.0  # the torch backend quantizes the same convs (end to end, boundary flips compound)
    assert report["quantization"]["vae_decoder_convs"] == convs


def test_fast_plan_takes_the_smoothed_attention_ranges(quantized_engines, monkeypatch, caplog):
    """``infer --fast`` reads the FP8 attention's q/k/v scales from the build's calibration cache: k's and v's
    ranges less their token mean where ``--fp8-attention-smoothing`` smooths them (auto: v). A cache without
    those ranges (made before smoothing existed): auto runs unsmoothed and says so; asking for smoothing is
    one error naming the fixes."""
    import dataclasses

    import wan_trt.calibration.cache as cache_module
    from wan_trt.errors import EngineError
    from wan_trt.runtime.fast.engines import fast_plan
    from wan_trt.runtime.loading import reference_graph_modules
    from wan_trt.runtime.manifest import read_manifest

    precision, engines = quantized_engines
    manifest = read_manifest(engines)
    graph = reference_graph_modules(manifest)["transformer"]
    if precision != "fp8":  # INT8 engines: every policy layer on the INT8 plan, no FP8 attention (bf16 in --fast)
        plan, ranges, _ = fast_plan(graph, engines, manifest, "auto")
        assert plan.precision == "int8" and plan.layers and not plan.attention and ranges == {}
        assert all(layer.inv_smooth is not None for layer in plan.layers.values())  # SmoothQuant, as the graph
        return
    cache = load_cache(engines / manifest.quantization["calibration_file"])
    for smoothing, names in (("none", "qkv"), ("v", ("q", "k", "v_smooth")), ("kv", ("q", "k_smooth", "v_smooth")),
                             ("auto", ("q", "k", "v_smooth"))):
        plan, ranges, used = fast_plan(graph, engines, manifest, smoothing)
        assert used == ("v" if smoothing == "auto" else smoothing)
        assert plan.attention and set(ranges) == set(plan.attention)
        for block, got in ranges.items():
            assert got == tuple(cache.layers[stats_key(block, n)].amax for n in names), (smoothing, block)
    old = dataclasses.replace(cache, layers={k: v for k, v in cache.layers.items() if not k.endswith("_smooth")})
    monkeypatch.setattr(cache_module, "load_cache", lambda path: old)
    with pytest.raises(EngineError, match="v_smooth.*re-run wan-trt calibrate.*--fp8-attention-smoothing none"):
        fast_plan(graph, engines, manifest, "v")
    with caplog.at_level("WARNING"):
        _, ranges, used = fast_plan(graph, engines, manifest, "auto")
    assert used == "none" and "predates FP8 attention smoothing" in caplog.text
    assert ranges == fast_plan(graph, engines, manifest, "none")[1]  # the plain ranges

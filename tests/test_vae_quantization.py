"""FP8 / INT8 Q/DQ convolutions in the streamed VAE decoder graphs (``calibration/conv_quant.py``):
calibration of conv input ranges (causal caches included), the default conv selection, the Q/DQ
ONNX itself, its numerics in ONNX Runtime (BASIC, as TensorRT sees Q/DQ) against the PyTorch
fake-quant module layer by layer and end to end, and the fake-quant error against fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import as_torch, fresh_reference_models
from wan_trt.calibration.conv_quant import (CHANNEL_MULTIPLE, ConvLayerPlan, ConvQuantPlan, apply_fake_quant_convs,
                                            check_conv_qdq_layers, conv_layers, count_conv_qdq, make_conv_plan,
                                            observe_convs, select_convs, write_conv_qdq)
from wan_trt.registry import graph_specs
from wan_trt.errors import BadInputError
from wan_trt.models.graphs import VaeDecoderFirst, VaeDecoderStep, cache_layouts
from wan_trt.export.onnx_export import EXPORT_SIZES
from wan_trt.metrics import relative_l2
from wan_trt.runtime.engines import OrtEngine, TorchEngine
from wan_trt.tokenizer import build_tiny_tokenizer

GRAPHS = ("vae_decoder_step", "vae_decoder_first")
CALIBRATION_SEEDS = (101, 102)
EVAL_SEED = 7
LAYER_TOLERANCE = 1e-5  # a quantized Conv in ORT vs torch on the same dequantized input: float summation order only
QUANT_ERROR_BOUND = {"fp8": 0.3, "int8": 0.15}  # fake-quant vs fp32, whole decoder (random tiny weights)


@pytest.fixture(scope="module")
def vae_graphs(preset, tiny_engines, manifest, tmp_path_factory):
    """The decoder's step and first-chunk graph modules (one VAE), their specs, their fp32 ONNX files (those
    of ``tiny_engines``: the same seed-0 weights, checked by hash) and the conv input ranges observed on
    sample inputs of both."""
    models = fresh_reference_models()
    assert models.weights_hash() == manifest.weights_hash
    encoder_slots, decoder_slots = cache_layouts(models)
    specs = graph_specs(preset, encoder_slots, decoder_slots, build_tiny_tokenizer().get_vocab_size())
    modules = {"vae_decoder_step": VaeDecoderStep(models.vae).eval(),
               "vae_decoder_first": VaeDecoderFirst(models.vae).eval()}
    out = tmp_path_factory.mktemp("vae_qdq")
    files = {name: tiny_engines / manifest.graphs[name].file for name in GRAPHS}
    with observe_convs(modules["vae_decoder_step"]) as observer:
        for name in GRAPHS:
            for seed in CALIBRATION_SEEDS:
                TorchEngine(modules[name], specs[name]).run(_feed(specs[name], seed))
    return {"modules": modules, "specs": specs, "files": files, "amax": dict(observer.amax),
            "calls": dict(observer.calls), "dir": out}


@pytest.fixture(scope="module", params=["fp8", "int8"])
def quantized(request, vae_graphs):
    """(precision, plan, {graph: Q/DQ file}, {graph: quantized conv paths})."""
    step = vae_graphs["modules"]["vae_decoder_step"]
    plan = make_conv_plan(conv_layers(step), vae_graphs["amax"], request.param)
    files, written = {}, {}
    for name in GRAPHS:
        files[name] = vae_graphs["dir"] / f"{name}.{request.param}.onnx"
        written[name] = write_conv_qdq(vae_graphs["files"][name], files[name], plan,
                                       require_all=name == "vae_decoder_step")
    return request.param, plan, files, written


def _feed(spec, seed):
    return as_torch(spec.sample_inputs(EXPORT_SIZES, seed=seed))


def test_conv_paths_are_the_exported_node_paths(vae_graphs):
    from wan_trt.calibration.qdq import module_path

    convs = conv_layers(vae_graphs["modules"]["vae_decoder_step"])
    model = onnx.load(str(vae_graphs["files"]["vae_decoder_step"]))
    in_graph = {module_path(n) for n in model.graph.node if n.op_type == "Conv"}
    assert in_graph <= set(convs)
    assert in_graph == set(vae_graphs["amax"])  # exactly the decoder's convs ran (and each is in the graph)
    assert "vae.decoder.up_blocks.0.resnets.0.conv1" in in_graph


def test_observer_includes_the_causal_cache(vae_graphs):
    """``decoder.conv_in`` (feature-cache slot 0) sees cat(cache_00, x): a large cache sets its range."""
    module, spec = vae_graphs["modules"]["vae_decoder_step"], vae_graphs["specs"]["vae_decoder_step"]
    feed = _feed(spec, 5)
    feed["cache_00"] = feed["cache_00"] * 1000.0
    with observe_convs(module, ["vae.decoder.conv_in", "vae.post_quant_conv"]) as observer:
        TorchEngine(module, spec).run(feed)
    assert observer.amax["vae.decoder.conv_in"] == pytest.approx(float(feed["cache_00"].abs().max()))
    assert observer.amax["vae.post_quant_conv"] < 1000.0  # a 1x1x1 conv takes no cache
    assert observer.calls == {"vae.decoder.conv_in": 1, "vae.post_quant_conv": 1}


def test_default_selection_follows_the_channel_rule(vae_graphs):
    convs = conv_layers(vae_graphs["modules"]["vae_decoder_step"])
    chosen = [p for p in select_convs(convs) if p in vae_graphs["amax"]]
    assert chosen
    for path in chosen:
        assert convs[path].in_channels % CHANNEL_MULTIPLE == 0 and convs[path].out_channels % CHANNEL_MULTIPLE == 0
    for kept in ("vae.post_quant_conv", "vae.decoder.conv_in", "vae.decoder.conv_out",
                 "vae.decoder.up_blocks.3.resnets.0.conv1"):  # latents in, pixels out, 8 channels
        assert kept not in chosen
    plan = make_conv_plan(convs, vae_graphs["amax"], "fp8")
    assert list(plan.layers) == chosen


def test_qdq_graphs_are_valid_and_quantize_the_plan(vae_graphs, quantized):
    precision, plan, files, written = quantized
    step_only = {p for p in plan.layers if p.endswith("time_conv")}  # the first chunk skips the upsamplers' time convs
    assert step_only and set(written["vae_decoder_step"]) == set(plan.layers)
    assert set(written["vae_decoder_first"]) == set(plan.layers) - step_only
    for name in GRAPHS:
        onnx.checker.check_model(str(files[name]), full_check=True)
        assert count_conv_qdq(files[name]) == len(written[name])
        assert count_conv_qdq(vae_graphs["files"][name]) == 0
        weights = {i.name: i.data_type for i in onnx.load(str(files[name])).graph.initializer}
        wanted = onnx.TensorProto.FLOAT8E4M3FN if precision == "fp8" else onnx.TensorProto.INT8
        assert all(weights[f"{p.replace('.', '_')}_weight_q"] == wanted for p in written[name])
        assert not any(f"{p}.weight" in weights for p in written[name])  # the float weights are gone
        spec = vae_graphs["specs"][name]
        outputs = OrtEngine(files[name], spec, optimization="basic").run(_feed(spec, EVAL_SEED))
        assert all(torch.isfinite(v).all() for v in outputs.values())


def test_every_quantized_conv_matches_its_fake_quant_layer(vae_graphs, quantized):
    precision, plan, files, written = quantized
    convs = conv_layers(vae_graphs["modules"]["vae_decoder_step"])
    for name in GRAPHS:
        feed = vae_graphs["specs"][name].sample_inputs(EXPORT_SIZES, seed=EVAL_SEED)
        checks = check_conv_qdq_layers(files[name], feed, convs, plan)
        assert [c.path for c in checks] == written[name]
        worst = max(c.output_rel_l2 for c in checks)
        print(f"\n{precision} {name}: {len(checks)} convs, code mismatches {max(c.code_mismatch for c in checks):.1e}, "
              f"worst conv output rel-L2 {worst:.1e}")
        assert all(c.code_mismatch == 0.0 for c in checks)
        assert worst <= LAYER_TOLERANCE


def test_graph_and_fake_quant_module_end_to_end(vae_graphs, quantized):
    """End to end the graph's quantization error equals the simulated one; the two differ from each other
    only where a value within float rounding of a quantization boundary took the other code (see
    ``check_conv_qdq_layers``), which cascades through the chain of quantized convs: that difference is
    reported, not bounded at 1e-3."""
    precision, plan, files, _ = quantized
    step = vae_graphs["modules"]["vae_decoder_step"]
    for name in GRAPHS:
        spec, module = vae_graphs["specs"][name], vae_graphs["modules"][name]
        feed = _feed(spec, EVAL_SEED)
        fp32 = TorchEngine(module, spec).run(feed)
        with apply_fake_quant_convs(step, plan):
            fake = TorchEngine(module, spec).run(feed)
        restored = TorchEngine(module, spec).run(feed)
        graph = OrtEngine(files[name], spec, optimization="basic").run(feed)
        assert all(torch.equal(restored[o], fp32[o]) for o in spec.output_names)
        quant_error = relative_l2(fake["video"], fp32["video"])
        print(f"\n{precision} {name} video rel-L2: ORT Q/DQ vs fake-quant "
              f"{relative_l2(graph['video'], fake['video']):.2e}, fake-quant vs fp32 {quant_error:.2e}, "
              f"ORT Q/DQ vs fp32 {relative_l2(graph['video'], fp32['video']):.2e}")
        assert 1e-4 < quant_error < QUANT_ERROR_BOUND[precision]
        for output in spec.output_names:
            simulated = relative_l2(fake[output], fp32[output])
            actual = relative_l2(graph[output], fp32[output])
            assert abs(actual - simulated) <= 0.1 * simulated + 1e-5, output


def test_planned_conv_missing_from_a_graph_raises(vae_graphs, tmp_path):
    step = vae_graphs["modules"]["vae_decoder_step"]
    plan = make_conv_plan(conv_layers(step), vae_graphs["amax"], "int8")
    with pytest.raises(RuntimeError, match="found no Conv node"):  # the first chunk runs no time_conv
        write_conv_qdq(vae_graphs["files"]["vae_decoder_first"], tmp_path / "x.onnx", plan, require_all=True)
    conv_in = "vae.encoder.conv_in"
    encoder = ConvQuantPlan("int8", {conv_in: ConvLayerPlan(conv_in, 0.1, np.ones(8, np.float32))})
    with pytest.raises(RuntimeError, match="vae.encoder.conv_in"):
        write_conv_qdq(vae_graphs["files"]["vae_decoder_step"], tmp_path / "y.onnx", encoder)
    step_file = vae_graphs["files"]["vae_decoder_step"]
    assert write_conv_qdq(step_file, tmp_path / "z.onnx", encoder, require_all=False) == []
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_plan_refuses_unknown_or_uncalibrated_convs(vae_graphs):
    convs = conv_layers(vae_graphs["modules"]["vae_decoder_step"])
    with pytest.raises(BadInputError, match="no such"):
        make_conv_plan(convs, vae_graphs["amax"], "fp8", layers=["vae.decoder.nope"])
    with pytest.raises(BadInputError, match="no calibration range"):
        make_conv_plan(convs, vae_graphs["amax"], "fp8", layers=["vae.encoder.down_blocks.0.conv1"])
    with pytest.raises(BadInputError, match="quantized precisions"):
        make_conv_plan(convs, vae_graphs["amax"], "int4")

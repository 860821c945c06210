"""fp16 / bf16 graphs, and FP8 Q/DQ over a bf16 graph: dtypes, proofs in ONNX Runtime, accuracy, size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import ALL_BLOCKS_POLICY
from wan_trt.calibration.policy import load_policy
from wan_trt.errors import EngineError
from wan_trt.models.precision import graph_dtypes
from wan_trt.metrics import psnr
from wan_trt.runtime.loading import open_pipeline
from wan_trt.runtime.manifest import read_manifest
from wan_trt.runtime.pipeline import GenerationRequest
from wan_trt.runtime.samplers import Sampling

SEGMENT, STEPS = 9, 4


@pytest.fixture(scope="module")
def half_engines(tiny_build) -> dict[str, Path]:
    """fp16 and bf16 builds of the tiny preset (seed 0, the same weights as ``tiny_engines``)."""
    return {p: tiny_build(p) for p in ("fp16", "bf16")}


@pytest.fixture(scope="module")
def fp8_over_bf16(tiny_build) -> Path:
    """FP8 Q/DQ in every block's Linears (``all_blocks_policy.json``) over a bf16 graph."""
    return tiny_build("fp8-over-bf16")


def _initializer_types(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: i.data_type for i in model.graph.initializer}


def _weight_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(len(i.raw_data) if i.raw_data else onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_graphs_have_the_declared_dtypes(half_engines, precision):
    manifest = read_manifest(half_engines[precision])
    expected = graph_dtypes(precision, list(manifest.graphs))
    assert {name: entry.dtype for name, entry in manifest.graphs.items()} == expected
    assert expected["transformer"] == precision and expected["image_encoder"] == "fp32"
    half_type = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    for name, entry in manifest.graphs.items():
        onnx.checker.check_model(str(half_engines[precision] / entry.file), full_check=True)
        types = set(_initializer_types(half_engines[precision] / entry.file).values())
        assert (half_type in types) == (entry.dtype == precision), name
        model = onnx.load(str(half_engines[precision] / entry.file), load_external_data=False)
        # I/O stays float32 whatever the precision: the runtime and the declarations do not change
        assert all(v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
                   for v in list(model.graph.input) + list(model.graph.output)), name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_accuracy_report(half_engines, precision):
    report = json.loads((half_engines[precision] / "accuracy.json").read_text())
    assert report["precision"] == precision
    for rows in (report["denoiser_rel_l2_vs_fp32"], report["denoiser_rel_l2_vs_fp32_pytorch"]):
        assert set(rows) == {"999", "500", "1"}
        assert all(0 < v <= 2e-2 for v in rows.values())  # ~1e-3 (fp16) / ~8e-3 (bf16) seen
    assert report["video_psnr_db_vs_fp32"] >= 40  # ~56 dB seen for bf16


def test_fp16_engines_run_end_to_end_in_onnxruntime(half_engines, ort_engines, manifest):
    """fp16 graphs run on ORT's CPU provider; the video stays close to the fp32 engines' video."""
    from wan_trt.demo_media import make_face_frames, make_pose_frames, make_ref_image
    from wan_trt.runtime.pipeline import AnimatePipeline

    request = GenerationRequest(ref_image=make_ref_image(64, 48, 5), pose_frames=make_pose_frames(64, 48, SEGMENT, 16.0, 5),
                                face_frames=make_face_frames(int(manifest.preset.face_size), SEGMENT, 16.0, 5),
                                sampling=Sampling(steps=STEPS), segment_frames=SEGMENT, seed=1)
    half, _ = open_pipeline(half_engines["fp16"], "onnxruntime")
    reference = AnimatePipeline(ort_engines, manifest.preset, half.tokenize)
    got = np.concatenate([s.frames for s in half.generate(request)])
    want = np.concatenate([s.frames for s in reference.generate(request)])
    assert got.shape == want.shape == (SEGMENT, 48, 64, 3)
    assert psnr(got, want) >= 35


def test_bf16_engines_are_refused_by_onnxruntime_cpu_with_the_way_out(half_engines):
    with pytest.raises(EngineError, match=r"bf16 graphs \(text_encoder, transformer\).*--backend tensorrt"):
        open_pipeline(half_engines["bf16"], "onnxruntime")


def test_bf16_engines_run_on_the_torch_backend(half_engines, tmp_path):
    pipeline, manifest = open_pipeline(half_engines["bf16"], "torch")
    assert manifest.graphs["transformer"].dtype == "bf16"
    transformer = pipeline.engines["transformer"].module
    assert any(p.dtype.is_floating_point and str(p.dtype) == "torch.bfloat16" for p in transformer.parameters())


def test_fp8_over_bf16_graph(fp8_over_bf16, preset):
    path = fp8_over_bf16 / "transformer.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    types = _initializer_types(path)
    weights_q = [n for n, t in types.items() if n.endswith("_weight_q")]
    blocks = int(preset.transformer["num_layers"])
    assert len(weights_q) == len(load_policy(ALL_BLOCKS_POLICY).quantized_layers(blocks))
    assert all(types[n] == TensorProto.FLOAT8E4M3FN for n in weights_q)
    # scales are in the graph's high-precision type: Q takes bf16 activations, DQ gives bf16
    assert all(types[n] == TensorProto.BFLOAT16 for n in types if n.endswith(("_act_scale", "_weight_scale")))
    manifest = json.loads((fp8_over_bf16 / "manifest.json").read_text())
    assert manifest["quantization"]["high_precision"] == "bf16"
    assert manifest["graphs"]["transformer"]["dtype"] == "bf16"
    report = json.loads((fp8_over_bf16 / "accuracy.json").read_text())
    assert all(0 < v <= 0.1 for v in report["denoiser_rel_l2_vs_fp32"].values())
    assert report["video_psnr_db_vs_fp32"] >= 30


def test_fp8_weight_bytes_follow_the_size_arithmetic(fp8_over_bf16, half_engines, preset):
    """FP8 over bf16 saves exactly the bytes the size arithmetic says; on the real DiT that is <= 0.55x.

    The tiny DiT's files are mostly graph structure (node metadata; its weights are ~0.27 MB), so
    the size claim is checked where it lives: the bytes quantization saves in the tiny files against
    the arithmetic (1 byte instead of 2 per quantized weight, plus each layer's scales and zero
    points), and the same arithmetic over the real architecture (17.3 B parameters, meta device).
    """
    from wan_trt.models.graphs import TransformerGraph
    from wan_trt.models.precision import cast_module
    from wan_trt.preflight import meta_modules
    from wan_trt.presets import get_preset

    def bf16_and_fp8_bytes(transformer, policy) -> tuple[int, int]:
        graph = cast_module(TransformerGraph(transformer), "bf16")  # keep-fp32 modules stay fp32
        bf16 = sum(p.numel() * p.element_size() for n, p in graph.named_parameters()
                   if not n.startswith("transformer.motion_encoder."))  # its own graph
        layers = [graph.get_submodule(path) for path in policy.quantized_layers(len(transformer.blocks))]
        saved = sum(layer.weight.numel() for layer in layers)  # 2 bytes -> 1
        scales = sum(3 * layer.weight.shape[0] + 3 for layer in layers)  # bf16 scale + fp8 zero, per channel/tensor
        scales += 3 * 4 * len(policy.attention_blocks(len(transformer.blocks), "fp8"))  # q, k, softmax, v per tensor
        return bf16, bf16 - saved + scales

    policy = load_policy(ALL_BLOCKS_POLICY)
    vocab = read_manifest(half_engines["bf16"]).graphs["text_encoder"].spec.vocab_size
    bf16_tiny, fp8_tiny = bf16_and_fp8_bytes(meta_modules(preset, vocab)["transformer"], policy)
    measured_bf16 = _weight_bytes(half_engines["bf16"] / "transformer.onnx")
    measured_fp8 = _weight_bytes(fp8_over_bf16 / "transformer.onnx")
    assert measured_bf16 - measured_fp8 == pytest.approx(bf16_tiny - fp8_tiny, rel=1e-3)
    assert measured_bf16 == pytest.approx(bf16_tiny, rel=0.05)  # + GELU constants etc. stored in the graph

    real = meta_modules(get_preset("animate-14b"), vocab_size=256384)["transformer"]
    bf16_real, fp8_all_blocks = bf16_and_fp8_bytes(real, policy)
    assert fp8_all_blocks / bf16_real <= 0.55  # 0.533
    _, fp8_default = bf16_and_fp8_bytes(real, load_policy())
    # 0.758: the default keeps 6 blocks, every block's cross-attention Linears and the face blocks in bf16
    assert 0.70 < fp8_default / bf16_real < 0.80

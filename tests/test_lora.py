"""LoRA files as people ship them for Wan 14B, and several of them (``wan_trt.lora``).

Full size, on the meta device: every key of a synthetic LoRA with the real names and shapes maps, in
each format. Tiny model: the merged DiT equals the unmerged one with the LoRA applied on the fly, the
formats agree, two LoRAs merge to their sum, diffusers' own Wan LoRA conversion agrees where it
supports a key. Bad files are one line, exit 2, nothing written; the manifest records each LoRA and
the torch backend rebuilds the same weights. No test here needs an engines build.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from synthetic_checkpoints import noisy_tiny_models, tiny_transformer_output
from synthetic_loras import BLOCK_NORMS, TOP_NORMS, LoraItem, expected_changes, lora_items, render
from wan_trt.checkpoints import empty_transformer
from wan_trt.cli import main
from wan_trt.errors import BadInputError
from wan_trt.lora import LoraSpec, merge_lora, merge_loras, plan_lora
from wan_trt.metrics import relative_l2
from wan_trt.presets import get_preset

FORMATS = {  # name → how ``render`` writes it (the key conventions of recipes' "LoRA file formats")
    "kijai_down_up": dict(prefix="diffusion_model."),
    "lora_A_B": dict(prefix="diffusion_model.", pair_names=("lora_A", "lora_B")),
    "peft_default_adapter": dict(prefix="base_model.model.", pair_names=("lora_A", "lora_B"), adapter="default"),
    "comfy_model_prefix": dict(prefix="model.diffusion_model."),
    "lightx2v_model_prefix": dict(prefix="model."),
    "no_prefix": dict(),
    "diffusers_names": dict(naming="diffusers", prefix="transformer.", pair_names=("lora_A", "lora_B")),
    "diffusers_names_no_prefix": dict(naming="diffusers", pair_names=("lora_A", "lora_B")),
}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return noisy_tiny_models().transformer


def _counts(items: list[LoraItem]) -> dict[str, int]:
    return {kind: sum(item.kind == kind for item in items) for kind in ("pair", "weight", "bias", "modulation")}


def _merged(base: torch.nn.Module, *specs_and_states) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for state, scale in specs_and_states:
        merge_lora(model, state, scale)
    return model


# ----------------------------------------------------------------------------------- full size


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_key_of_a_full_size_lora_maps_in_each_format(name):
    """animate-14b on meta: pairs on every block Linear, the embeddings and patch_embedding (a Conv3d),
    bias deltas, the norms' weight deltas (norm_k_img, norm3 …), each block's and the head's modulation
    delta, the head's weight delta — each lands on the diffusers parameter the facts name, nothing is left."""
    model = empty_transformer(get_preset("animate-14b"))
    items = lora_items(model, rank=16, device="meta")
    state = render(items, **FORMATS[name])
    plan = plan_lora(model, LoraSpec(f"{name}.safetensors"), state)
    report = plan.report()
    assert plan.ignored == []
    assert sorted((c.target, c.kind) for c in plan.changes) == sorted((i.target, i.kind) for i in items)
    counts = _counts(items)
    assert (report.pairs, report.weight_deltas, report.bias_deltas, report.modulation_deltas) == \
        (counts["pair"], counts["weight"], counts["bias"], counts["modulation"]) == (488, 243, 531, 41)
    alphas = sum(key.endswith(".alpha") for key in state)
    assert len(state) == 2 * report.pairs + alphas + report.weight_deltas + report.bias_deltas + report.modulation_deltas
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was loaded or merged
    by_key = {change.key: change.target for change in plan.changes}
    prefix = FORMATS[name].get("prefix", "")
    if FORMATS[name].get("naming", "original") == "original":  # a few names spelled out
        assert by_key[f"{prefix}blocks.39.cross_attn.norm_k_img.diff"] == "blocks.39.attn2.norm_added_k.weight"
        assert by_key[f"{prefix}blocks.0.norm3.diff_b"] == "blocks.0.norm2.bias"
        assert by_key[f"{prefix}head.head.diff"] == "proj_out.weight"
    assert by_key[f"{prefix}blocks.7.diff_m"] == "blocks.7.scale_shift_table"
    assert by_key[f"{prefix}head.diff_m"] == "scale_shift_table"


# ------------------------------------------------------------------------------ tiny, numbers


def test_merged_dit_equals_the_unmerged_dit_with_the_lora_applied_on_the_fly(base):
    """Pairs run as LoRA branches beside their layer (forward hooks); weight, bias and modulation deltas are
    added to the untouched parameters at every forward (parametrizations). Merged output = that, ≤ 1e-6."""
    from torch.nn.utils import parametrize

    scale = 0.7
    items = lora_items(base, rank=4, seed=1, magnitude=0.1)
    merged = _merged(base, (render(items, prefix="diffusion_model."), scale))

    class AddDelta(torch.nn.Module):
        def __init__(self, delta: torch.Tensor):
            super().__init__()
            self.delta = delta

        def forward(self, value: torch.Tensor) -> torch.Tensor:
            return value + self.delta

    def branch(layer: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, factor: float):
        def hook(module, inputs, output):
            x = inputs[0]
            if isinstance(layer, torch.nn.Linear):
                return output + factor * ((x @ down.T) @ up.T)
            low = torch.nn.functional.conv3d(x, down, stride=layer.stride, padding=layer.padding)
            return output + factor * torch.nn.functional.conv3d(low, up)
        return hook

    on_the_fly = copy.deepcopy(base)
    modules = dict(on_the_fly.named_modules())
    for item in items:
        if item.kind == "pair":
            down, up = item.tensors
            layer = modules[item.diffusers]
            layer.register_forward_hook(branch(layer, down, up, scale * item.alpha / down.shape[0]))
        else:
            owner, _, leaf = item.target.rpartition(".")
            parametrize.register_parametrization(modules[owner], leaf, AddDelta(scale * item.tensors[0]))

    got, want = tiny_transformer_output(merged), tiny_transformer_output(on_the_fly)
    assert relative_l2(got, want) <= 1e-6
    assert relative_l2(got, tiny_transformer_output(base)) > 1e-2  # the LoRA does change the output
    changed = {item.target for item in items}
    for name, value in merged.state_dict().items():  # and nothing else changed
        assert (name in changed) != torch.equal(value, base.state_dict()[name]), name


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_and_file_type_merges_to_the_expected_weights(name, base, tmp_path):
    scale = 0.5
    items = lora_items(base, rank=4, seed=2)
    state = render(items, **FORMATS[name])
    if name.startswith("peft"):  # a torch checkpoint as the relighting LoRA ships ({"state_dict": …})
        path = tmp_path / "lora.ckpt"
        torch.save({"state_dict": state}, path)
    else:
        path = tmp_path / "lora.safetensors"
        save_file(state, str(path))
    model = copy.deepcopy(base)
    (report,) = merge_loras(model, [LoraSpec(str(path), scale)])
    want = expected_changes(items, scale)
    assert set(report.targets) == set(want)
    params, base_params = dict(model.named_parameters()), dict(base.named_parameters())
    for target, change in want.items():
        assert torch.allclose(params[target], base_params[target] + change, rtol=1e-6, atol=1e-6), target


def test_two_loras_merge_to_their_sum_in_order(base, tmp_path, caplog):
    """A 4-step distillation LoRA (Kijai layout with deltas) and a relighting LoRA (PEFT pairs), as the
    ComfyUI template stacks them: merged together = base + their scaled sum; the log names each."""
    distill, relight = lora_items(base, rank=8, seed=3), lora_items(base, rank=4, seed=4, norms=False,
                                                                      modulation=False, head=False, convs=False)
    save_file(render(distill, prefix="diffusion_model."), str(tmp_path / "distill.safetensors"))
    torch.save({"state_dict": render(relight, prefix="base_model.model.", pair_names=("lora_A", "lora_B"),
                                     adapter="default")}, tmp_path / "relight.ckpt")
    specs = [LoraSpec(str(tmp_path / "distill.safetensors"), 1.2), LoraSpec(str(tmp_path / "relight.ckpt"), 0.8)]
    both = copy.deepcopy(base)
    with caplog.at_level(logging.INFO, logger="wan_trt.lora"):
        reports = merge_loras(both, specs)
    assert [r.spec for r in reports] == specs
    assert [(r.pairs, r.weight_deltas, r.bias_deltas, r.modulation_deltas) for r in reports] == \
        [tuple(_counts(distill).values()), tuple(_counts(relight).values())]
    assert [line for line in caplog.messages if line.startswith("merged LoRA")] == [
        f"merged LoRA {spec.path} (scale {spec.scale:g}): {report.summary()}" for spec, report in zip(specs, reports)]
    first, second = expected_changes(distill, 1.2), expected_changes(relight, 0.8)
    want = {k: first.get(k, 0) + second.get(k, 0) for k in first.keys() | second.keys()}
    params, base_params = dict(both.named_parameters()), dict(base.named_parameters())
    for target, change in want.items():
        assert torch.allclose(params[target], base_params[target] + change, rtol=1e-6, atol=1e-6), target
    reverse = copy.deepcopy(base)
    merge_loras(reverse, specs[::-1])
    one_by_one = _merged(base, (load_file(str(tmp_path / "distill.safetensors")), 1.2),
                         (torch.load(tmp_path / "relight.ckpt")["state_dict"], 0.8))
    for other in (reverse, one_by_one):
        for name, value in other.state_dict().items():
            assert torch.allclose(value, both.state_dict()[name], rtol=1e-6, atol=1e-7), name


def test_diffusers_wan_lora_conversion_agrees_but_drops_norm_and_modulation_deltas(base, tmp_path):
    """diffusers' ``WanAnimatePipeline.lora_state_dict`` (the conversion ``load_lora_weights`` runs) on a
    Kijai-layout file, merged as PEFT merges it (W += s·B@A, alpha folded into A/B; b += s·lora_B.bias),
    gives our weights on every parameter it converts; it drops the norms' .diff/.diff_b and the diff_m
    modulation deltas, which we add (as LightX2V and ComfyUI do). (PEFT is not installed here, so
    ``load_lora_weights`` itself cannot run.) Only what its converter reads is in the file: no Conv pair,
    no alpha on the embeddings' pairs."""
    from diffusers import WanAnimatePipeline

    scale = 0.6
    items = lora_items(base, rank=4, seed=5, convs=False, top_alpha=False)
    path = tmp_path / "kijai.safetensors"
    save_file(render(items, prefix="diffusion_model."), str(path))
    converted = WanAnimatePipeline.lora_state_dict(load_file(str(path)))

    theirs = copy.deepcopy(base)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in converted.items():
            module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
            assert kind in ("A.weight", "B.weight", "B.bias"), key
            if kind == "A.weight":
                up = converted[f"transformer.{module}.lora_B.weight"]
                params[f"{module}.weight"] += scale * (up @ value)
            elif kind == "B.bias":
                params[f"{module}.bias"] += scale * value
    ours = copy.deepcopy(base)
    merge_lora(ours, path, scale)

    ours_params, base_params = dict(ours.named_parameters()), dict(base.named_parameters())
    norms = {f"blocks.{i}.{name}" for i in range(len(base.blocks)) for name, _ in BLOCK_NORMS} | dict(TOP_NORMS).keys()
    dropped = {item.target for item in items if item.kind == "modulation" or item.original in norms}
    assert len(dropped) == len(base.blocks) * (6 + 1 + 1) + 2 * 2 + 1  # per block: 6 norm weights, norm3 bias, table
    for name, value in params.items():
        if name in dropped:
            assert torch.equal(value, base_params[name]), name  # diffusers leaves it
            assert not torch.equal(ours_params[name], base_params[name]), name  # we add the delta
        else:
            assert torch.allclose(value, ours_params[name], rtol=1e-5, atol=1e-6), name


# -------------------------------------------------------------------------------- refusals


def test_keys_for_another_model_are_refused_or_with_warn_skipped(base, caplog):
    items = lora_items(base, rank=4, seed=6, norms=False, modulation=False, head=False, convs=False)
    foreign = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 24),  # a Flux LoRA's
               "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(72, 4),
               "face_adapter.fuser_blocks.0.linear1_kv.lora_down.weight": torch.zeros(4, 24),  # fused K/V: no layer
               "face_adapter.fuser_blocks.0.linear1_kv.lora_up.weight": torch.zeros(48, 4),
               "blocks.0.self_attn.norm_q.lora_down.weight": torch.zeros(4, 24),  # a norm is not a Linear
               "blocks.0.self_attn.norm_q.lora_up.weight": torch.zeros(24, 4),
               "blocks.3.cross_attn.dora_scale": torch.zeros(1, 24), "blocks.3.diff_x": torch.zeros(3)}
    state = {**render(items, prefix="diffusion_model."), **foreign}
    model = copy.deepcopy(base)
    with pytest.raises(BadInputError) as error:
        merge_lora(model, state, 1.0)
    message = str(error.value)
    assert "\n" not in message and f"8 of its {len(state)} keys map to no parameter" in message
    assert "'double_blocks.0.img_attn.qkv.lora_A.weight'" in message and "--lora-unmatched warn" in message
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())  # nothing half-applied

    with caplog.at_level(logging.WARNING, logger="wan_trt.lora"):
        report = merge_lora(model, state, 1.0, unmatched="warn")
    assert sorted(report.ignored) == sorted(foreign) and report.pairs == _counts(items)["pair"]
    assert any("8 keys map to no parameter of the DiT and were ignored" in m for m in caplog.messages)
    assert report.to_json()["ignored_keys"] == 8 and report.to_json()["unmatched"] == "warn"


def _bad_lora(kind: str, base: torch.nn.Module, folder: Path) -> tuple[Path, str]:
    """A broken LoRA file and a fragment its error line must contain."""
    items = lora_items(base, rank=4, seed=7, norms=False, modulation=False, head=False, convs=False)
    state = render(items, prefix="diffusion_model.")
    path = folder / f"{kind}.safetensors"
    if kind == "shapes":  # a LoRA of another model size (Wan 1.3B: same names, other widths)
        state["diffusion_model.blocks.2.ffn.0.lora_down.weight"] = torch.zeros(4, 40)
        fragment = "does not fit 'blocks.2.ffn.net.0.proj.weight'"
    elif kind == "other_model":  # an SDXL LoRA
        state = {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{p}.weight": torch.zeros(4, 4) for p in ("down", "up")}
        fragment = "2 of its 2 keys map to no parameter"
    elif kind == "nan":
        state["diffusion_model.blocks.5.cross_attn.k_img.lora_up.weight"][3, 1] = float("nan")
        fragment = "'diffusion_model.blocks.5.cross_attn.k_img.lora_up.weight' holds NaN"
    elif kind == "two_adapters":
        state = render(items, prefix="base_model.model.", pair_names=("lora_A", "lora_B"), adapter="default")
        state.update(render(items[:2], prefix="base_model.model.", pair_names=("lora_A", "lora_B"), adapter="relight"))
        fragment = "2 adapters (default, relight)"
    elif kind == "half_pair":
        del state["diffusion_model.blocks.1.self_attn.o.lora_up.weight"]
        fragment = "has no up weight"
    else:
        raise ValueError(kind)
    save_file({key: value.contiguous().clone() for key, value in state.items()}, str(path))
    return path, fragment


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        found.update({os.path.join(dirpath, name): (0, 0) for name in dirnames})
        for name in filenames:
            stat = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("kind", ["shapes", "other_model", "nan", "two_adapters", "half_pair"])
def test_a_bad_lora_file_is_one_line_exit_2_and_nothing_written(kind, base, tmp_path):
    """Refused by the pre-flight (the preset's DiT on meta) before any weight is loaded or file written."""
    good = tmp_path / "good.safetensors"
    save_file(render(lora_items(base, rank=4, seed=8), prefix="diffusion_model."), str(good))
    bad, fragment = _bad_lora(kind, base, tmp_path)
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["build", "--lora", f"{good}:0.5", "--lora", str(bad), "--out",
                                       str(tmp_path / "engines"), "--no-verify"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and f"--lora {bad}" in errors[0] and fragment in errors[0], result.stderr
    assert "Traceback" not in result.output and _tree(tmp_path) == before


def test_lora_unmatched_needs_a_lora(tmp_path):
    result = CliRunner().invoke(main, ["build", "--lora-unmatched", "warn", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--lora-unmatched warn applies to --lora" in result.stderr
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------- manifest, torch backend


def test_manifest_records_each_lora_and_the_torch_backend_rebuilds_their_weights(base, tmp_path, caplog):
    """build --backend torch with two LoRAs: the manifest lists both in order with what each changed, the build
    log says it, the torch backend rebuilds the same weights (hash-checked) and the rebuild command repeats them.
    A manifest written before several LoRAs (one ``lora`` record) still reads and rebuilds."""
    from wan_trt.runtime.loading import reference_graph_modules
    from wan_trt.runtime.manifest import build_command, read_manifest

    distill, relight = lora_items(base, rank=8, seed=9), lora_items(base, rank=4, seed=10, norms=False)
    save_file(render(distill, prefix="diffusion_model."), str(tmp_path / "distill.safetensors"))
    save_file(render(relight, pair_names=("lora_A", "lora_B")), str(tmp_path / "relight.safetensors"))
    out = tmp_path / "engines"
    with caplog.at_level(logging.INFO, logger="wan_trt.lora"):
        result = CliRunner().invoke(main, ["build", "--backend", "torch", "--lora", str(tmp_path / "distill.safetensors"),
                                           "--lora", f"{tmp_path / 'relight.safetensors'}:0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert [(Path(r["file"]).name, r["scale"], r["pairs"], r["weight_deltas"], r["bias_deltas"],
             r["modulation_deltas"], r["ignored_keys"]) for r in manifest.loras] == [
        ("distill.safetensors", 1.0, *_counts(distill).values(), 0), ("relight.safetensors", 0.5, *_counts(relight).values(), 0)]
    assert any(m.startswith(f"merged LoRA {tmp_path / 'distill.safetensors'} (scale 1): {_counts(distill)['pair']} "
                            "low-rank pairs") for m in caplog.messages)
    reference_graph_modules(manifest, out)  # raises unless the rebuilt weights hash as the engines' do
    command = build_command(manifest, out, "onnxruntime", "X")
    files = [(tmp_path / name).resolve() for name in ("distill.safetensors", "relight.safetensors")]
    assert f"--lora {files[0]}:1 --lora {files[1]}:0.5" in command and "--lora-unmatched" not in command

    single = tmp_path / "single"
    result = CliRunner().invoke(main, ["build", "--backend", "torch", "--lora",
                                       f"{tmp_path / 'relight.safetensors'}:0.5", "--out", str(single)])
    assert result.exit_code == 0, result.output
    data = json.loads((single / "manifest.json").read_text())
    data["lora"] = {"file": data["loras"][0]["file"], "scale": 0.5}  # as format 2 wrote it before
    del data["loras"]
    (single / "manifest.json").write_text(json.dumps(data))
    old = read_manifest(single)
    assert old.loras == [{"file": str((tmp_path / "relight.safetensors").resolve()), "scale": 0.5}]
    reference_graph_modules(old, single)
    data["lora"] = None
    (single / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(single).loras == []



# ------------------------------------------------------------------------------ FP8 with a LoRA


@pytest.mark.slow
def test_fp8_with_a_distillation_lora_calibrates_the_merged_weights_on_the_recipe_s_schedule(base, tmp_path):
    """Issue 22, item 5, as a user runs it: engines with a 4-step distillation LoRA merged, calibrated with
    ``--recipe lightx2v-4step``: the cache carries the merged weights' hash and Euler 4 steps; FP8 engines build
    from it with the same LoRA and run the recipe; without the LoRA (other weights) the cache is refused, and a
    run on another schedule is refused, each in one line."""
    from wan_trt.calibration.cache import load_cache
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.runtime.manifest import read_manifest
    from wan_trt.runtime.samplers import Sampling

    lora = tmp_path / "lightx2v_4step_rank8.safetensors"
    save_file(render(lora_items(base, rank=8, seed=12), prefix="diffusion_model."), str(lora))
    inputs = make_demo_inputs(tmp_path / "inputs", num_frames=9)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, list(args))

    merged = tmp_path / "engines"
    assert run("build", "--backend", "torch", "--lora", str(lora), "--out", str(merged)).exit_code == 0
    cache_path = tmp_path / "calib.json"
    result = run("calibrate", "--engines", str(merged), "--data", str(inputs), "--recipe", "lightx2v-4step",
                 "--segment-frames", "9", "--out", str(cache_path))
    assert result.exit_code == 0, result.output
    cache = load_cache(cache_path)
    assert cache.weights_hash == read_manifest(merged).weights_hash
    assert cache.sampling["options"] == Sampling("euler", 4, 5.0).describe() == "--sampler euler --steps 4 --shift 5"

    fp8 = tmp_path / "engines-fp8"
    result = run("build", "--backend", "torch", "--lora", str(lora), "--precision", "fp8", "--calibration",
                 str(cache_path), "--out", str(fp8))
    assert result.exit_code == 0, result.output
    result = run("infer", "--engines", str(fp8), "--input", str(inputs), "--recipe", "lightx2v-4step",
                 "--backend", "torch", "--out", str(tmp_path / "four-steps.mp4"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "four-steps.mp4").stat().st_size > 0

    refused = run("build", "--backend", "torch", "--precision", "fp8", "--calibration", str(cache_path),
                  "--out", str(tmp_path / "base-fp8"))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "weights" in errors[0], refused.output
    assert not (tmp_path / "base-fp8").exists()
    refused = run("infer", "--engines", str(fp8), "--input", str(inputs), "--backend", "torch",
                  "--out", str(tmp_path / "twenty-steps.mp4"))
    errors = [line for line in refused.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert refused.exit_code == 2 and len(errors) == 1 and "--sampler euler --steps 4" in errors[0], refused.output
    assert not (tmp_path / "twenty-steps.mp4").exists()

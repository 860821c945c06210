"""Recipes and sampling options: precedence (defaults < recipe < options given), bad values through the real
command line (one line, exit 2, nothing written — before any engines are read, so no build is needed), the
few-step recipes' LoRA check and the calibration cache's schedule record. None of these needs an engines build.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from click.testing import CliRunner

from test_bad_inputs import _snapshot
from wan_trt.calibration.cache import CalibrationCache, load_cache
from wan_trt.cli import main
from wan_trt.errors import BadInputError, EngineError
from wan_trt.presets import get_preset
from wan_trt.runtime.recipes import (
    RECIPES,
    check_recipe_engines,
    manifest_has_distillation_lora,
    manifest_loras,
    resolve,
)
from wan_trt.runtime.manifest import Manifest
from wan_trt.runtime.samplers import Sampling

TINY = get_preset("tiny")


def _manifest(*loras: dict, **changes) -> Manifest:
    fields = dict(preset=TINY, seed=0, weights_hash="w", precision="fp32", tokenizer_file="tokenizer.json",
                  graphs={}, loras=list(loras))
    return Manifest(**{**fields, **changes})


# ------------------------------------------------------------------------------------------- precedence


def test_without_a_recipe_the_defaults_are_unipc_the_preset_s_steps_and_shift_and_no_cfg():
    odd = dataclasses.replace(TINY, steps=7, shift=3.0)
    settings = resolve(preset=odd)
    assert settings.sampling == Sampling("unipc", 7, 3.0) and settings.guidance_scale == 1.0 and settings.recipe is None
    assert resolve(preset=TINY).sampling == resolve("reference", preset=TINY).sampling == Sampling("unipc", 20, 5.0)


@pytest.mark.parametrize(("name", "sampler", "steps", "shift"), [
    ("reference", "unipc", 20, 5.0), ("lightx2v-4step", "euler", 4, 5.0), ("comfy-6step", "euler", 6, 8.0)])
def test_a_recipe_sets_its_sampling_over_the_preset_s(name, sampler, steps, shift):
    settings = resolve(name, preset=dataclasses.replace(TINY, steps=7, shift=3.0))
    assert settings.sampling == Sampling(sampler, steps, shift)
    assert settings.guidance_scale == 1.0 and settings.recipe is RECIPES[name]


@pytest.mark.parametrize(("options", "want"), [
    ({"steps": 8}, Sampling("euler", 8, 8.0)),
    ({"shift": 5.0}, Sampling("euler", 6, 5.0)),
    ({"sampler": "dpmpp"}, Sampling("dpmpp", 6, 8.0)),
    ({"sampler": "unipc", "steps": 3, "shift": 2.5}, Sampling("unipc", 3, 2.5)),
    ({"sigmas": "1,0.5,0"}, Sampling("euler", sigmas=(1.0, 0.5, 0.0))),
])
def test_options_given_override_the_recipe(options, want):
    settings = resolve("comfy-6step", preset=TINY, **options)
    assert settings.sampling == want and settings.recipe is RECIPES["comfy-6step"]


def test_guidance_given_overrides_the_recipe_s():
    assert resolve("lightx2v-4step", guidance_scale=3.0).guidance_scale == 3.0


def test_explicit_sigmas_replace_steps_and_shift():
    sampling = resolve(sigmas="1,0.9375,0.8333,0.625,0").sampling
    assert sampling.steps == 4 and sampling.shift is None and sampling.sigmas == (1.0, 0.9375, 0.8333, 0.625, 0.0)
    assert sampling.make().sigmas[2].item() == pytest.approx(0.8333)
    assert sampling.describe() == "--sampler unipc --sigmas 1,0.9375,0.8333,0.625,0"


def test_the_lightx2v_recipe_runs_the_distillation_schedule():
    scheduler = resolve("lightx2v-4step").sampling.make()
    assert scheduler.timesteps.tolist() == [1000.0, 937.5, pytest.approx(833.3333, abs=1e-4), 625.0]


def test_cli_options_reach_inference_unresolved(tmp_path, monkeypatch):
    """The CLI passes what was given (None otherwise): the recipe's values are filled in by resolve(), after the
    manifest (the preset's defaults) is read."""
    import wan_trt.inference

    captured = []
    monkeypatch.setattr(wan_trt.inference, "run_inference", lambda options: captured.append(options))
    base = ["infer", "--engines", str(tmp_path / "e"), "--input", str(tmp_path), "--out", str(tmp_path / "o.mp4")]
    result = CliRunner().invoke(main, [*base, "--recipe", "comfy-6step", "--steps", "8", "--sampler", "dpmpp"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    given, default = captured
    assert (given.recipe, given.steps, given.sampler, given.shift, given.sigmas, given.guidance_scale) == \
        ("comfy-6step", 8, "dpmpp", None, None, None)
    assert (default.recipe, default.steps, default.sampler, default.guidance_scale) == (None, None, None, None)


def test_calibrate_options_reach_the_calibration(tmp_path, monkeypatch):
    import wan_trt.calibration.collect
    import wan_trt.preflight

    captured = {}
    monkeypatch.setattr(wan_trt.preflight, "check_calibrate", lambda *args: None)
    monkeypatch.setattr("wan_trt.runtime.manifest.read_manifest", lambda directory: None)
    monkeypatch.setattr(wan_trt.calibration.collect, "run_calibration",
                        lambda *args, **kwargs: captured.update(kwargs))
    result = CliRunner().invoke(main, ["calibrate", "--engines", str(tmp_path), "--data", str(tmp_path), "--out",
                                       str(tmp_path / "c.json"), "--recipe", "lightx2v-4step", "--shift", "3"])
    assert result.exit_code == 0, result.output
    assert {k: captured[k] for k in ("recipe", "sampler", "steps", "shift", "sigmas", "guidance_scale")} == \
        {"recipe": "lightx2v-4step", "sampler": None, "steps": None, "shift": 3.0, "sigmas": None,
         "guidance_scale": None}


# ------------------------------------------------------------------------------------------- bad values

BAD = {
    "unknown sampler": (["--sampler", "heun"], "heun"),
    "unknown recipe": (["--recipe", "turbo"], "turbo"),
    "steps 0": (["--steps", "0"], "--steps"),
    "shift 0": (["--shift", "0"], "--shift"),
    "shift negative": (["--shift", "-1"], "--shift"),
    "shift nan": (["--shift", "nan"], "--shift"),
    "shift inf": (["--shift", "inf"], "--shift"),
    "sigmas rising": (["--sigmas", "1,0.5,0.7,0"], "0.5 is followed by 0.7"),
    "sigmas repeated": (["--sigmas", "1,0.5,0.5,0"], "--sigmas 1,0.5,0.5,0"),
    "sigmas not ending at 0": (["--sigmas", "1,0.5,0.1"], "the last sigma must be 0"),
    "sigmas above 1": (["--sigmas", "1.5,0.5,0"], "1.5 is outside [0, 1]"),
    "sigmas below 0": (["--sigmas", "1,-0.5,0"], "-0.5 is outside [0, 1]"),
    "sigmas nan": (["--sigmas", "1,nan,0"], "nan"),
    "sigmas one value": (["--sigmas", "0"], "at least two"),
    "sigmas not numbers": (["--sigmas", "1,half,0"], "1,half,0"),
    "sigmas with steps": (["--sigmas", "1,0.5,0", "--steps", "4"], "--steps"),
    "sigmas with shift": (["--sigmas", "1,0.5,0", "--shift", "3"], "--shift"),
}


@pytest.mark.parametrize("command", ["infer", "calibrate"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_sampling_value_is_one_line_exit_2_and_nothing_written(command, case, tmp_path):
    args, named = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    out = work / ("video.mp4" if command == "infer" else "calib.json")
    engines = work / "engines-not-there"  # never read: the values are refused first
    argv = [command, "--engines", str(engines), "--out", str(out), *args]
    argv += ["--input", str(work)] if command == "infer" else ["--data", str(work)]
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, argv)
    errors = [line for line in result.stderr.splitlines() if line.startswith("wan-trt: error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and named in errors[0], result.stderr
    assert "Traceback" not in result.output and not result.stdout.strip()
    assert _snapshot(tmp_path) == before and not out.exists()


# ------------------------------------------------------------------------------------------- LoRAs


@pytest.mark.parametrize(("file", "distilled"), [
    ("/m/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", True),
    ("/m/wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", True),
    ("/m/Wan2.2-Lightning_I2V-A14B-4steps-lora_HIGH_fp16.safetensors", True),
    ("/m/relighting_lora.ckpt", False),
    ("/m/WanAnimate_relight_lora_fp16.safetensors", False),
])
def test_distillation_loras_are_told_by_their_file_name(file, distilled):
    manifest = _manifest({"file": file, "scale": 1.0})
    assert manifest_has_distillation_lora(manifest) is distilled
    assert manifest_loras(manifest) == [f"{file} (scale 1, {'step distillation' if distilled else 'other'})"]


def test_no_lora_means_no_distillation_lora():
    assert not manifest_has_distillation_lora(_manifest()) and manifest_loras(_manifest()) == []


def test_a_distillation_lora_beside_a_relighting_lora_counts_and_both_are_listed_in_order():
    distill = {"file": "/m/lightx2v_4step.safetensors", "scale": 1.0}
    relight = {"file": "/m/relighting_lora.ckpt", "scale": 0.5}
    manifest = _manifest(relight, distill)
    assert manifest_has_distillation_lora(manifest)
    assert manifest_loras(manifest) == ["/m/relighting_lora.ckpt (scale 0.5, other)",
                                        "/m/lightx2v_4step.safetensors (scale 1, step distillation)"]


@pytest.mark.parametrize("lora", [None, {"file": "/m/relighting_lora.ckpt", "scale": 1.0}])
@pytest.mark.parametrize("recipe", ["lightx2v-4step", "comfy-6step"])
def test_a_few_step_recipe_is_refused_on_engines_without_a_distillation_lora(tmp_path, recipe, lora):
    engines = tmp_path / "engines"
    with pytest.raises(EngineError) as error:
        check_recipe_engines(resolve(recipe), _manifest(*([lora] if lora else [])), engines, "onnxruntime")
    message = str(error.value)
    assert f"--recipe {recipe} needs a step-distillation LoRA" in message
    assert ("relighting_lora.ckpt" in message) == (lora is not None)
    kept = " --lora /m/relighting_lora.ckpt:1" if lora else ""  # the engines' own LoRAs stay, after the distillation
    assert ("wan-trt build --preset tiny --lora lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors:1"
            f"{kept} --backend onnxruntime --out {engines}-{recipe}") in message


def test_the_reference_recipe_and_explicit_options_need_no_lora(tmp_path):
    for settings in (resolve("reference"), resolve(sampler="euler", steps=4), resolve()):
        check_recipe_engines(settings, _manifest(), tmp_path, "onnxruntime")
    distilled = _manifest({"file": "/m/lightx2v_4step.safetensors", "scale": 1.0})
    check_recipe_engines(resolve("lightx2v-4step"), distilled, tmp_path, "onnxruntime")


# ------------------------------------------------------------------------------------------- calibration cache


def _cache(sampling: Sampling | None) -> CalibrationCache:
    return CalibrationCache(weights_hash="w", preset="tiny", method="max", samples=["a"],
                            steps=sampling.steps if sampling else 20, sampling=sampling.to_json() if sampling else None)


def test_the_cache_records_the_schedule_and_reads_it_back(tmp_path):
    sampling = Sampling("euler", 4, 5.0)
    _cache(sampling).save(tmp_path / "c.json")
    record = load_cache(tmp_path / "c.json").sampling
    assert record["sampler"] == "euler" and record["steps"] == 4 and record["shift"] == 5.0
    assert record["sigmas"] == [1.0, 0.9375, pytest.approx(5 / 6), 0.625, 0.0]
    assert record["options"] == "--sampler euler --steps 4 --shift 5"


def test_a_cache_for_another_schedule_is_refused_and_the_same_schedule_passes(tmp_path):
    cache = _cache(Sampling("euler", 4, 5.0))
    cache.check_schedule(Sampling("euler", 4, 5.0), tmp_path / "c.json")
    cache.check_schedule(Sampling("euler", sigmas=(1.0, 0.9375, 5 / 6, 0.625, 0.0)), tmp_path / "c.json")
    for other in (Sampling("euler", 6, 8.0), Sampling("unipc", 4, 5.0), Sampling("euler", 4, 3.0)):
        with pytest.raises(BadInputError) as error:
            cache.check_schedule(other, tmp_path / "c.json")
        assert "was made for --sampler euler --steps 4 --shift 5" in str(error.value)
        assert f"this run asks for {other.describe()}" in str(error.value)


def test_a_cache_without_a_schedule_record_is_accepted_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _cache(None).check_schedule(Sampling(), tmp_path / "old.json")
    assert "made before caches recorded their schedule" in caplog.text and "old.json" in caplog.text


def test_infer_checks_the_engines_cache_against_the_run_s_schedule(tmp_path):
    from wan_trt.inference import _check_calibrated_schedule

    _cache(Sampling()).save(tmp_path / "calibration.json")
    manifest = _manifest(quantization={"calibration_file": "calibration.json"}, precision="fp8")
    _check_calibrated_schedule(tmp_path, manifest, Sampling())
    with pytest.raises(BadInputError, match="calibrate with --sampler euler --steps 4 --shift 5"):
        _check_calibrated_schedule(tmp_path, manifest, resolve("lightx2v-4step").sampling)
    _check_calibrated_schedule(tmp_path, _manifest(), resolve("lightx2v-4step").sampling)  # unquantized: no cache

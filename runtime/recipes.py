"""Recipes: named sets of sampling defaults (``--recipe``) that explicit options override.

A recipe fixes the sampler, steps, shift and guidance scale of a way people run Wan-Animate
(sources in ``docs/cli.md``, gathered in ``shared/reference/recipes.md``). Precedence, lowest first:
the built-in defaults (UniPC, the preset's steps and shift, guidance 1), the recipe, the options given.
A few-step recipe needs a step-distillation LoRA merged into the engines; engines without one are
refused with the build command (:func:`check_recipe_engines`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from wan_trt.errors import BadInputError, EngineError
from wan_trt.presets import Preset
from wan_trt.runtime.manifest import Manifest, build_command
from wan_trt.runtime.samplers import DEFAULT_SAMPLER, Sampling

#: Parts of a LoRA file name that mark a step/CFG-distillation LoRA (case-insensitive), e.g.
#: ``lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16``, ``wan2.1_i2v_lora_rank64_lightx2v_4step``,
#: ``Wan2.2-Lightning_…-4steps-lora``. The relighting LoRAs (``relighting_lora.ckpt``,
#: ``WanAnimate_relight_lora_fp16``) have none. The file name is all the manifest's LoRA record tells.
DISTILLATION_MARKERS = ("lightx2v", "distill", "step", "cfg", "lightning")
#: The LoRA the few-step recipes name in their refusal (Kijai's repack, as in ComfyUI's template).
DISTILLATION_LORA = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"


@dataclass(frozen=True)
class Recipe:
    name: str
    sampler: str
    steps: int
    shift: float
    guidance_scale: float
    needs_distillation_lora: bool
    source: str


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("reference", "unipc", 20, 5.0, 1.0, False,
           "official Wan2.2 Animate: Wan-Video/Wan2.2 wan/configs/wan_animate_14B.py, generate.py"),
    Recipe("lightx2v-4step", "euler", 4, 5.0, 1.0, True,
           "LightX2V step distillation: ModelTC/LightX2V lightx2v/models/schedulers/wan/step_distill/scheduler.py"),
    Recipe("comfy-6step", "euler", 6, 8.0, 1.0, True,
           "ComfyUI's Wan-Animate template: Comfy-Org/workflow_templates templates/video_wan2_2_14B_animate.json"),
)}


@dataclass(frozen=True)
class Settings:
    """What a run uses once the recipe and the options are resolved."""

    sampling: Sampling
    guidance_scale: float
    recipe: Recipe | None


def parse_sigmas(text: str) -> tuple[float, ...]:
    """``--sigmas 1,0.9375,0.8333,0.625,0`` → floats (the schedule itself is checked by :class:`Sampling`)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise BadInputError(f"--sigmas {text!r}: give comma-separated numbers from 1 down to 0, "
                            "e.g. 1,0.9375,0.8333,0.625,0") from None


def resolve(recipe: str | None = None, *, sampler: str | None = None, steps: int | None = None,
            shift: float | None = None, sigmas: str | None = None, guidance_scale: float | None = None,
            preset: Preset | None = None) -> Settings:
    """The sampling and guidance of a run: the options given (not None) over the recipe over the defaults
    (UniPC, ``preset``'s steps and shift — :class:`Sampling`'s when None —, guidance 1).

    ``--sigmas`` replaces the steps and shift (a recipe's too); given together with ``--steps`` or ``--shift``
    it is bad input, as is an unknown recipe or a bad value (one line naming it and the fix).
    """
    chosen = None
    if recipe is not None:
        chosen = RECIPES.get(recipe)
        if chosen is None:
            raise BadInputError(f"--recipe {recipe!r} is unknown: use one of {', '.join(RECIPES)}")
    if sigmas is not None and (steps is not None or shift is not None):
        given = " and ".join(o for o, v in (("--steps", steps), ("--shift", shift)) if v is not None)
        raise BadInputError(f"--sigmas gives the whole schedule, so {given} cannot apply: drop one of them")
    sampler = sampler or (chosen.sampler if chosen else DEFAULT_SAMPLER)
    if sigmas is not None:
        sampling = Sampling(sampler=sampler, sigmas=parse_sigmas(sigmas))
    else:
        default = chosen or preset or Sampling()
        sampling = Sampling(sampler=sampler, steps=steps if steps is not None else default.steps,
                            shift=shift if shift is not None else default.shift)
    if guidance_scale is None:
        guidance_scale = chosen.guidance_scale if chosen else 1.0
    return Settings(sampling, guidance_scale, chosen)


def is_distillation_lora(file: str) -> bool:
    name = Path(file).name.lower()
    return any(marker in name for marker in DISTILLATION_MARKERS)


def manifest_has_distillation_lora(manifest: Manifest) -> bool:
    """Whether the engines carry a step-distillation LoRA (by the file names in the manifest's LoRA records)."""
    return any(is_distillation_lora(record["file"]) for record in manifest.loras)


def manifest_loras(manifest: Manifest) -> list[str]:
    """The LoRAs merged into the engines, in merge order, as ``file (scale S, kind)`` lines for ``inspect``."""
    return [f"{record['file']} (scale {record['scale']:g}, "
            f"{'step distillation' if is_distillation_lora(record['file']) else 'other'})" for record in manifest.loras]


def check_recipe_engines(settings: Settings, manifest: Manifest, directory: Path, backend: str) -> None:
    """EngineError naming the build command when a few-step recipe meets engines without a distillation LoRA."""
    recipe = settings.recipe
    if recipe is None or not recipe.needs_distillation_lora or manifest_has_distillation_lora(manifest):
        return
    names = ", ".join(Path(record["file"]).name for record in manifest.loras)
    merged = f"only the LoRAs {names}" if manifest.loras else "no LoRA"
    distilled = dataclasses.replace(manifest, loras=[{"file": DISTILLATION_LORA, "scale": 1.0}, *manifest.loras])
    raise EngineError(f"--recipe {recipe.name} needs a step-distillation LoRA merged into the engines, and "
                      f"'{directory}' has {merged}: build them with: "
                      f"{build_command(distilled, directory, backend, f'{directory}-{recipe.name}')}")

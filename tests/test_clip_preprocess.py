"""The selectable CLIP input convention (runtime/conditioning.py): "original" (the official Wan code,
the default and unchanged) and "diffusers" (WanAnimatePipeline's CLIPImageProcessor on the raw photo),
through GenerationRequest.clip_preprocess and ``wan-trt infer --clip-preprocess``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from conftest import diffusers_animate_pipeline, fresh_reference_models
from wan_trt.errors import BadInputError
from wan_trt.metrics import relative_l2
from wan_trt.presets import CLIP_MEAN, CLIP_STD, DEFAULT_PROMPT
from wan_trt.runtime import conditioning as cond
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest

# Photo sizes (H, W): landscape, portrait, smaller than 224 (upsampled), odd sizes, already 224².
SHAPES = [(300, 451), (517, 233), (100, 180), (61, 37), (224, 224), (225, 383)]


def _photo(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _checkpoint_image_processor():
    """The Wan-Animate diffusers checkpoint's ``image_processor``: CLIPImageProcessor as saved from
    laion/CLIP-ViT-H-14 (shortest edge 224, bicubic, centre crop 224², 1/255, OpenAI CLIP mean/std),
    on its PIL backend (transformers < 5's CLIPImageProcessor; ≥ 5 without torchvision falls back to it)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                     do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


@pytest.mark.parametrize("index,shape", list(enumerate(SHAPES)))
def test_diffusers_option_equals_clip_image_processor(index, shape):
    photo = _photo(shape, seed=index)
    want = _checkpoint_image_processor()(images=Image.fromarray(photo), return_tensors="pt")["pixel_values"]
    got = cond.clip_input("diffusers", photo, cond.to_unit_range(photo))
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    max_abs, rel = (got - want).abs().max().item(), relative_l2(got, want)
    print(f"{shape}: diffusers option vs CLIPImageProcessor max-abs {max_abs:.3e} rel-L2 {rel:.3e}")
    assert max_abs <= 2e-2 and rel <= 1e-2


def _frozen_original(ref_pixels: torch.Tensor) -> torch.Tensor:
    """clip_pixels as it was before the option existed (letter-boxed photo squashed to 224², bicubic)."""
    image = F.interpolate(ref_pixels[:, :, 0], size=(224, 224), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (image * 0.5 + 0.5 - mean) / std


class _ClipEngine:
    """The image_encoder graph in eager torch (penultimate hidden state), recording what it is fed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.fed = model, []

    def run(self, feeds: dict) -> dict:
        self.fed.append(feeds["clip_pixels"])
        with torch.no_grad():
            hidden = self.model(pixel_values=feeds["clip_pixels"], output_hidden_states=True).hidden_states
        return {"image_embeds": hidden[-2]}


@pytest.mark.parametrize("shape", [(40, 70), (90, 50)])
def test_original_option_unchanged(preset, shape):
    photo = _photo(shape, seed=7)
    ref_pixels = cond.to_unit_range(cond.letterbox(photo, 48, 64))
    want = _frozen_original(ref_pixels)
    assert torch.equal(cond.clip_pixels(ref_pixels), want)
    assert torch.equal(cond.clip_input("original", photo, ref_pixels), want)
    engine = _ClipEngine(fresh_reference_models().image_encoder)
    AnimatePipeline({"image_encoder": engine}, preset, tokenize=None).encode_image(ref_pixels)  # the default
    assert torch.equal(engine.fed[0], want)
    assert GenerationRequest(ref_image=photo, pose_frames=None, face_frames=None).clip_preprocess == "original"


class _Stop(Exception):
    pass


def test_diffusers_option_gives_diffusers_clip_features(preset):
    """diffusers encodes the raw photo (not its letter-boxed copy); our "diffusers" option gives the same
    image embeddings from the same tiny CLIP."""
    models = fresh_reference_models()
    reference = diffusers_animate_pipeline(models, _checkpoint_image_processor())
    photo = _photo((40, 70), seed=3)
    height, width = 48, 64
    seen = []

    def record(image, device=None):
        seen.append(image)
        raise _Stop

    reference.encode_image = record
    face = [Image.fromarray(np.zeros((preset.face_size, preset.face_size, 3), np.uint8))] * 5
    with pytest.raises(_Stop):
        reference(image=Image.fromarray(photo), pose_video=[Image.new("RGB", (width, height))] * 5, face_video=face,
                  prompt=DEFAULT_PROMPT, height=height, width=width, segment_frame_length=5, num_inference_steps=1)
    assert np.array_equal(np.asarray(seen[0]), photo)  # the raw photo, at its own size

    del reference.encode_image
    want = reference.encode_image(Image.fromarray(photo), device=torch.device("cpu"))
    ours = AnimatePipeline({"image_encoder": _ClipEngine(models.image_encoder)}, preset, tokenize=None)
    ref_pixels = cond.to_unit_range(cond.letterbox(photo, height, width))
    got = ours.encode_image(ref_pixels, photo, "diffusers")
    error = relative_l2(got, want)
    print(f"image embeds, diffusers option vs WanAnimatePipeline.encode_image: rel-L2 {error:.2e}")
    assert error <= 1e-6
    assert relative_l2(ours.encode_image(ref_pixels), want) > 1e-2  # the two conventions really differ


class _TextEngine:
    def run(self, feeds: dict) -> dict:
        return {"text_embeds": torch.zeros(1, 8, 4)}


class _StopEngine:
    def __init__(self) -> None:
        self.fed = []

    def run(self, feeds: dict) -> dict:
        self.fed.append(feeds["clip_pixels"])
        raise _Stop


@pytest.mark.parametrize("choice", ["original", "diffusers"])
def test_generate_uses_the_requested_convention(preset, choice):
    photo = _photo((40, 70), seed=5)
    pose = np.zeros((5, 48, 64, 3), np.uint8)
    face = np.zeros((5, preset.face_size, preset.face_size, 3), np.uint8)
    engine = _StopEngine()
    pipeline = AnimatePipeline({"text_encoder": _TextEngine(), "image_encoder": engine}, preset,
                               tokenize=lambda prompt: (np.zeros((1, 8), np.int64), np.ones((1, 8), np.int64)))
    request = GenerationRequest(ref_image=photo, pose_frames=pose, face_frames=face, segment_frames=5,
                                clip_preprocess=choice)
    with pytest.raises(_Stop):
        next(pipeline.generate(request))
    want = cond.clip_input(choice, photo, cond.to_unit_range(cond.letterbox(photo, 48, 64)))
    assert torch.equal(engine.fed[0], want)


def test_unknown_convention_is_refused():
    photo = _photo((40, 70), seed=0)
    with pytest.raises(BadInputError, match="clip_preprocess 'openai'"):
        GenerationRequest(ref_image=photo, pose_frames=None, face_frames=None, clip_preprocess="openai")
    with pytest.raises(BadInputError, match="original, diffusers"):
        cond.clip_input("openai", photo, cond.to_unit_range(photo))


def _infer_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["infer", "--engines", str(tmp_path / "engines"), "--input", str(tmp_path), "--out",
            str(tmp_path / "out.mp4"), *extra]


@pytest.mark.parametrize("choice", [None, "original", "diffusers"])
def test_cli_flag_reaches_the_options(tmp_path, monkeypatch, choice):
    import wan_trt.inference
    from wan_trt.cli import main

    captured = []
    monkeypatch.setattr(wan_trt.inference, "run_inference", lambda options: captured.append(options))
    extra = ("--clip-preprocess", choice) if choice else ()
    result = CliRunner().invoke(main, _infer_args(tmp_path, *extra))
    assert result.exit_code == 0, result.output
    assert captured[0].clip_preprocess == (choice or "original")


def test_cli_refuses_an_unknown_value(tmp_path):
    from wan_trt.cli import infer, main

    result = CliRunner().invoke(main, _infer_args(tmp_path, "--clip-preprocess", "openai"))
    assert result.exit_code == 2
    assert "--clip-preprocess" in result.output and "openai" in result.output
    option = next(p for p in infer.params if p.name == "clip_preprocess")
    assert tuple(option.type.choices) == cond.CLIP_PREPROCESSING


def test_distributed_workers_receive_the_choice(tmp_path):
    import dataclasses

    from wan_trt.inference import InferenceOptions
    from wan_trt.launch import _load_options

    options = InferenceOptions(engines_dir=tmp_path, out_path=tmp_path / "o.mp4", clip_preprocess="diffusers")
    path = tmp_path / "options.json"
    path.write_text(json.dumps(dataclasses.asdict(options), default=str))  # as launch_infer writes it
    assert _load_options(path).clip_preprocess == "diffusers"

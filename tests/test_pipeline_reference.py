"""One segment end to end: our runtime against diffusers' WanAnimatePipeline (same tiny weights,
seed, steps, fp32), and the ONNX Runtime backend against the torch backend.

Convention chosen (docs/conventions.md): CLIP sees the letter-boxed photo squashed to 224²,
as the official Wan code does; diffusers centre-crops the raw photo instead. So the diffusers
pipeline is given our CLIP features (``image_embeds``); everything else it computes itself.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import diffusers_animate_pipeline, fresh_reference_models
from wan_trt.metrics import psnr, relative_l2
from wan_trt.presets import DEFAULT_PROMPT
from wan_trt.runtime import conditioning as cond
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest
from wan_trt.runtime.samplers import Sampling
from wan_trt.tokenizer import build_tiny_tokenizer, tokenize

FRAMES, HEIGHT, WIDTH, STEPS, SEED = 77, 48, 64, 20, 1234


def _driving(preset, seed: int = 0):
    rng = np.random.default_rng(seed)
    # The photo is letter-boxed here once, so both pipelines get it at the pose size: diffusers' own
    # letter-box resamples with Lanczos (see test_letterbox_geometry_equals_diffusers) where ours is bilinear.
    ref = cond.letterbox(rng.integers(0, 256, size=(40, 70, 3), dtype=np.uint8), HEIGHT, WIDTH)
    base = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3)).astype(np.float32)
    pose = np.stack([np.roll(base, 2 * t, axis=1) for t in range(FRAMES)]).astype(np.uint8)
    face_base = rng.integers(0, 256, size=(preset.face_size, preset.face_size, 3)).astype(np.float32)
    face = np.stack([np.clip(face_base + 3 * t, 0, 255) for t in range(FRAMES)]).astype(np.uint8)
    return ref, pose, face


def _pipeline(engines, preset):
    tokenizer = build_tiny_tokenizer()
    return AnimatePipeline(engines, preset, lambda prompt: tokenize(tokenizer, prompt))


@pytest.fixture(scope="module")
def request_(preset):
    ref, pose, face = _driving(preset)
    return GenerationRequest(ref_image=ref, pose_frames=pose, face_frames=face, prompt=DEFAULT_PROMPT, seed=SEED,
                             sampling=Sampling(steps=STEPS), segment_frames=FRAMES)


@pytest.fixture(scope="module")
def torch_result(torch_engines_, preset, request_):
    pipeline = _pipeline(torch_engines_, preset)
    return pipeline, list(pipeline.generate(request_))


def _diffusers_final_latents(pipeline, preset, request, scheduler=None) -> torch.Tensor:
    """diffusers' WanAnimatePipeline on ``request`` (its UniPC, or ``scheduler``), de-normalised as diffusers returns them."""
    from transformers import CLIPImageProcessor

    models = fresh_reference_models()
    reference = diffusers_animate_pipeline(models, CLIPImageProcessor())
    if scheduler is not None:
        reference.scheduler = scheduler
    ref_pixels = cond.to_unit_range(cond.letterbox(request.ref_image, HEIGHT, WIDTH))
    image_embeds = pipeline.encode_image(ref_pixels)
    reference.encode_image = lambda image, device=None: image_embeds  # our CLIP convention (module docstring)
    out = reference(
        image=Image.fromarray(request.ref_image), pose_video=[Image.fromarray(f) for f in request.pose_frames],
        face_video=[Image.fromarray(f) for f in request.face_frames], prompt=DEFAULT_PROMPT,
        height=HEIGHT, width=WIDTH, segment_frame_length=FRAMES,
        num_inference_steps=request.sampling.steps, generator=torch.Generator().manual_seed(SEED), output_type="latent",
    )
    return out.frames


def _our_final_latents(segments, preset) -> torch.Tensor:
    mean = torch.tensor(preset.vae_latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(preset.vae_latents_std).view(1, -1, 1, 1, 1)
    assert len(segments) == 1
    return segments[0].latents * std + mean  # diffusers returns the latents de-normalised for its VAE


def test_final_latents_equal_diffusers_pipeline(torch_result, preset, request_):
    pipeline, segments = torch_result
    want = _diffusers_final_latents(pipeline, preset, request_)
    got = _our_final_latents(segments, preset)
    assert got.shape == want.shape == (1, 16, 21, HEIGHT // 8, WIDTH // 8)
    error = relative_l2(got, want)
    print(f"final latents rel-L2 vs diffusers: {error:.2e}")
    assert error <= 1e-4, f"final latents rel-L2 vs diffusers: {error:.2e}"


def _euler_on_our_spacing(shift: float):
    """diffusers' flow Euler asked for ComfyUI's "simple" spacing (the runtime's Euler spacing) by its sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None: set_timesteps(
        sigmas=[(1000 - int(i * (1000 / n))) / 1000 for i in range(n)], device=device)
    return scheduler


def _dpmpp(shift: float):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       num_train_timesteps=1000, flow_shift=shift)


@pytest.mark.parametrize(("sampling", "make_scheduler"), [
    (Sampling("euler", 4, 5.0), _euler_on_our_spacing), (Sampling("euler", 6, 8.0), _euler_on_our_spacing),
    (Sampling("dpmpp", 6, 5.0), _dpmpp)], ids=["euler-4-shift5", "euler-6-shift8", "dpmpp-6-shift5"])
def test_other_samplers_final_latents_equal_diffusers_pipeline(torch_engines_, preset, request_, sampling,
                                                                make_scheduler):
    """The few-step recipes' schedules (and DPM++) through the whole tiny pipeline against diffusers."""
    request = dataclasses.replace(request_, sampling=sampling)
    pipeline = _pipeline(torch_engines_, preset)
    got = _our_final_latents(list(pipeline.generate(request)), preset)
    want = _diffusers_final_latents(pipeline, preset, request, make_scheduler(sampling.shift))
    error = relative_l2(got, want)
    print(f"{sampling.describe()}: final latents rel-L2 vs diffusers: {error:.2e}")
    assert error <= 1e-4, f"final latents rel-L2 vs diffusers: {error:.2e}"


@pytest.mark.parametrize("size", [(40, 70), (90, 50), (48, 64)])
def test_letterbox_geometry_equals_diffusers(size):
    """Same placement and bars as diffusers' WanAnimateImageProcessor with the bilinear filter its pipeline
    asks for. (diffusers 0.42 drops that ``resample="bilinear"`` argument at config registration and
    resamples with Lanczos; the official code letter-boxes bilinearly, as we do.)"""
    from diffusers.pipelines.wan.image_processor import WanAnimateImageProcessor

    photo = np.random.default_rng(size[0]).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    processor = WanAnimateImageProcessor(vae_scale_factor=8, spatial_patch_size=(2, 2), fill_color=0)
    processor.register_to_config(resample="bilinear")
    want = processor.preprocess(Image.fromarray(photo), height=HEIGHT, width=WIDTH, resize_mode="fill")
    got = cond.to_unit_range(cond.letterbox(photo, HEIGHT, WIDTH))[:, :, 0]
    assert relative_l2(got, want) <= 1e-6


def test_onnxruntime_video_matches_torch_video(torch_result, ort_engines, preset, request_):
    _, torch_segments = torch_result
    ort_segments = list(_pipeline(ort_engines, preset).generate(request_))
    got = np.concatenate([s.frames for s in ort_segments])
    want = np.concatenate([s.frames for s in torch_segments])
    assert got.shape == want.shape == (FRAMES, HEIGHT, WIDTH, 3)
    value = psnr(got, want)
    print(f"video PSNR onnxruntime vs torch: {value:.2f} dB")
    assert value >= 40.0

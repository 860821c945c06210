"""Long videos and every mode against diffusers' WanAnimatePipeline (same tiny weights, seed, fp32):
several segments with 1 or 5 guide frames, animation and replacement, CFG on and off — on the
decoded video. And the same seed twice gives a byte-identical mp4 on ONNX Runtime."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fresh_reference_models
from wan_trt.metrics import relative_l2
from wan_trt.runtime import conditioning as cond
from wan_trt.runtime.pipeline import AnimatePipeline, GenerationRequest
from wan_trt.runtime.samplers import Sampling
from wan_trt.tokenizer import build_tiny_tokenizer, tokenize

FRAMES, SEGMENT, HEIGHT, WIDTH, STEPS, SEED = 30, 13, 32, 48, 4, 99


def _inputs(preset):
    rng = np.random.default_rng(1)
    ref = cond.letterbox(rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8), HEIGHT, WIDTH)
    base = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3)).astype(np.float32)
    pose = np.stack([np.roll(base, t, axis=1) for t in range(FRAMES)]).astype(np.uint8)
    face = np.stack([np.clip(rng.integers(0, 256, size=(preset.face_size, preset.face_size, 3)) * 0.5 + 4 * t, 0, 255)
                     for t in range(FRAMES)]).astype(np.uint8)
    background = np.stack([np.roll(base[::-1], -t, axis=0) for t in range(FRAMES)]).astype(np.uint8)
    mask = np.zeros((FRAMES, HEIGHT, WIDTH), dtype=np.float32)
    for t in range(FRAMES):
        mask[t, 8:28, 10 + t // 3:30 + t // 3] = 1.0
    return ref, pose, face, background, mask


@pytest.mark.parametrize("mode, guide_frames, guidance", [
    ("animate", 1, 1.0), ("animate", 5, 1.0), ("animate", 1, 2.5), ("replace", 1, 1.0), ("replace", 5, 2.5),
])
def test_multi_segment_video_equals_diffusers(mode, guide_frames, guidance, torch_engines_, preset):
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    ref, pose, face, background, mask = _inputs(preset)
    tokenizer = build_tiny_tokenizer()
    ours = AnimatePipeline(torch_engines_, preset, lambda p: tokenize(tokenizer, p))
    request = GenerationRequest(
        ref_image=ref, pose_frames=pose, face_frames=face, seed=SEED, sampling=Sampling(steps=STEPS), segment_frames=SEGMENT,
        guide_frames=guide_frames, guidance_scale=guidance, negative_prompt="",
        background_frames=background if mode == "replace" else None, mask_frames=mask if mode == "replace" else None,
    )
    streamed = []  # what a writer gets chunk by chunk while the VAE decodes
    segments = list(ours.generate(replace(request, on_frames=streamed.append)))
    got = torch.cat([s.pixels for s in segments], dim=2)
    assert got.shape[2] == FRAMES and sum(len(s.frames) for s in segments) == FRAMES
    assert np.array_equal(np.concatenate(streamed), np.concatenate([s.frames for s in segments]))
    assert len(segments) == cond.segment_plan(FRAMES, SEGMENT, guide_frames)[1] >= 3

    models = fresh_reference_models()
    reference = WanAnimatePipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                          unk_token="<unk>"),
        text_encoder=models.text_encoder, vae=models.vae, image_encoder=models.image_encoder,
        transformer=models.transformer, image_processor=CLIPImageProcessor(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=5.0))
    image_embeds = ours.encode_image(cond.to_unit_range(ref))
    reference.encode_image = lambda image, device=None: image_embeds  # our CLIP convention (docs/conventions.md)
    pil = lambda frames: [Image.fromarray(f) for f in frames]  # noqa: E731
    extra = {}
    if mode == "replace":
        masks = (mask[..., None].repeat(3, axis=-1) * 255).astype(np.uint8)
        extra = dict(background_video=pil(background), mask_video=pil(masks))
    out = reference(image=Image.fromarray(ref), pose_video=pil(pose), face_video=pil(face), prompt=request.prompt,
                    height=HEIGHT, width=WIDTH, segment_frame_length=SEGMENT, num_inference_steps=STEPS, mode=mode,
                    prev_segment_conditioning_frames=guide_frames, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(SEED), output_type="np", **extra)
    want = torch.from_numpy(np.asarray(out.frames[0])).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, T, H, W] in [0, 1]
    error = relative_l2(got * 0.5 + 0.5, want)
    print(f"{mode} guide={guide_frames} cfg={guidance}: {len(segments)} segments, video rel-L2 vs diffusers {error:.2e}")
    assert error <= 1e-4


def test_same_seed_gives_byte_identical_mp4(tiny_engines, tmp_path):
    from click.testing import CliRunner

    from wan_trt.cli import main
    from wan_trt.demo_media import make_demo_inputs

    inputs = make_demo_inputs(tmp_path / "in", width=64, height=48, num_frames=17)
    outputs = []
    for name in ("a.mp4", "b.mp4"):
        result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                           "--out", str(tmp_path / name), "--steps", "3", "--segment-frames", "9",
                                           "--seed", "7"])
        assert result.exit_code == 0, result.output
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_default_prompts_come_from_the_build_cache(tiny_engines):
    """The umT5 engine runs only for a custom prompt; the cached embeddings are what it computes."""
    from wan_trt.presets import DEFAULT_PROMPT
    from wan_trt.runtime.loading import open_pipeline

    pipeline, _ = open_pipeline(tiny_engines, "onnxruntime")
    calls = []
    engine = pipeline.engines["text_encoder"]
    original = engine.run
    engine.run = lambda feed: calls.append(1) or original(feed)
    cached = pipeline.encode_prompt(DEFAULT_PROMPT)
    negative = pipeline.encode_prompt("")
    assert calls == []
    pipeline.prompt_cache.clear()
    assert relative_l2(pipeline.encode_prompt(DEFAULT_PROMPT), cached) <= 1e-5
    assert relative_l2(pipeline.encode_prompt(""), negative) <= 1e-5
    assert len(calls) == 2
    pipeline.encode_prompt("a dancer moves")
    assert len(calls) == 3


def test_a_300_frame_input_gives_300_frames_at_the_input_fps(tiny_engines, tmp_path):
    from click.testing import CliRunner

    from wan_trt.cli import main
    from wan_trt.demo_media import make_demo_inputs
    from wan_trt.media import probe_video

    inputs = make_demo_inputs(tmp_path / "in", width=48, height=32, num_frames=300, fps=23.976, face_size=64)
    out = tmp_path / "long.mp4"
    result = CliRunner().invoke(main, ["infer", "--engines", str(tiny_engines), "--input", str(inputs),
                                       "--out", str(out), "--steps", "1", "--guide-frames", "5"])
    assert result.exit_code == 0, result.output
    info = probe_video(out)
    assert info.num_frames == 300 and (info.width, info.height) == (48, 32)
    assert abs(info.fps - 23.976) < 1e-3


@pytest.mark.parametrize("guide_frames", [3, 6])
def test_frames_stream_out_chunk_by_chunk_without_the_overlap(guide_frames, torch_engines_, preset):
    """Guides that end inside a decoded chunk (3) or past the first two (6): each chunk's new frames are given
    as it decodes, the overlap never, and together they are the segments' frames."""
    ref, pose, face, _, _ = _inputs(preset)
    ours = AnimatePipeline(torch_engines_, preset, lambda p: tokenize(build_tiny_tokenizer(), p))
    streamed = []
    request = GenerationRequest(ref_image=ref, pose_frames=pose, face_frames=face, seed=SEED, sampling=Sampling(steps=1),
                                segment_frames=SEGMENT, guide_frames=guide_frames, on_frames=streamed.append)
    decoded = []  # each segment's whole decoded video, to cut here as the pipeline did before streaming
    decode = ours.vae_decode

    def recording_decode(latents):
        chunks = list(decode(latents))
        decoded.append(torch.cat(chunks, dim=2))
        yield from chunks

    ours.vae_decode = recording_decode
    segments = list(ours.generate(request))
    want = torch.cat([decoded[0]] + [video[:, :, guide_frames:] for video in decoded[1:]], dim=2)[:, :, :FRAMES]
    assert len(segments) >= 3 and sum(len(part) for part in streamed) == FRAMES
    assert len(streamed) > len(segments)  # several chunks per segment
    assert np.array_equal(np.concatenate(streamed), cond.to_uint8(want))
    assert torch.equal(torch.cat([s.pixels for s in segments], dim=2), want)
    assert np.array_equal(np.concatenate([s.frames for s in segments]), cond.to_uint8(want))

"""The lean Wan-Animate pipeline: orchestrates engines and the scheduler, never knows how a graph is built.

Per video (once): the prompt's text embeddings, the letter-boxed reference photo's VAE latent and
CLIP features. Per segment: pose latents, the temporal-guidance conditioning latents, motion
vectors of the face crops, one DiT call per denoising step with the chosen sampler's update
(``runtime/samplers.py``), and a streamed VAE decode.
Segments follow the reference pipeline: the driving inputs are padded ping-pong to whole segments,
each later segment is conditioned on the last ``guide_frames`` decoded frames of the previous one,
the overlap is dropped and the result is cut to the input length. The driving frames are asked for
one segment at a time (``frames[indices]``), so a lazy reader keeps memory bounded at any length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from wan_trt.errors import BadInputError
from wan_trt.presets import DEFAULT_PROMPT, Preset
from wan_trt.runtime import conditioning as cond
from wan_trt.runtime.engines import Engine
from wan_trt.runtime.samplers import Sampling
from wan_trt.tokenizer import clean_prompt

log = logging.getLogger(__name__)

MOTION_BATCH = 8  # face crops per motion-encoder call (the reference's default; bounds memory at 512²)


@dataclass
class Segment:
    """One finished segment: its new frames (uint8), the same as floats, and the final latents (for checks)."""

    index: int
    frames: np.ndarray  # [T, H, W, 3] uint8, overlap already dropped
    pixels: torch.Tensor  # [1, 3, T, H, W] in [-1, 1], the same frames before rounding
    latents: torch.Tensor  # [1, 16, F+1, h, w] after the last step


class Frames(Protocol):
    """A frame sequence indexed by a list of frame indices: a numpy array, or a lazy reader
    (:class:`wan_trt.media.VideoReader`, :class:`wan_trt.driving_inputs.MaskFrames`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, indices: Sequence[int]) -> np.ndarray: ...


@dataclass
class GenerationRequest:
    ref_image: np.ndarray  # HxWx3 uint8, any size (letter-boxed to the pose size)
    pose_frames: Frames  # [T, H, W, 3] uint8; its size is the output size
    face_frames: Frames  # [T, S, S, 3] uint8
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    guidance_scale: float = 1.0  # > 1: classifier-free guidance on text and face expression
    background_frames: Frames | None = None  # replacement mode: [T, H, W, 3] uint8 (src_bg.mp4)
    mask_frames: Frames | None = None  # replacement mode: [T, H, W] float in [0, 1], 1 = the person
    seed: int = 0
    sampling: Sampling = field(default_factory=Sampling)  # sampler and schedule (default: UniPC, 20 steps, shift 5)
    segment_frames: int = 77
    guide_frames: int = 1
    clip_preprocess: str = "original"  # CLIP input convention: "original" (official Wan) or "diffusers" (conditioning)
    on_step: Callable[[int, int, int, int], None] | None = field(default=None, repr=False)  # segment, n, step, n
    # each decoded chunk's new frames ([t, H, W, 3] uint8, in order) as soon as the VAE decoder gives them, so that
    # a writer can encode them while the next chunks decode; together they are every segment's ``frames``
    on_frames: Callable[[np.ndarray], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.clip_preprocess not in cond.CLIP_PREPROCESSING:
            raise BadInputError(f"clip_preprocess '{self.clip_preprocess}' is unknown: use one of "
                                f"{', '.join(cond.CLIP_PREPROCESSING)}")


class AnimatePipeline:
    """Runs declared graphs through any backend's engines."""

    def __init__(self, engines: Mapping[str, Engine], preset: Preset, tokenize: Callable[[str], tuple],
                 prompt_cache: Mapping[str, torch.Tensor] | None = None) -> None:
        self.engines, self.preset, self.tokenize = engines, preset, tokenize
        self.prompt_cache = dict(prompt_cache or {})  # cleaned prompt -> text embeddings, made at build time

    # ---- components -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        cached = self.prompt_cache.get(clean_prompt(prompt))
        if cached is not None:
            return cached
        input_ids, mask = self.tokenize(prompt)
        out = self.engines["text_encoder"].run(
            {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)})
        return out["text_embeds"]

    def encode_image(self, ref_pixels: torch.Tensor, ref_image: np.ndarray | None = None,
                     preprocess: str = "original") -> torch.Tensor:
        """CLIP features of the reference: the letter-boxed ``ref_pixels`` (``"original"``) or the raw
        photo ``ref_image`` (``"diffusers"``), see :func:`conditioning.clip_input`."""
        pixels = cond.clip_input(preprocess, ref_image, ref_pixels)
        return self.engines["image_encoder"].run({"clip_pixels": pixels})["image_embeds"]

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 4n+1, H, W]`` in [-1, 1] → normalised latents ``[B, 16, n+1, H/8, W/8]``, chunk by chunk."""
        frames = video.shape[2]
        if (frames - 1) % cond.TEMPORAL_STRIDE:
            raise ValueError(f"VAE encode needs 4n+1 frames, got {frames}")
        out = self.engines["vae_encoder_first"].run({"video": video[:, :, :1]})
        latents = [out.pop("latents")]
        step = self.engines["vae_encoder_step"]
        for start in range(1, frames, cond.TEMPORAL_STRIDE):
            feed, out = {"video": video[:, :, start:start + cond.TEMPORAL_STRIDE], **_as_inputs(step, out)}, None
            out = step.run(feed)
            latents.append(out.pop("latents"))
        return torch.cat(latents, dim=2)

    def vae_decode(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Normalised latents ``[B, 16, F, h, w]`` → pixel chunks in [-1, 1] (1 frame, then 4 per latent)."""
        out = self.engines["vae_decoder_first"].run({"latents": latents[:, :, :1]})
        yield out.pop("video")
        step = self.engines["vae_decoder_step"]
        for index in range(1, latents.shape[2]):
            feed, out = {"latents": latents[:, :, index:index + 1], **_as_inputs(step, out)}, None
            out = step.run(feed)
            yield out.pop("video")

    def motion_vectors(self, face_frames: np.ndarray) -> torch.Tensor:
        """Face crops ``[T, S, S, 3]`` uint8 → ``[1, T, D]``, in batches of MOTION_BATCH."""
        pixels = cond.to_unit_range(face_frames)[0].transpose(0, 1)  # [T, 3, S, S]
        engine = self.engines["motion_encoder"]
        parts = [engine.run({"face_pixels": pixels[i:i + MOTION_BATCH]})["motion_vectors"]
                 for i in range(0, pixels.shape[0], MOTION_BATCH)]
        return torch.cat(parts).unsqueeze(0)

    def velocity(self, latent_input, timestep, text_embeds, image_embeds, pose_latents, motion) -> torch.Tensor:
        return self.engines["transformer"].run({
            "latent_input": latent_input, "timestep": timestep, "text_embeds": text_embeds,
            "image_embeds": image_embeds, "pose_latents": pose_latents, "motion_vectors": motion,
        })["velocity"]

    # ---- generation -------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> Iterator[Segment]:
        """Yield finished segments in order; together they hold exactly ``len(pose_frames)`` frames.

        Each segment reads only its own window of the (ping-pong padded) driving frames.
        """
        num_frames, height, width = request.pose_frames.shape[:3]
        replace = request.background_frames is not None
        face_size = self.preset.face_size
        padded, num_segments = cond.segment_plan(num_frames, request.segment_frames, request.guide_frames)
        order = cond.ping_pong(num_frames, padded)
        stride = request.segment_frames - request.guide_frames
        guidance = request.guidance_scale > 1.0

        text_embeds = self.encode_prompt(request.prompt)
        if guidance:  # one DiT call of batch 2: [conditional, unconditional]
            text_embeds = torch.cat([text_embeds, self.encode_prompt(request.negative_prompt)])
        ref_pixels = cond.to_unit_range(cond.letterbox(request.ref_image, height, width))
        image_embeds = self.encode_image(ref_pixels, request.ref_image, request.clip_preprocess)
        latent_h, latent_w = height // 8, width // 8
        ref_latents = torch.cat([torch.ones(1, 4, 1, latent_h, latent_w), self.vae_encode(ref_pixels)], dim=1)

        blank_motion = None
        if guidance:  # the unconditional branch sees a blank face (all -1): the same for every segment
            blank_face = np.zeros((request.segment_frames, face_size, face_size, 3), dtype=np.uint8)
            blank_motion = self.motion_vectors(blank_face)

        generator = torch.Generator().manual_seed(request.seed)
        latent_frames = (request.segment_frames - 1) // cond.TEMPORAL_STRIDE + 1
        previous: torch.Tensor | None = None  # last decoded pixel frames of the previous segment
        emitted = 0
        for index in range(num_segments):
            start = index * stride
            window = order[start:start + request.segment_frames]
            noise_shape = (1, self.preset.latent_channels, latent_frames + 1, latent_h, latent_w)
            latents = torch.randn(noise_shape, generator=generator, dtype=torch.float32)

            pose_latents = self.vae_encode(cond.to_unit_range(request.pose_frames[window]))
            motion = self.motion_vectors(cond.resize_faces(request.face_frames[window], face_size))
            if guidance:
                motion = torch.cat([motion, blank_motion])
            guides = request.guide_frames if previous is not None else 0
            if replace:
                guide = cond.to_unit_range(request.background_frames[window])
                pixel_mask = cond.replacement_mask(request.mask_frames[window], latent_h, latent_w)
            else:
                guide = torch.zeros(1, 3, request.segment_frames, height, width)
                pixel_mask = torch.zeros(1, 1, request.segment_frames, latent_h, latent_w)
            if previous is not None:
                guide[:, :, :guides] = previous
            pixel_mask[:, :, :guides] = 1.0
            conditioning = torch.cat(
                [ref_latents, torch.cat([cond.pack_mask(pixel_mask), self.vae_encode(guide)], dim=1)], dim=2)

            scheduler = request.sampling.make()  # fresh multistep state for each segment
            timesteps = scheduler.timesteps
            batch = 2 if guidance else 1
            for step, t in enumerate(timesteps):
                latent_input = torch.cat([latents, conditioning], dim=1).expand(batch, -1, -1, -1, -1)
                velocity = self.velocity(latent_input, t.to(torch.float32).expand(batch), text_embeds,
                                         image_embeds.expand(batch, -1, -1), pose_latents.expand(batch, -1, -1, -1, -1),
                                         motion)
                if guidance:
                    conditional, unconditional = velocity.chunk(2)
                    velocity = unconditional + request.guidance_scale * (conditional - unconditional)
                latents = scheduler.step(velocity, t, latents)
                if request.on_step:
                    request.on_step(index, num_segments, step + 1, len(timesteps))

            overlap = 0 if index == 0 else request.guide_frames  # decoded again, already emitted
            pixels, frames = [], []  # the new frames, as floats and as uint8
            tail: torch.Tensor | None = None  # the last decoded frames, which guide the next segment
            for chunk in self.vae_decode(latents[:, :, 1:]):
                tail = (chunk if tail is None else torch.cat((tail, chunk), dim=2))[:, :, -request.guide_frames:]
                new = chunk[:, :, overlap:][:, :, : num_frames - emitted]  # every segment has some (segment_plan)
                overlap, emitted = max(0, overlap - chunk.shape[2]), emitted + new.shape[2]
                if new.shape[2]:
                    pixels.append(new)
                    frames.append(cond.to_uint8(new))
                    if request.on_frames is not None:
                        request.on_frames(frames[-1])
            previous = tail
            yield Segment(index, np.concatenate(frames), torch.cat(pixels, dim=2), latents)


def _as_inputs(engine: Engine, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a streamed graph's ``next_cache_*`` outputs onto its ``cache_*`` inputs. The callers then drop
    ``outputs``: the feed is the caches' only holder, and an engine may take them out of it and free each
    old one as soon as it is replaced (the fast path's VAE)."""
    return {inp: outputs[out] for inp, out in engine.spec.cache_pairs}

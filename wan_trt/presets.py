"""Model presets: the configuration of every Wan-Animate component, in one JSON-serialisable place.

``tiny`` is the full Wan-Animate architecture at small widths (36 input channels, pose patch
embedding, motion encoder, face encoder, a face block after every 5th DiT block, 3-D RoPE, the
causal VAE with temporal down/up-sampling, umT5 and CLIP encoders) with seeded random weights and
an offline tokenizer, so that everything can be built and tested on a CPU in seconds.
``animate-14b`` is the real configuration (17.3 B parameters in the DiT).

This module imports neither torch nor diffusers: the runtime reads presets too.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from wan_trt.errors import BadInputError

DEFAULT_PROMPT = "视频中的人在做动作"  # the official default: "the person in the video is doing actions"
#: The official Wan 2.x negative prompt (``sample_neg_prompt`` in Wan2.2's ``wan/configs/shared_config.py``):
#: garish colours, overexposure, static or blurry frames, subtitles, grey cast, worst/low quality, JPEG
#: artefacts, ugly or incomplete bodies, extra or fused fingers, badly drawn hands and faces, deformed
#: limbs, messy backgrounds, three legs, crowds in the background, walking backwards. The official
#: ``wan/animate.py`` uses it when no negative prompt is given; wan-trt's default stays "" (as diffusers'
#: ``WanAnimatePipeline``). It only matters with classifier-free guidance (``--guidance-scale`` > 1).
OFFICIAL_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
TEXT_TOKENS = 512  # umT5 context, zero-padded; the DiT splits image from text context at len - 512
CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OFFICIAL_FACE_SIZE = 512  # the preprocessed folder format's face crop size


class Component:
    """The checkpoint's components: diffusers sub-folders, preset sections, reference modules. Not graphs
    (``wan_trt.registry``), though three graphs share their component's name."""

    TRANSFORMER = "transformer"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"
    IMAGE_ENCODER = "image_encoder"


@dataclass(frozen=True)
class Preset:
    """Everything needed to build the reference modules and to run them."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    needs_checkpoint: bool
    description: str
    segment_frames: int = 77
    steps: int = 20
    shift: float = 5.0
    buckets: tuple[tuple[int, int], ...] = ((832, 480), (480, 832), (1280, 720), (720, 1280))  # (width, height)
    # How seeded random weights are made: "torch" (the modules' own initialisers under torch.manual_seed,
    # in fp32 on the CPU) or "counter" (wan_trt.random_weights: the same values on any device, generated
    # in place in the inference dtype; for the presets too large for the first).
    random_init: str = "torch"

    @property
    def face_size(self) -> int:
        """Side of the square face crops the motion encoder takes."""
        return int(self.transformer["motion_encoder_size"])

    @property
    def latent_channels(self) -> int:
        return int(self.transformer["latent_channels"])

    @property
    def vae_latents_mean(self) -> list[float]:
        return list(self.vae.get("latents_mean", _WAN21_LATENTS_MEAN))

    @property
    def vae_latents_std(self) -> list[float]:
        return list(self.vae.get("latents_std", _WAN21_LATENTS_STD))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "segment_frames": self.segment_frames,
            "steps": self.steps,
            "shift": self.shift,
            "buckets": [list(b) for b in self.buckets],
        }


# The Wan2.1 VAE's per-channel latent statistics (diffusers' AutoencoderKLWan defaults).
_WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
_WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
]

_TINY = Preset(
    name="tiny",
    description="full Wan-Animate architecture at tiny widths, seeded random weights (CPU tests and the demo)",
    needs_checkpoint=False,
    buckets=((128, 96), (96, 128), (64, 48)),
    transformer=dict(
        patch_size=[1, 2, 2],
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        latent_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=10,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=32,
        added_kv_proj_dim=24,
        rope_max_seq_len=128,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16, "32": 16},
        motion_encoder_size=32,
        motion_style_dim=16,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=5,
        motion_encoder_batch_size=8,
    ),
    vae=dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),
    text_encoder=dict(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    ),
    image_encoder=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=14,
    ),
)

# The tiny architecture at the smallest widths the GPU's FP8 kernels take (head dim 128 for cuDNN's FP8
# attention; every quantized Linear's dims multiples of 16 for torch._scaled_mm): the GPU smoke test of
# `infer --fast` on FP8 engines (benchmarks/infer_fast_smoke.py). Everything else is the tiny preset.
_TINY_GPU = dataclasses.replace(
    _TINY,
    name="tiny-gpu",
    description="the tiny preset with head dim 128 and 16-aligned Linears (FP8 GPU kernels): the GPU smoke test",
    transformer={**_TINY.transformer, "attention_head_dim": 128, "ffn_dim": 512, "added_kv_proj_dim": 256},
    random_init="counter",  # the full-size preset's scheme, small enough for CI
)

_ANIMATE_14B = Preset(
    name="animate-14b",
    description="Wan2.2-Animate-14B (17.3 B DiT); needs --checkpoint DIR or --random-weights",
    needs_checkpoint=True,
    random_init="counter",
    transformer=dict(
        patch_size=[1, 2, 2],
        num_attention_heads=40,
        attention_head_dim=128,
        in_channels=36,
        latent_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=13824,
        num_layers=40,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=1280,
        added_kv_proj_dim=5120,  # the real model's CLIP K/V path (diffusers' code default is None)
        rope_max_seq_len=1024,
        motion_encoder_size=512,
        motion_style_dim=512,
        motion_dim=20,
        motion_encoder_dim=512,
        face_encoder_hidden_dim=1024,
        face_encoder_num_heads=4,
        inject_face_latents_blocks=5,
        motion_encoder_batch_size=8,
    ),
    vae=dict(
        base_dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    ),
    text_encoder=dict(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
    ),
    image_encoder=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    ),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (_TINY, _TINY_GPU, _ANIMATE_14B)}


def get_preset(name: str) -> Preset:
    """Return a copy of the named preset, or a BadInputError listing the known ones."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise BadInputError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}") from None


def preset_from_json(data: dict[str, Any]) -> Preset:
    """Rebuild a preset recorded in an engines manifest."""
    base = get_preset(data["name"])
    return Preset(
        name=data["name"],
        transformer=data[Component.TRANSFORMER],
        vae=data[Component.VAE],
        text_encoder=data[Component.TEXT_ENCODER],
        image_encoder=data[Component.IMAGE_ENCODER],
        needs_checkpoint=base.needs_checkpoint,
        description=base.description,
        random_init=base.random_init,
        segment_frames=data.get("segment_frames", base.segment_frames),
        steps=data.get("steps", base.steps),
        shift=data.get("shift", base.shift),
        buckets=tuple(tuple(b) for b in data.get("buckets", base.buckets)),
    )

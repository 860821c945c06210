"""The VAE of ``--fast``: streamed decode with an in-place feature cache, and the speed-ups applied to
diffusers' ``AutoencoderKLWan`` modules before they run on the GPU (:func:`speed_up_vae`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from wan_trt.runtime.fast.compiled import REFERENCE_ROUNDING, on_device

#: What :func:`speed_up_vae` can change (``benchmarks/vae_speed.py`` adds them in this order): residual
#: blocks and resampling run one frame at a time (less memory), channels-last convolutions, the causal
#: convolution's spatial zero padding done by the convolution itself (one copy of its input fewer), cuDNN's
#: autotuner, and RMSNorm + SiLU as one compiled kernel.
VAE_SPEEDUPS = ("frame_by_frame", "channels_last", "conv_padding", "cudnn_benchmark", "fused_norm_silu")

#: What ``--fast`` applies. Measured on an H100 at 1280x720x77 (benchmarks/README.md): with the autotuner
#: on, channels-last took encode + decode to 0.854x diffusers' time once warm; the autotuner alone gained
#: nothing once warm (0.997x) and autotunes every new convolution shape on the first call (the CLI's motion
#: encoder 0.4 s -> 6.1 s, for the whole process); the compiled RMSNorm + SiLU recompiled for each channel
#: count until dynamo's limit of 8 (the CLI's first VAE encode 6.0 s -> 22.4 s with both; it compiles once
#: since, not yet timed). So both stay off.
DEFAULT_VAE_SPEEDUPS = ("channels_last", "conv_padding")

#: What ``--fast --max-gpu-memory`` applies: the defaults and frame by frame, for its memory (its GPU time is
#: not measured yet: ``benchmarks/vae_speed.py`` adds it first; without a cap the GPU has room to spare).
MEMORY_PLAN_VAE_SPEEDUPS = ("frame_by_frame", *DEFAULT_VAE_SPEEDUPS)


@torch.no_grad()
def decode_streamed(vae: torch.nn.Module, latents: torch.Tensor) -> Iterator[torch.Tensor]:
    """Normalised latents ``[B, 16, F, h, w]`` → pixel chunks in [-1, 1] (1 frame, then 4 per latent frame),
    as ``--fast`` decodes: the ``vae_decoder_first/step`` graph modules, each chunk's caches handed over to
    the next (``forward_taking_caches``), so that an old cache is freed as soon as its replacement exists.
    (For tests and benchmarks: making the two modules runs a few decodes at 32x32 pixels.)"""
    from wan_trt.models.graphs import VaeDecoderFirst, VaeDecoderStep

    dtype = next(vae.parameters()).dtype  # their latent mean and std: on the latents' device, in the VAE's dtype
    first, step = (module.to(latents.device, dtype) for module in (VaeDecoderFirst(vae), VaeDecoderStep(vae)))
    video, *caches = first(latents[:, :, :1])
    yield video
    for index in range(1, latents.shape[2]):
        video, *caches = step.forward_taking_caches(latents[:, :, index:index + 1], caches)
        yield video


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | float, scale: float,
                  dim: int) -> torch.Tensor:
    """diffusers' ``WanRMS_norm`` (normalised in fp32, rounded to x's dtype, · scale · gamma + bias), then SiLU."""
    y = F.normalize(x.float(), dim=dim).to(x.dtype) * scale * gamma + bias
    return F.silu(y)


def _vae_classes() -> SimpleNamespace:
    """diffusers' VAE classes that :func:`speed_up_vae` swaps, and their replacements (made on first use:
    diffusers is imported only here)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanCausalConv3d,
        WanResample,
        WanResidualBlock,
        WanRMS_norm,
    )

    class RmsNormSiLU(WanRMS_norm):
        """A ``WanRMS_norm`` followed by the SiLU its parent applied next (the parent's SiLU became identity)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kernel = on_device(rms_norm_silu, x.device, dynamic=True, options=REFERENCE_ROUNDING)
            # plain tensors, not Parameters (whose shapes dynamo keeps static): one kernel for every channel
            # count and layout instead of a compile for each until dynamo's limit of 8 (H100 run; on the CPU's
            # inductor: 2 graphs instead of 6, at most one bf16 ulp from the eager function, 0 before)
            bias = self.bias.detach() if isinstance(self.bias, torch.Tensor) else self.bias
            return kernel(x, self.gamma.detach(), bias, self.scale, 1 if self.channel_first else -1)

    class PaddedCausalConv3d(WanCausalConv3d):
        """``WanCausalConv3d`` with its spatial zero padding done inside the convolution (same values, one
        copy of the input fewer); the causal time padding stays explicit (cache frames, then zeros)."""

        def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
            pad_w, _, pad_h, _, pad_t, _ = self._padding
            if cache_x is not None and pad_t > 0:
                x = torch.cat([cache_x.to(x.device), x], dim=2)
                pad_t -= cache_x.shape[2]
            if pad_t > 0:
                x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, pad_h, pad_w), self.dilation, self.groups)

    class FrameByFrameResidualBlock(WanResidualBlock):
        """A ``WanResidualBlock`` run on a chunk one frame at a time. Its convolutions are causal and their
        feature cache carries the last frames from call to call, so the result is the same up to rounding
        (tested); only a frame's temporaries are alive at once (at 1280x720 a 4-frame chunk's are GiBs)."""

        def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list | None = None):
            feat_idx = [0] if feat_idx is None else feat_idx
            if feat_cache is None or x.shape[2] == 1:
                return super().forward(x, feat_cache, feat_idx)
            start, frames = feat_idx[0], []
            for t in range(x.shape[2]):
                feat_idx[0] = start  # every frame goes through the same two convolutions' cache slots
                frames.append(super().forward(x[:, :, t:t + 1], feat_cache, feat_idx))
            return torch.cat(frames, dim=2)

    return SimpleNamespace(norm=WanRMS_norm, fused_norm=RmsNormSiLU, conv=WanCausalConv3d,
                           padded_conv=PaddedCausalConv3d, block=WanResidualBlock,
                           frame_block=FrameByFrameResidualBlock, resample=WanResample)


class FrameByFrameSequential(torch.nn.Sequential):
    """The spatial part of a ``WanResample`` (up- or down-sampling, then a 2-D convolution) over its
    ``[frames, C, H, W]`` input one frame at a time: the same values, one frame's upsampled copy at once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(FrameByFrameSequential, self).forward(x[i:i + 1]) for i in range(x.shape[0])])


def speed_up_vae(vae: torch.nn.Module, speedups: Iterable[str] = DEFAULT_VAE_SPEEDUPS) -> torch.nn.Module:
    """Apply ``speedups`` (names from :data:`VAE_SPEEDUPS`) to an ``AutoencoderKLWan`` in place; idempotent.

    Every change computes the same function (tests/test_fast_torch.py compares each against the
    unchanged VAE; the fused kernel, compiled on a GPU, within one bf16 ulp): ``frame_by_frame`` runs the
    residual blocks and the resampling's spatial part one frame at a time (the same function up to rounding;
    at 1280x720 with the caches handed over, peaks projected from allocator counts on the CPU: decode 9.2 ->
    7.6 GiB, encode 6.8 -> 5.3 GiB; benchmarks/README.md); ``fused_norm_silu`` swaps the norms that a SiLU
    always follows (residual blocks' ``norm1``/``norm2``, the encoder's and decoder's ``norm_out``) for
    ``RmsNormSiLU`` and that parent's SiLU for identity; ``conv_padding`` swaps every causal convolution
    for one that pads inside cuDNN; ``channels_last`` stores convolution weights channels-last (activations
    follow them); ``cudnn_benchmark`` turns on cuDNN's autotuner for the whole process (the DiT has no
    convolution in its loop: only its patch embedding).
    """
    wanted = set(speedups)
    unknown = wanted - set(VAE_SPEEDUPS)
    if unknown:
        raise ValueError(f"unknown VAE speed-up {sorted(unknown)[0]}: choose from {', '.join(VAE_SPEEDUPS)}")
    classes = _vae_classes()
    if "cudnn_benchmark" in wanted:
        torch.backends.cudnn.benchmark = True
    for module in vae.modules():
        if "channels_last" in wanted and isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            layout = torch.channels_last_3d if module.weight.dim() == 5 else torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=layout)
        if "frame_by_frame" in wanted and type(module) is classes.block:
            module.__class__ = classes.frame_block
        if "frame_by_frame" in wanted and type(module) is classes.resample:
            if type(module.resample) is torch.nn.Sequential:  # (mode "none" has an identity)
                module.resample.__class__ = FrameByFrameSequential
        if "conv_padding" in wanted and type(module) is classes.conv:
            module.__class__ = classes.padded_conv
        if "fused_norm_silu" in wanted and isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU):
            norms = [getattr(module, name) for name in ("norm1", "norm2", "norm_out") if hasattr(module, name)]
            if norms and all(type(norm) in (classes.norm, classes.fused_norm) for norm in norms):
                for norm in norms:
                    norm.__class__ = classes.fused_norm
                module.nonlinearity = torch.nn.Identity()
    return vae

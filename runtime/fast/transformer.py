"""The fast DiT: the exported DiT's math (``TransformerGraph``) with FP8 Linears and attention per the
precision policy (or INT8 W8A8 Linears, ``int8.py``, with bf16 attention), compiled glue and bf16
elsewhere (``FastOptions`` sets the kernels). The forward is the exported DiT's own
(``wan_trt.models.dit.dit_forward``); this module supplies its blocks and edge casts (a ``BlockRunner``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from wan_trt.calibration.attention import DEFAULT_SMOOTHING, SMOOTHING_MODES
from wan_trt.calibration.quantize import QuantPlan
from wan_trt.errors import EngineError
from wan_trt.models.dit import BlockRunner, dit_forward
from wan_trt.runtime.fast.attention import (
    CudnnFp8Attention, Fa3Fp8Attention, fp8_attention_kernel, resolve_attention_kernel, sdpa, sdpa_heads
)
from wan_trt.runtime.fast.glue import Glue
from wan_trt.runtime.fast.int8 import Int8Linear
from wan_trt.runtime.fast.linear import FP8_MAX, Fp8Linear, TINY
from wan_trt.runtime.fast.streaming import BlockStreamer, move_tensors

log = logging.getLogger(__name__)


BF16_ATTENTION_KERNELS = ("auto", "sdpa", "fa3")
ATTENTION_MODES = ("bf16", "fp8")
ATTENTION_MARGIN = 1.25  # static q/k/v scales: headroom over the calibrated range
def _check_options(options: FastOptions) -> None:
    for name, value, allowed in (("fast attention", options.attention, ATTENTION_MODES),
                                 ("bf16 attention kernel", options.bf16_attention_kernel, BF16_ATTENTION_KERNELS),
                                 ("fast residual stream", options.residual, ("model", "fp32")),
                                 ("FP8 attention blocks", options.fp8_attention_blocks, ("policy", "plan", "all")),
                                 ("FP8 attention smoothing", options.attention_smoothing, SMOOTHING_MODES)):
        if value not in allowed:
            raise EngineError(f"{name} '{value}': choose one of {', '.join(allowed)}")


@dataclass
class FastOptions:
    attention: str = "bf16"  # bf16 | fp8 (FP8 self-attention in the blocks listed below)
    fp8_attention_kernel: str = "auto"  # auto | cudnn | fa3 (see fp8_attention_kernel())
    # policy: the blocks whose Linears are quantized | plan: the plan's attention blocks | all
    fp8_attention_blocks: str = "policy"
    compile: bool = True
    fast_accum: bool = True
    dtype: torch.dtype = torch.bfloat16
    # the residual stream between blocks: "model" (dtype, rounded at each update as the reference) | "fp32"
    residual: str = "model"
    # self-attention of the blocks without FP8 attention: sdpa (cuDNN first) | fa3 (FlashAttention-3, bf16) |
    # auto: fa3 where fp8_attention_kernel is fa3, or auto with FA3 installed on a Hopper GPU; else sdpa
    bf16_attention_kernel: str = "auto"
    # FP8 self-attention: subtract the token mean of k, v or both before quantizing (calibration.attention.smooth_kv)
    attention_smoothing: str = DEFAULT_SMOOTHING

    def to_json(self) -> dict:
        return {"attention": self.attention, "fp8_attention_kernel": self.fp8_attention_kernel,
                "fp8_attention_blocks": self.fp8_attention_blocks, "compile": self.compile,
                "fast_accum": self.fast_accum, "dtype": str(self.dtype), "residual": self.residual,
                "bf16_attention_kernel": self.bf16_attention_kernel, "attention_smoothing": self.attention_smoothing}


BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class _Linears:
    """A block's Linear ops: FP8 where the plan has the layer, the model's own Linear otherwise."""

    qkv: Fp8Linear | None = None  # attn1 q|k|v fused (all three quantized); the three entries below are then None
    ops: dict[str, torch.nn.Module | None] = field(default_factory=dict)


def _block_ops(block: torch.nn.Module, prefix: str, plan: QuantPlan | None, out_dtype: torch.dtype,
               fast_accum: bool) -> _Linears:
    out = _Linears()
    layers = {} if plan is None else plan.layers
    int8 = plan is not None and plan.precision == "int8"
    qkv = [f"{prefix}.attn1.to_{c}" for c in "qkv"]
    if not int8 and all(n in layers for n in qkv):
        out.qkv = Fp8Linear.from_linears([block.get_submodule(f"attn1.to_{c}") for c in "qkv"],
                                         [layers[n] for n in qkv], out_dtype, fast_accum)
    for name in BLOCK_LINEARS:
        path = f"{prefix}.{name}"
        if out.qkv is not None and path in qkv or name.startswith("attn2.add_") and block.attn2.add_k_proj is None:
            out.ops[name] = None
        elif path in layers and int8:  # its own input quantization (SmoothQuant factors differ per layer)
            out.ops[name] = Int8Linear(block.get_submodule(name), layers[path], out_dtype)
        elif path in layers:
            out.ops[name] = Fp8Linear.from_linears([block.get_submodule(name)], [layers[path]], out_dtype, fast_accum)
        else:
            out.ops[name] = block.get_submodule(name)
    return out


class FastTransformer(torch.nn.Module, BlockRunner):
    """``TransformerGraph``'s function (same inputs and output) on the fast path: the DiT's one forward
    (``wan_trt.models.dit.dit_forward``) with this module as its block runner (fused block math ``_block``).

    ``graph`` is a ``TransformerGraph`` (its diffusers model in ``graph.transformer``); ``plan`` the
    FP8 quantization plan (None: bf16 Linears). With ``release_bf16`` the quantized Linears' bf16
    weights are dropped from the model (it can then no longer run as the reference).
    """

    def __init__(self, graph: torch.nn.Module, plan: QuantPlan | None, options: FastOptions | None = None,
                 release_bf16: bool = False) -> None:
        super().__init__()
        self.options = options or FastOptions()
        _check_options(self.options)
        if plan is not None and plan.precision not in ("fp8", "int8"):
            raise EngineError(f"the fast path runs FP8 and INT8 plans only (this plan is {plan.precision})")
        if plan is not None and plan.precision == "int8" and self.options.attention == "fp8":
            raise EngineError("INT8 plans run their attention in bf16: FP8 attention needs an FP8 plan")
        self.model = graph.transformer
        self.plan = plan
        self.block_ops: list[_Linears] = []
        for i, block in enumerate(self.model.blocks):
            prefix = f"transformer.blocks.{i}"
            ops = _block_ops(block, prefix, plan, self.options.dtype, self.options.fast_accum)
            self.block_ops.append(ops)
            for name, op in self.quantized_ops(i).items():  # registered so .to() moves them
                self.add_module(f"fp8_{i}_{name.replace('.', '_')}", op)
            if release_bf16 and plan is not None:  # block by block: one block's bf16 and FP8 copies at a time
                for path in [p for p in plan.layers if p.startswith(prefix + ".")]:  # the FP8 copy replaces it
                    parent, _, attr = path.removeprefix("transformer.").rpartition(".")
                    setattr(self.model.get_submodule(parent), attr, torch.nn.Identity())
        self.fp8_attention = self._fp8_attention_blocks()
        self.streamer: BlockStreamer | None = None
        self._glue: Glue | None = None
        self._fp8_attn: CudnnFp8Attention | Fa3Fp8Attention | None = None
        self._bf16_kernel: str | None = None  # bf16_attention_kernel resolved on the first bf16 attention
        self._fa3_bf16: Fa3Fp8Attention | None = None
        self.attention_scales: dict[int, tuple] = {}  # block -> (1/descale [3], (descale_q, descale_k, descale_v))
        self.recorded_amax: dict[int, torch.Tensor] | None = None

    def quantized_ops(self, index: int) -> dict[str, torch.nn.Module]:
        """Block ``index``'s FP8/INT8 Linears (``qkv``: attn1's fused q|k|v) by name."""
        ops = self.block_ops[index]
        out = {name: op for name, op in ops.ops.items() if isinstance(op, (Fp8Linear, Int8Linear))}
        if ops.qkv is not None:
            out["qkv"] = ops.qkv
        return out

    def block_groups(self) -> list[list[torch.nn.Module]]:
        """The modules whose weights each block uses: the block, its quantized Linears, and the face adapter
        that runs right after it (``inject_face_latents_blocks``)."""
        every = self.model.config.inject_face_latents_blocks
        return [[block, *self.quantized_ops(i).values(), *([self.model.face_adapter[i // every]] if i % every == 0 else [])]
                for i, block in enumerate(self.model.blocks)]

    def stream_blocks(self, device: torch.device | str, ahead: int = 1, streamed: int | None = None) -> BlockStreamer:
        """Keep the first ``streamed`` blocks' weights (default: all) on the host and stream them to ``device``
        as they run (``streaming.py``); everything else moves to ``device`` now. Instead of ``.to(device)``."""
        groups = self.block_groups()
        self.streamer = BlockStreamer(groups, device, ahead, streamed)
        in_groups = {id(sub) for group in groups for module in group for sub in module.modules()}
        move_tensors((sub for sub in self.modules() if id(sub) not in in_groups), device)
        return self.streamer

    @property
    def device(self) -> torch.device:
        """Where the blocks compute (with streamed blocks, not where their weights wait)."""
        return self.streamer.device if self.streamer is not None else next(self.model.parameters()).device

    def _glue_fns(self, device: torch.device) -> Glue:
        if self._glue is None:
            self._glue = Glue.compiled() if (self.options.compile and device.type == "cuda") else Glue()
        return self._glue

    def _attention_fp8(self) -> CudnnFp8Attention | Fa3Fp8Attention:
        if self._fp8_attn is None:
            self._fp8_attn = fp8_attention_kernel(self.options.fp8_attention_kernel)
        return self._fp8_attn

    def _fp8_attention_blocks(self) -> set[int]:
        """The blocks whose self-attention runs in FP8 (``attention`` and ``fp8_attention_blocks``)."""
        if self.options.attention != "fp8":
            return set()
        if self.options.fp8_attention_blocks == "all":
            return set(range(len(self.block_ops)))
        if self.options.fp8_attention_blocks == "plan":
            return set(self.plan.attention) if self.plan is not None else set()
        return {i for i, ops in enumerate(self.block_ops)  # policy: the blocks with FP8 Linears
                if ops.qkv is not None or any(isinstance(o, Fp8Linear) for o in ops.ops.values())}

    def with_options(self, **changes) -> FastTransformer:
        """A copy with some options changed that shares this one's modules and FP8 weights (and its static
        attention scales, unless the smoothing changes); kernel and glue choices are made again on its first call."""
        import copy

        other = copy.copy(self)
        other.options = dataclasses.replace(self.options, **changes)
        _check_options(other.options)
        other.fp8_attention = other._fp8_attention_blocks()
        # static scales are ranges of what is quantized: smoothing changes that, so they are calibrated again
        same = other.options.attention_smoothing == self.options.attention_smoothing
        other.attention_scales = dict(self.attention_scales) if same else {}
        if self.attention_scales and not same:
            log.info("with_options: attention smoothing %s -> %s drops the static q/k/v scales (dynamic until "
                     "record_attention_amax + use_static_attention)", self.options.attention_smoothing,
                     other.options.attention_smoothing)
        other.recorded_amax = None
        other._glue = other._fp8_attn = other._fa3_bf16 = other._bf16_kernel = None
        return other

    @property
    def bf16_kernel_name(self) -> str:
        """The bf16 self-attention kernel: fa3 or sdpa (``FastOptions.bf16_attention_kernel`` resolved)."""
        if self._bf16_kernel is None:
            kernel = self.options.bf16_attention_kernel
            if kernel == "auto":  # the FP8 attention's kernel family: FA3, or cuDNN's (SDPA for bf16)
                kernel = "fa3" if resolve_attention_kernel(self.options.fp8_attention_kernel) == "fa3" else "sdpa"
            self._bf16_kernel = kernel
        return self._bf16_kernel

    def _attention_bf16_kernel(self) -> Fa3Fp8Attention | None:
        """FA3 when it runs the bf16 self-attention (made, and checked, on the first call), else None (SDPA)."""
        if self.bf16_kernel_name != "fa3":
            return None
        if self._fa3_bf16 is None:
            self._fa3_bf16 = Fa3Fp8Attention()
        return self._fa3_bf16

    def _attention_bf16(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bf16 self-attention ``[B, L, H, D]`` → ``[B, L, H*D]``: FA3's bf16 forward (at 75.6k tokens on the
        H200, 169 ms per block against cuDNN's 204) or SDPA."""
        fa3 = self._attention_bf16_kernel()
        return fa3.bf16(q, k, v).flatten(2, 3) if fa3 is not None else sdpa(q, k, v)

    @property
    def fp8_kernel_name(self) -> str | None:
        """The FP8 attention kernel in use (class name), None before the first FP8 attention call."""
        return type(self._fp8_attn).__name__ if self._fp8_attn is not None else None

    # ---- one block ---------------------------------------------------------------------------
    def _self_attention(self, index: int, block, x, shift, scale, rotary, glue: Glue) -> torch.Tensor:
        ops, attn = self.block_ops[index], block.attn1
        eps = block.norm1.eps
        if ops.qkv is not None:
            h = glue.norm_modulate(x, shift, scale, eps, ops.qkv.act_scale, self.options.dtype)
            q, k, v = ops.qkv.forward_fp8(h, ops.qkv.act_scale).chunk(3, dim=-1)
        else:
            h = glue.norm_modulate(x, shift, scale, eps, None, self.options.dtype)
            q, k, v = (_run(ops.ops[f"attn1.to_{c}"], h) for c in "qkv")
        to_out = ops.ops["attn1.to_out.0"]
        static = self.attention_scales.get(index) if index in self.fp8_attention else None
        smoothing = self.options.attention_smoothing
        if static is not None:  # calibrated q/k/v scales: the FP8 cast is fused into the RMSNorm + RoPE kernel
            inv, descales = static
            q8, k8, v8, v_mean = glue.qk_norm_rope_fp8(q, k, v, attn.norm_q.weight, attn.norm_k.weight,
                                                       attn.norm_q.eps, attn.heads, *rotary, inv, smoothing)
            o, do = self._attention_fp8()(q8, k8, v8, *descales)
        else:
            q, k = glue.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, attn.norm_q.eps, attn.heads,
                                     *rotary)
            v = v.unflatten(-1, (attn.heads, -1))
            if index not in self.fp8_attention:
                return _run(to_out, self._attention_bf16(q, k, v.contiguous()).to(self.options.dtype))
            k, v, v_mean = glue.smooth_kv(k, v, smoothing) if smoothing != "none" else (k, v, None)
            (q8, dq), (k8, dk), (v8, dv) = glue.quant_dynamic(q), glue.quant_dynamic(k), glue.quant_dynamic(v)
            if self.recorded_amax is not None:
                self._record(index, (dq, dk, dv))
            o, do = self._attention_fp8()(q8, k8, v8, dq, dk, dv)
        # o: E4M3 with its descale do (cuDNN), or bf16 with do None (FA3)
        if do is not None and v_mean is None and isinstance(to_out, Fp8Linear):  # cuDNN's FP8 output as it is
            return to_out.forward_fp8(o.flatten(2, 3), do)
        # else to_out's input is made as any FP8 Linear's (v's mean added where v was smoothed), in one kernel
        act = _act_scale(to_out)
        y = glue.to_out_input(o, do, v_mean, act, self.options.dtype)
        return to_out.forward_fp8(y, act) if act is not None else to_out(y)

    # ---- static FP8 attention scales -----------------------------------------------------------
    def record_attention_amax(self) -> None:
        """From now on, remember each FP8-attention block's largest |q|, |k|, |v| (dynamic scaling meanwhile)."""
        self.recorded_amax = {}

    def _record(self, index: int, descales) -> None:
        amax = torch.stack([d.reshape(()) for d in descales]) * FP8_MAX
        old = self.recorded_amax.get(index)
        self.recorded_amax[index] = amax if old is None else torch.maximum(old, amax)

    def use_static_attention(self, amax: Mapping[int, tuple[float, float, float]] | None = None,
                             margin: float = ATTENTION_MARGIN) -> dict[int, list[float]]:
        """Fix per-block q/k/v scales (``amax · margin / 448``) from ``amax`` or from what was recorded.

        Values beyond a calibrated range saturate at ±448: the margin covers inputs a bit larger than
        the calibration's. Returns the amax table used (JSON-friendly).
        """
        if amax is None:
            if not self.recorded_amax:
                raise EngineError("no attention ranges recorded: call record_attention_amax() and run a forward first")
            amax = {i: tuple(float(v) for v in t.tolist()) for i, t in self.recorded_amax.items()}
        self.recorded_amax = None
        self.attention_scales = {}
        device = self.device
        for index, values in amax.items():
            descale = torch.tensor([max(v, TINY) * margin / FP8_MAX for v in values], device=device)
            self.attention_scales[int(index)] = (1.0 / descale, tuple(d.reshape(1, 1, 1, 1) for d in descale))
        return {int(i): [float(v) for v in vals] for i, vals in amax.items()}

    def _cross_attention(self, index: int, block, h, context_img, context_txt, glue: Glue) -> torch.Tensor:
        """Cross-attention on ``h`` (the normalized tokens, FP8 when ``attn2.to_q`` is quantized)."""
        ops, attn = self.block_ops[index], block.attn2
        to_q, to_out = ops.ops["attn2.to_q"], ops.ops["attn2.to_out.0"]
        q = to_q.forward_fp8(h, to_q.act_scale) if isinstance(to_q, Fp8Linear) else to_q(h)
        heads = attn.heads
        q = glue.rms_norm(q, attn.norm_q.weight, attn.norm_q.eps).unflatten(-1, (heads, -1))
        k = attn.norm_k(_run(ops.ops["attn2.to_k"], context_txt)).unflatten(-1, (heads, -1))
        v = _run(ops.ops["attn2.to_v"], context_txt).unflatten(-1, (heads, -1))
        out, out_img = sdpa_heads(q, k, v), None
        if ops.ops["attn2.add_k_proj"] is not None:  # the CLIP image context branch
            k_img = attn.norm_added_k(_run(ops.ops["attn2.add_k_proj"], context_img)).unflatten(-1, (heads, -1))
            v_img = _run(ops.ops["attn2.add_v_proj"], context_img).unflatten(-1, (heads, -1))
            out_img = sdpa_heads(q, k_img, v_img)
        act = _act_scale(to_out)
        merged = glue.merge_heads(out, out_img, act)
        return to_out.forward_fp8(merged, act) if act is not None else to_out(merged)

    def _ffn(self, index: int, h, glue: Glue) -> torch.Tensor:
        """The FFN on ``h`` (the normalized, modulated tokens; FP8 when ``ffn.net.0.proj`` is quantized)."""
        ops = self.block_ops[index]
        up, down = ops.ops["ffn.net.0.proj"], ops.ops["ffn.net.2"]
        u = up.forward_fp8(h, up.act_scale) if isinstance(up, Fp8Linear) else up(h)
        act = _act_scale(down)
        g = glue.gelu_quant(u, act)
        return down.forward_fp8(g, act) if act is not None else down(g)

    def _block(self, index: int, x, context_img, context_txt, temb6, rotary, glue: Glue) -> torch.Tensor:
        """One transformer block; each residual update is fused with the norm that follows it."""
        block, ops = self.model.blocks[index], self.block_ops[index]
        mod = (block.scale_shift_table.float() + temb6.float()).chunk(6, dim=1)  # each [B, 1, D]
        shift, scale, gate, c_shift, c_scale, c_gate = mod
        y = self._self_attention(index, block, x, shift, scale, rotary, glue)
        norm2 = block.norm2
        x, h = glue.residual_norm_affine(x, y, gate, norm2.weight, norm2.bias, norm2.eps,
                                         _act_scale(ops.ops["attn2.to_q"]), self.options.dtype)
        y = self._cross_attention(index, block, h, context_img, context_txt, glue)
        x, h = glue.residual_norm_modulate(x, y, c_shift, c_scale, block.norm3.eps,
                                           _act_scale(ops.ops["ffn.net.0.proj"]), self.options.dtype)
        return glue.gated_residual(x, self._ffn(index, h, glue), c_gate)

    # ---- the DiT's one forward (wan_trt.models.dit) with this runner's hooks ---------------------
    @torch.no_grad()
    def forward(self, latent_input, timestep, text_embeds, image_embeds, pose_latents, motion_vectors):
        return (dit_forward(self.model, self, latent_input, timestep, text_embeds, image_embeds, pose_latents,
                            motion_vectors),)

    def cast_inputs(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.options.dtype) for t in inputs)

    def rotary_tables(self, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 tables: the fused RoPE rotates in fp32 (``glue.qk_norm_rope``)."""
        cos, sin = rope
        return cos.to(torch.float32), sin.to(torch.float32)

    def residual_stream(self, tokens: torch.Tensor) -> torch.Tensor:
        """Contiguous for the fused kernels; fp32 with ``FastOptions.residual == "fp32"``."""
        tokens = tokens.contiguous()
        return tokens.float() if self.options.residual == "fp32" else tokens

    def model_dtype(self, tokens: torch.Tensor) -> torch.dtype:
        return self.options.dtype

    def block_context(self, text_context: torch.Tensor,
                      image_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text): the cross-attention attends to each on its own (no concatenation)."""
        return image_context, text_context

    def run_block(self, index: int, block: torch.nn.Module, tokens: torch.Tensor,
                  context: tuple[torch.Tensor, torch.Tensor], timestep_proj: torch.Tensor,
                  rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.streamer is not None:  # the previous block (and its face adapter) have run
            if index > 0:
                self.streamer.release(index - 1)
            self.streamer.acquire(index)
        return self._block(index, tokens, *context, timestep_proj, rotary, self._glue_fns(tokens.device))

    def velocity_out(self, velocity: torch.Tensor) -> torch.Tensor:
        if self.streamer is not None:  # the last block is done; the next call's first block starts copying
            self.streamer.release(len(self.block_ops) - 1)
            self.streamer.acquire_ahead(0)
        return velocity.float()


def _run(op: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return op(x)


def _act_scale(op: torch.nn.Module | None) -> torch.Tensor | None:
    """The static input scale of an FP8 Linear (its input is quantized by the kernel before it), else None."""
    return op.act_scale if isinstance(op, Fp8Linear) else None

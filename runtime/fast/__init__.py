"""The fast PyTorch path of the ``torch`` backend (``wan-trt infer --backend torch --fast``).

The same math as the exported DiT graph (``TransformerGraph``), run the way a Hopper GPU likes it. Both run
the DiT's one forward (``wan_trt.models.dit.dit_forward``); ``FastTransformer`` is its fast block runner:

* bf16 everywhere the reference keeps fp32 only for its own bookkeeping (norm statistics and
  modulation are still computed in fp32 inside fused kernels, as diffusers does);
* FP8 E4M3 Linears through ``torch._scaled_mm`` for the layers the precision policy quantizes:
  weights per output channel, activations per tensor with the *static* scales of the calibration
  cache (the same ``make_plan`` scales as the Q/DQ graph and its fake-quant reference). The
  quantization of a Linear's input is fused into the element-wise kernel that produces it
  (LayerNorm + modulation, GELU); q/k/v of a block share one fused GEMM;
* self-attention: bf16 in the blocks without FP8 attention, on FlashAttention-3's bf16 forward where
  FA3 is the FP8 kernel (explicitly or by ``auto``; 17% faster than cuDNN at 75.6k tokens on the H200),
  else ``scaled_dot_product_attention`` with the cuDNN backend (``FastOptions.bf16_attention_kernel``);
  FP8 fused attention in the blocks the policy quantizes, by one of two kernels (``FastOptions.fp8_attention_kernel``):
  cuDNN's ``sdpa_fp8`` (``nvidia-cudnn-frontend``) or FlashAttention-3's FP8 forward (``flash_attn_3``,
  built from source for Hopper; ``auto`` takes it where it is installed). q, k and v are scaled per
  tensor: statically from the calibration cache, or from their current amax. By default v's token mean
  is subtracted before v is quantized and added back to the output (``FastOptions.attention_smoothing``,
  ``calibration.attention.smooth_kv``: exact in real arithmetic; 720p error 2.08e-2 → 1.18e-2).
  cuDNN's FP8 output uses ``scale_o = 224 / amax(v)``, safe because every output row is a convex
  combination of v's rows, and feeds the FP8 ``to_out`` GEMM without requantizing (with v smoothed:
  v's mean is added and the sum requantized, one fused kernel); FA3's bf16 output is quantized with
  ``to_out``'s calibrated input scale, as the Q/DQ graph does (plus v's mean, in the same kernel);
* the element-wise glue (LayerNorm + modulation, qk-RMSNorm + RoPE + FP8 cast, GELU + FP8 cast, the
  cross-attention's q RMSNorm and the sum of its text and image attention outputs) in
  ``torch.compile``-d functions, one fused kernel or two each; each residual update is fused with the
  norm that follows it (self-attention residual + cross-attention pre-norm, cross-attention residual
  + FFN LayerNorm and modulation).

Memory plan for ``infer --fast``: the text and image encoders are moved to the GPU for their call
and back to the host right after (they run once per video, before the DiT); the VAE, motion
encoder and DiT stay resident; the DiT's quantized Linears keep only their FP8 weights.

This module imports diffusers only through the reference models it is given (torch backend only).
"""

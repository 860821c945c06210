"""The fast path's attention kernels: bf16 SDPA, cuDNN's FP8 ``sdpa_fp8`` and FlashAttention-3's FP8
forward, and the choice among them (``auto``, ``cudnn``, ``fa3``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wan_trt.errors import EngineError
from wan_trt.runtime.fast.linear import FP8_MAX

log = logging.getLogger(__name__)


FP8_ATTENTION_KERNELS = ("auto", "cudnn", "fa3")
O_MARGIN = 2.0  # cuDNN's FP8 attention output: |o| <= amax(v); scale to half the range (FP8 is relative precision)
def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention over ``[B, S, H, D]`` → ``[B, H, S, D]`` (a view, as SDPA returns it); cuDNN first on a
    GPU, then flash, then efficient."""
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(*args)
    return F.scaled_dot_product_attention(*args)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """bf16 attention over ``[B, S, H, D]`` → ``[B, S, H*D]``."""
    return sdpa_heads(q, k, v).transpose(1, 2).flatten(2, 3)


class CudnnFp8Attention:
    """cuDNN's fused FP8 attention (``sdpa_fp8``) on ``[B, L, H, D]`` E4M3 tensors, one graph per shape."""

    #: Seconds this process has spent building these graphs (part of the first step's warm-up).
    build_seconds: float = 0.0

    def __init__(self) -> None:
        try:
            import cudnn
        except ImportError as error:
            raise EngineError("FP8 attention needs nvidia-cudnn-frontend (pip install nvidia-cudnn-frontend): "
                              f"{error}") from None
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs: dict[tuple, tuple] = {}
        self._one = None

    def _graph(self, batch: int, length: int, heads: int, dim: int):
        key = (batch, length, heads, dim)
        if key in self.graphs:
            return self.graphs[key]
        started = time.perf_counter()
        cudnn = self.cudnn
        dt = cudnn.data_type
        graph = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                              handle=self.handle)
        dims, strides = (batch, heads, length, dim), (length * heads * dim, dim, heads * dim, 1)  # BSHD in memory
        q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=dt.FP8_E4M3) for n in "qkv")
        scalars = {n: graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")}
        o, _, amax_s, amax_o = graph.sdpa_fp8(name="sdpa_fp8", q=q, k=k, v=v, **scalars, generate_stats=False,
                                               attn_scale=1.0 / math.sqrt(dim), use_causal_mask=False)
        o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(dt.FP8_E4M3)
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        ports = {"q": q, "k": k, "v": v, "o": o, "amax_s": amax_s, "amax_o": amax_o, **scalars}
        workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
        self.graphs[key] = (graph, ports, workspace)
        seconds = time.perf_counter() - started
        CudnnFp8Attention.build_seconds += seconds
        log.info("built cuDNN FP8 attention graph for B=%d L=%d H=%d D=%d in %.1f s", *key, seconds)
        return self.graphs[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                 descale_k: torch.Tensor, descale_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E4M3 ``[B, L, H, D]`` q, k, v with their descales → (E4M3 output ``[B, L, H, D]``, its descale)."""
        graph, ports, workspace = self._graph(*q.shape)
        if self._one is None:
            self._one = {"descale_s": torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, device=q.device),
                         "scale_s": torch.full((1, 1, 1, 1), FP8_MAX, device=q.device),
                         "amax_s": torch.empty(1, 1, 1, 1, device=q.device),
                         "amax_o": torch.empty(1, 1, 1, 1, device=q.device)}
        out = torch.empty_like(q)
        descale_o = descale_v * O_MARGIN  # o <= amax(v) = 448 * descale_v
        pack = {ports["q"]: q, ports["k"]: k, ports["v"]: v, ports["o"]: out,
                ports["descale_q"]: descale_q, ports["descale_k"]: descale_k, ports["descale_v"]: descale_v,
                ports["scale_o"]: (1.0 / descale_o).contiguous(),
                **{ports[n]: t for n, t in self._one.items()}}
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        graph.execute(pack, workspace, handle=self.handle)
        return out, descale_o


class Fa3Fp8Attention:
    """FlashAttention-3's FP8 forward (``flash_attn_interface.flash_attn_func`` of the ``flash_attn_3`` package)
    on ``[B, L, H, D]`` E4M3 tensors. Its output is bf16 (FA3 has no FP8 output), returned with descale None."""

    def __init__(self, attention: Callable | None = None) -> None:
        """``attention``: a stand-in for ``flash_attn_func`` (tests); by default FA3's own, on a Hopper GPU."""
        if attention is not None:
            self.attention = attention
            return
        try:
            import flash_attn_interface
        except ImportError as error:
            raise EngineError("the fa3 attention kernel (--fp8-attention-kernel fa3) needs FlashAttention-3 "
                              "(flash_attn_3, built from the hopper/ folder of Dao-AILab/flash-attention; see "
                              f"docs/cli.md): {error}") from None
        if torch.cuda.get_device_capability() != (9, 0):
            raise EngineError(f"FlashAttention-3 runs on Hopper GPUs (compute capability 9.0); this GPU is "
                              f"{torch.cuda.get_device_name()}: use --fp8-attention-kernel cudnn")
        self.attention = flash_attn_interface.flash_attn_func

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                 descale_k: torch.Tensor, descale_v: torch.Tensor) -> tuple[torch.Tensor, None]:
        """E4M3 ``[B, L, H, D]`` q, k, v with per-tensor descales → (bf16 output ``[B, L, H, D]``, None)."""
        batch, heads = q.shape[0], k.shape[2]
        per_head = [d.reshape(1, 1).expand(batch, heads) for d in (descale_q, descale_k, descale_v)]  # FA3: (B, H_k)
        out = self.attention(q, k, v, causal=False, q_descale=per_head[0], k_descale=per_head[1],
                             v_descale=per_head[2])
        return (out[0] if isinstance(out, tuple) else out), None

    def bf16(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """FA3's bf16 forward: ``[B, L, H, D]`` q, k, v → ``[B, L, H, D]``."""
        out = self.attention(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out


def fa3_available() -> bool:
    """Whether FlashAttention-3 is importable and this GPU is a Hopper (its only target)."""
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def resolve_attention_kernel(name: str) -> str:
    """``FastOptions.fp8_attention_kernel`` → fa3 | cudnn (auto: FA3 where it is installed on a Hopper GPU)."""
    if name not in FP8_ATTENTION_KERNELS:
        raise EngineError(f"FP8 attention kernel '{name}': choose one of {', '.join(FP8_ATTENTION_KERNELS)}")
    if name != "auto":
        return name
    return "fa3" if fa3_available() else "cudnn"


def fp8_attention_kernel(name: str) -> CudnnFp8Attention | Fa3Fp8Attention:
    """The FP8 attention kernel ``name`` (see ``resolve_attention_kernel``)."""
    resolved = resolve_attention_kernel(name)
    if name == "auto":
        log.info("FP8 attention kernel: %s (auto%s)", resolved,
                 "" if resolved == "fa3" else ": flash_attn_3 not installed")
    return Fa3Fp8Attention() if resolved == "fa3" else CudnnFp8Attention()

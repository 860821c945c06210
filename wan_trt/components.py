"""How a graph's tensors are declared: names, dtypes, symbolic dims, sample inputs.

The graphs themselves are declared in ``wan_trt.registry`` (``graph_specs``); export (dynamic axes),
the engines manifest, the runtime backends and the tests all read those declarations. Dims are
small expressions over a few symbols, evaluated either with integers (to make sample inputs) or
with ``torch.export.Dim`` objects (to export):

====== ==================================================================
``B``  batch (1; 2 with classifier-free guidance)
``F``  latent frames of a segment, without the reference slot; a segment has ``4F-3`` pixel frames
``h2`` ``w2``  pixel height / 16 and width / 16 (the DiT's token grid); latents are ``2*h2`` × ``2*w2``
``L``  text tokens (512 in the pipeline)
``N``  face crops given to the motion encoder in one call
====== ==================================================================

The VAE runs streamed: a *first* graph for the first chunk and a *step* graph for every later chunk,
with the causal convolutions' 2-frame feature caches as explicit inputs and outputs, so memory is
bounded by one chunk at any clip length. The cache layout (channels and spatial scale of each slot)
is read off the VAE at export time and recorded in the manifest.

This module needs numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from wan_trt.presets import TEXT_TOKENS

SYMBOLS = ("B", "F", "h2", "w2", "L", "N")
CACHE_INPUT_PREFIX = "cache"
CACHE_OUTPUT_PREFIX = "next_cache"

# Ranges for dynamic dims at export time (inclusive). Exported graphs accept any value in range.
SYMBOL_RANGES: dict[str, tuple[int, int]] = {
    "B": (1, 8),
    "F": (1, 64),
    "h2": (2, 128),
    "w2": (2, 128),
    "L": (2, 4096),
    "N": (1, 1024),
}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a graph. ``sample`` says how to draw a realistic random value."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]
    sample: str = "normal"  # normal | pixels | timestep | tokens | mask

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(evaluate_dim(d, sizes) for d in self.dims)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "sample": self.sample}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "TensorSpec":
        return TensorSpec(data["name"], data["dtype"], tuple(data["dims"]), data.get("sample", "normal"))


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph (one ONNX file / one engine)."""

    name: str
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""
    vocab_size: int = 0  # for token inputs
    cache_pairs: tuple[tuple[str, str], ...] = field(default=())  # (input cache, output cache) of streamed graphs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sample_inputs(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Fresh random inputs of the declared names, dtypes and shapes for the given symbol sizes."""
        rng = np.random.default_rng(seed)
        return {t.name: _sample(t, t.shape(sizes), rng, self.vocab_size) for t in self.inputs}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [t.to_json() for t in self.inputs]
        data["outputs"] = [t.to_json() for t in self.outputs]
        data["cache_pairs"] = [list(p) for p in self.cache_pairs]
        return data

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "GraphSpec":
        return GraphSpec(
            name=data["name"],
            component=data["component"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            doc=data.get("doc", ""),
            vocab_size=data.get("vocab_size", 0),
            cache_pairs=tuple(tuple(p) for p in data.get("cache_pairs", ())),
        )


def evaluate_dim(dim: int | str, sizes: Mapping[str, Any]) -> Any:
    """Evaluate a dim expression (``"4*F-3"``) with ints or with torch.export.Dim objects."""
    if isinstance(dim, int):
        return dim
    return eval(dim, {"__builtins__": {}}, dict(sizes))  # noqa: S307 - expressions come from this module


def infer_sizes(spec: GraphSpec, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Recover symbol sizes from concrete input shapes (every dim expression is affine in one symbol)."""
    sizes: dict[str, int] = {}
    for tensor in spec.inputs:
        for dim, value in zip(tensor.dims, shapes[tensor.name]):
            if not isinstance(dim, str):
                continue
            symbol = next(s for s in SYMBOLS if _mentions(dim, s))
            offset = evaluate_dim(dim, {symbol: 0})
            slope = evaluate_dim(dim, {symbol: 1}) - offset
            sizes.setdefault(symbol, (int(value) - offset) // slope)
    return sizes


def symbols_of(spec: GraphSpec) -> list[str]:
    """The dynamic symbols a graph's inputs use, in SYMBOLS order."""
    used = {s for t in spec.inputs for d in t.dims if isinstance(d, str) for s in SYMBOLS if _mentions(d, s)}
    return [s for s in SYMBOLS if s in used]


def _mentions(expr: str, symbol: str) -> bool:
    import re

    return re.search(rf"\b{symbol}\b", expr) is not None


def _sample(t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator, vocab: int) -> np.ndarray:
    if t.sample == "tokens":
        return rng.integers(3, max(vocab, 4), size=shape, dtype=np.int64)
    if t.sample == "mask":
        mask = np.zeros(shape, dtype=np.int64)
        for row in mask.reshape(-1, shape[-1]):
            row[: rng.integers(1, shape[-1] + 1)] = 1
        return mask
    if t.sample == "timestep":
        return rng.uniform(1.0, 999.0, size=shape).astype(t.dtype)
    if t.sample == "pixels":
        return rng.uniform(-1.0, 1.0, size=shape).astype(t.dtype)
    return rng.standard_normal(size=shape).astype(t.dtype)


# --------------------------------------------------------------------------------------------------
# The streamed VAE's caches
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheSlot:
    """One causal-conv feature cache of the streamed VAE: channels and spatial size relative to ``h2``."""

    channels: int
    scale: int  # the slot's height is scale * h2 (width likewise)


def vae_cache_specs(prefix: str, slots: Iterable[CacheSlot]) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}_{i:02d}", "float32", ("B", s.channels, 2, f"{s.scale}*h2", f"{s.scale}*w2"))
        for i, s in enumerate(slots)
    ]


def segment_sizes(frames: int, height: int, width: int, batch: int = 1, face_frames: int | None = None) -> dict[str, int]:
    """Symbol sizes for a segment of ``frames`` pixel frames (4n+1) at ``height`` × ``width`` pixels."""
    return {
        "B": batch,
        "F": (frames - 1) // 4 + 1,
        "h2": height // 16,
        "w2": width // 16,
        "L": TEXT_TOKENS,
        "N": face_frames if face_frames is not None else frames,
    }

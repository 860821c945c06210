"""The files every engines directory holds besides its graphs: the tokenizer, the default prompts'
text embeddings and the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wan_trt import __version__
from wan_trt.export.sources import BuildSources
from wan_trt.presets import DEFAULT_PROMPT
from wan_trt.runtime.manifest import TORCH_BACKENDS, GraphEntry, Manifest
from wan_trt.tokenizer import clean_prompt, tokenize

TOKENIZER_FILE = "tokenizer.json"
PROMPT_CACHE_FILE = "prompt_embeds.npz"
CACHED_PROMPTS = (DEFAULT_PROMPT, "")  # the default prompt and the default (empty) negative prompt


def tool_versions(*, onnx: bool = True) -> dict[str, str]:
    """The versions of the libraries that made the directory (ONNX's only where it holds ONNX files)."""
    import diffusers
    import transformers

    versions = {"wan_trt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__}
    if onnx:
        import onnx as onnx_module
        import onnxruntime

        versions.update(onnx=onnx_module.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def write_text_files(staging: Path, sources: BuildSources, text_encoder: torch.nn.Module, device: str = "cpu") -> None:
    """The tokenizer and the default prompts' embeddings (``text_encoder``: the graph module in its dtype)."""
    sources.tokenizer.save(str(staging / TOKENIZER_FILE))
    write_prompt_cache(staging / PROMPT_CACHE_FILE, sources.tokenizer, text_encoder, device)


def write_prompt_cache(path: Path, tokenizer, text_encoder: torch.nn.Module, device: str = "cpu") -> None:
    """Text embeddings of the default prompts, so the umT5 engine runs only for a custom prompt."""
    import numpy as np

    embeds = {}
    home = next(text_encoder.parameters()).device
    text_encoder.to(device)
    try:
        for prompt in CACHED_PROMPTS:
            ids, mask = (torch.from_numpy(a).to(device) for a in tokenize(tokenizer, prompt))
            with torch.no_grad():
                embeds[f"prompt_{len(embeds)}"] = text_encoder(ids, mask)[0].to(torch.float32).cpu().numpy()
    finally:
        text_encoder.to(home)
    np.savez(path, prompts=np.array([clean_prompt(p) for p in CACHED_PROMPTS]), **embeds)


def directory_manifest(sources: BuildSources, *, precision: str, graphs: dict[str, GraphEntry],
                       backends: tuple[str, ...], quantization: dict[str, Any] | None) -> Manifest:
    """The manifest of a directory built from ``sources`` that serves ``backends``."""
    return Manifest(preset=sources.preset, seed=sources.seed, weights_hash=sources.weights_hash, precision=precision,
                    tokenizer_file=TOKENIZER_FILE, graphs=graphs, versions=tool_versions(onnx=backends != TORCH_BACKENDS),
                    checkpoint=sources.checkpoint, quantization=quantization, loras=sources.lora_entries,
                    prompt_cache_file=PROMPT_CACHE_FILE, backends=backends,
                    checkpoint_fingerprint=sources.checkpoint_fingerprint)

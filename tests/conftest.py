"""Shared fixtures: the tiny preset's engines are exported once per test session (about 2 minutes)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_trt.presets import get_preset
from wan_trt.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def preset():
    return get_preset("tiny")


def _engine_sources() -> list[Path]:
    """The code that decides what an fp32 engines directory contains (a CI checkout always builds afresh)."""
    files = sorted((ROOT / "export").rglob("*.py")) + sorted((ROOT / "calibration").rglob("*.py"))
    files += [ROOT / "wan_trt" / f"{name}.py" for name in
              ("components", "presets", "reference_models", "checkpoints", "tokenizer", "buckets", "__init__")]
    return files + [ROOT / "runtime" / "manifest.py"]


def _source_key() -> str:
    """Hash of the engine-building code and the exporting libraries' versions: engines are reused while it holds."""
    import diffusers
    import onnx
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {diffusers.__version__} {transformers.__version__} "
                            f"{onnx.__version__}".encode())
    for file in _engine_sources():
        digest.update(file.relative_to(ROOT).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory) -> Path:
    """An engines directory for the tiny preset (seed 0), built through the public build function.

    Exports take about 2 minutes on 2 cores, so the directory is cached under ``WAN_TRT_TEST_CACHE``
    (default ``~/.cache/wan-trt/test-engines``), keyed by a hash of the code and library versions.
    """
    from wan_trt.export.build import build_engines
    from wan_trt.runtime.manifest import MANIFEST_NAME

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    cache = Path(os.environ.get("WAN_TRT_TEST_CACHE", Path.home() / ".cache" / "wan-trt" / "test-engines"))
    out = cache / _source_key()
    if (out / MANIFEST_NAME).is_file():
        return out
    return build_engines(get_preset("tiny"), out, seed=0)


@pytest.fixture(scope="session")
def manifest(tiny_engines):
    from wan_trt.runtime.manifest import read_manifest

    return read_manifest(tiny_engines)


@pytest.fixture(scope="session")
def ort_engines(tiny_engines, manifest):
    from wan_trt.runtime.loading import load_engines

    return load_engines(tiny_engines, manifest, "onnxruntime")


@pytest.fixture(scope="session")
def torch_engines_(manifest):
    from wan_trt.runtime.loading import torch_engines

    return torch_engines(manifest)


def fresh_reference_models(seed: int = 0):
    """A new instance of the tiny reference modules (the export wrappers change attention processors)."""
    from wan_trt.reference_models import build_reference_models

    return build_reference_models(get_preset("tiny"), seed=seed, vocab_size=build_tiny_tokenizer().get_vocab_size())


def as_torch(feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in feed.items()}


def diffusers_animate_pipeline(models, image_processor):
    """diffusers' WanAnimatePipeline over the tiny reference ``models`` (offline tokenizer, the preset's scheduler)."""
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import PreTrainedTokenizerFast

    return WanAnimatePipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(), pad_token="<pad>",
                                          eos_token="</s>", unk_token="<unk>"),
        text_encoder=models.text_encoder, vae=models.vae, image_encoder=models.image_encoder,
        transformer=models.transformer, image_processor=image_processor,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=5.0),
    )

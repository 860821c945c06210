"""Shared fixtures. Every tiny build a test needs (fp32, fp16, bf16, the calibration cache, fp8, int8, FP8 VAE
convs, FP8 over bf16) is made once and cached on disk, keyed by a hash of the code and library versions
(``_code_key``), so one test session (and every parallel worker of it) makes each at most once and later sessions reuse them.

Tests that need such a build are marked ``slow`` automatically (the suite runs ``-m "not slow"`` first).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from wan_trt.presets import get_preset
from wan_trt.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = Path(os.environ.get("WAN_TRT_TEST_CACHE", Path.home() / ".cache" / "wan-trt" / "test-engines"))
CALIBRATION_STEPS, CALIBRATION_FRAMES = 4, 9  # the shared calibration: 2 demo samples, 64×48, 9 frames, 4 steps
ALL_BLOCKS_POLICY = ROOT / "calibration" / "all_blocks_policy.json"
BUILD_FIXTURES = {"tiny_engines", "tiny_build", "manifest", "ort_engines", "torch_engines_", "tiny_build_log"}


def pytest_collection_modifyitems(items):
    """A test that uses a tiny build (directly or through a fixture) is slow: it runs in the second tier."""
    for item in items:
        if BUILD_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def preset():
    return get_preset("tiny")


@functools.cache
def _code_key() -> str:
    """Hash of the package (its modules and policy files), this file (the builds' recipes) and the exporting
    libraries' versions: a cached build is reused while they hold. Every build runs code from every stage (the
    build, its verification, calibration), so one key covers them all; a narrower key for the fp32 build once
    missed ``wan_trt/random_weights.py``, and CI reused a base whose weights no longer matched a fresh build's.
    The checkout's folder and environment are in the key too: a cache shared by two checkouts is not reused
    across them (CI once failed on a base whose ONNX files held another folder's paths, most likely one made
    by a run in another checkout under the same home folder)."""
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {diffusers.__version__} {transformers.__version__} "
                            f"{onnx.__version__} {onnxruntime.__version__} {ROOT} {sys.prefix}".encode())
    files = [file for folder in ("wan_trt", "export", "calibration", "runtime")
             for file in sorted((ROOT / folder).rglob("*")) if file.suffix in (".py", ".json")]
    for file in [*files, Path(__file__).resolve()]:
        digest.update(file.relative_to(ROOT).as_posix().encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def cached(name: str, key: str, make: Callable[[Path], object]) -> Path:
    """``CACHE_ROOT/key/name`` (an engines directory or a file), made by ``make(path)`` unless an earlier
    session or worker finished it (marked by ``name.done``, written last). A file lock makes parallel
    workers wait for one maker instead of building twice."""
    out = CACHE_ROOT / key / name
    done = out.with_name(f"{name}.done")
    if done.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(f"{name}.lock"))):
        if not done.is_file():
            logging.getLogger("onnx_ir").setLevel(logging.WARNING)
            make(out)
            done.touch()
    return out


def _cli_build(out: Path) -> None:
    """``wan-trt build --preset tiny`` in a subprocess, as a user runs it; its exit code and output are kept
    beside the directory for tests/test_cli.py."""
    result = subprocess.run([sys.executable, "-m", "wan_trt.cli", "build", "--preset", "tiny", "--out", str(out)],
                            check=False, capture_output=True, text=True, timeout=1800)
    log = {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
    out.with_name(f"{out.name}.cli.json").write_text(json.dumps(log))
    assert result.returncode == 0, result.stderr[-3000:]


def _calibration(out: Path) -> None:
    from wan_trt.calibration.collect import run_calibration
    from wan_trt.demo_media import make_demo_inputs

    scratch = out.with_name(f"{out.name}.samples")
    samples = [make_demo_inputs(scratch / f"s{i}", width=64, height=48, num_frames=CALIBRATION_FRAMES, seed=i)
               for i in range(2)]
    run_calibration(tiny_build("fp32"), samples, out, steps=CALIBRATION_STEPS, method="max", percentile=99.99,
                    segment_frames=CALIBRATION_FRAMES)


def _build(**options) -> Callable[[Path], object]:
    def make(out: Path) -> Path:
        from wan_trt.export.build import build_engines

        return build_engines(get_preset("tiny"), out, seed=0, **options)
    return make


def _quantized(precision: str, policy: Path | None = None, high_precision: str = "fp32") -> Callable[[Path], object]:
    def make(out: Path) -> Path:
        from wan_trt.calibration.quantized import QuantizationRequest

        request = QuantizationRequest(precision, tiny_build("calibration"), policy, high_precision=high_precision)
        return _build(quantization=request)(out)
    return make


def _fp8_with_vae_convs(out: Path) -> Path:
    from wan_trt.calibration.policy import DEFAULT_POLICY_FILE

    policy = out.with_name(f"{out.name}.policy.json")
    policy.write_text(json.dumps({**json.loads(DEFAULT_POLICY_FILE.read_text()), "vae_decoder_convs": True}))
    return _quantized("fp8", policy)(out)


# name -> maker, all cached under one key (``_code_key``). Every build is the tiny preset with
# seed 0 (the same weights).
TINY_BUILDS: dict[str, Callable[[Path], object]] = {
    "fp32": _cli_build,
    "fp16": _build(precision="fp16"),
    "bf16": _build(precision="bf16"),
    "calibration": _calibration,  # a cache file: 2 samples, every step, method max
    "fp8": _quantized("fp8"),  # the default policy over fp32
    "int8": _quantized("int8"),
    "fp8-vae": _fp8_with_vae_convs,  # the default policy + the VAE decoder's convs
    "fp8-over-bf16": _quantized("fp8", ALL_BLOCKS_POLICY, "bf16"),  # every block's Linears
}


def tiny_build(kind: str) -> Path:
    """The cached tiny build ``kind`` (a key of ``TINY_BUILDS``): an engines directory, or the calibration file."""
    return cached(f"{kind}.json" if kind == "calibration" else kind, _code_key(), TINY_BUILDS[kind])


@pytest.fixture(name="tiny_build", scope="session")
def tiny_build_fixture() -> Callable[[str], Path]:
    return tiny_build


@pytest.fixture(scope="session")
def tiny_engines() -> Path:
    """The tiny preset's fp32 engines (seed 0), built by ``wan-trt build`` (about 2 minutes on 2 cores)."""
    return tiny_build("fp32")


@pytest.fixture(scope="session")
def tiny_build_log(tiny_engines) -> dict:
    """Exit code, stdout and stderr of the ``wan-trt build`` that made ``tiny_engines``."""
    return json.loads(tiny_engines.with_name(f"{tiny_engines.name}.cli.json").read_text())


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

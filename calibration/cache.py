"""The calibration cache: per-layer activation ranges of the DiT, stamped with the weights they belong to.

JSON, keyed by module path (``transformer.blocks.4.attn1.to_q``), each entry holding the per-tensor
``amax`` (by the chosen method) and the per-input-channel ``channel_amax`` (for SmoothQuant), plus the
ONNX tensor that feeds the layer in the fp32 graph where known. Stamped with the weights hash, the
preset, the sample set, the sampling (sampler, steps, shift and the sigmas they give), the device and the
DiT's arithmetic (``fp32``/``bf16``) it was measured in (the last three absent from caches made before they
were recorded); a cache for other weights is refused, and ``infer`` refuses quantized engines whose cache was
made for another schedule.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan_trt.errors import BadInputError
from wan_trt.json_files import write_json_atomic
from wan_trt.runtime.samplers import Sampling, same_schedule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class LayerStats:
    amax: float
    channel_amax: list[float]
    calls: int = 0
    onnx_tensor: str | None = None
    rows: int = 0  # token rows observed over all calls


@dataclass
class CalibrationCache:
    weights_hash: str
    preset: str
    method: str
    samples: list[str]
    steps: int
    layers: dict[str, LayerStats] = field(default_factory=dict)
    percentile: float | None = None
    target: str | None = None  # mse: the format the error was minimised for (fp8 or int8)
    guidance_scale: float = 1.0  # > 1: both CFG branches were observed
    sampling: dict[str, Any] | None = None  # Sampling.to_json(); None in caches made before it was recorded
    device: str | None = None  # cpu or cuda; None: a cache from before it was recorded
    dtype: str | None = None  # the DiT's arithmetic while observed (fp32, bf16); None: as for device

    @classmethod
    def from_channel_maxima(cls, channel_amax: dict[str, list[float]], preset: str, sample: str) -> CalibrationCache:
        """A max-method cache of one observation (``AmaxObserver(channels=True)``): each layer's per-input-channel
        maxima and their maximum; for benchmarks and tests that calibrate on a forward of their own."""
        layers = {name: LayerStats(max(values), list(values)) for name, values in channel_amax.items()}
        return cls(weights_hash="observed", preset=preset, method="max", samples=[sample], steps=1, layers=layers)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "weights_hash": self.weights_hash, "preset": self.preset,
            "method": self.method, "percentile": self.percentile, "target": self.target,
            "guidance_scale": self.guidance_scale, "device": self.device, "dtype": self.dtype,
            "samples": self.samples, "steps": self.steps, "sampling": self.sampling,
            "layers": {k: vars(v) for k, v in self.layers.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file beside it, then rename)."""
        return write_json_atomic(path, self.to_json())

    def check_weights(self, weights_hash: str, path: str | Path) -> None:
        if self.weights_hash != weights_hash:
            raise BadInputError(
                f"calibration cache '{path}' was made for weights {self.weights_hash}, these are {weights_hash}: "
                "re-run wan-trt calibrate for these weights"
            )

    def check_schedule(self, sampling: Sampling, path: str | Path) -> None:
        """BadInputError when the cache was calibrated on another sampler or other sigmas than ``sampling``'s."""
        if self.sampling is None:
            log.warning("calibration cache '%s' was made before caches recorded their schedule: its ranges may "
                        "not cover %s (re-run wan-trt calibrate with those options to be sure)", path,
                        sampling.describe())
            return
        if not same_schedule(self.sampling, sampling.to_json()):
            raise BadInputError(
                f"these engines' calibration cache '{path}' was made for {self.sampling['options']}, this run asks "
                f"for {sampling.describe()}: run with those options, or calibrate with {sampling.describe()} "
                "and rebuild the engines with that cache")


def load_cache(path: str | Path) -> CalibrationCache:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        return CalibrationCache(
            weights_hash=data["weights_hash"], preset=data["preset"], method=data["method"],
            samples=list(data["samples"]), steps=int(data["steps"]), percentile=data.get("percentile"),
            target=data.get("target"), guidance_scale=float(data.get("guidance_scale", 1.0)),
            sampling=data.get("sampling"), device=data.get("device"), dtype=data.get("dtype"),
            layers={k: LayerStats(**v) for k, v in data["layers"].items()},
        )
    except FileNotFoundError:
        raise BadInputError(f"calibration cache '{path}' does not exist: make one with wan-trt calibrate --out {path}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"calibration cache '{path}' is not valid ({error}): re-run wan-trt calibrate") from None


# bf16 arithmetic against fp32 (or another device's bf16 kernels): the largest relative difference of a range
# calibrated on the tiny presets (4 steps of 2 samples; bf16 rounds to 2^-8 and the rounding compounds through
# the blocks and the steps), per-channel maxima relative to their layer's range (tests/test_calibrate_device.py)
BF16_RANGE_TOLERANCE = 0.05


def range_differences(reference: CalibrationCache, other: CalibrationCache) -> dict[str, float]:
    """The largest relative difference of ``other``'s ranges from ``reference``'s, per kind: ``dit`` (Linear and
    attention inputs), ``softmax``, ``vae`` (conv inputs) and ``channel`` (per-channel maxima over their layer's
    range). BadInputError where the two do not cover the same layers and calls."""
    if set(reference.layers) != set(other.layers):
        missing = sorted(set(reference.layers) ^ set(other.layers))
        raise BadInputError(f"the caches cover different layers ({len(missing)}, e.g. {missing[0]}): "
                            "calibrate both from the same engines")
    worst = {"dit": 0.0, "softmax": 0.0, "vae": 0.0, "channel": 0.0}
    for path, want in reference.layers.items():
        got = other.layers[path]
        if (got.calls, got.rows, len(got.channel_amax)) != (want.calls, want.rows, len(want.channel_amax)):
            raise BadInputError(f"{path}: the caches observed different calls: calibrate both on the same samples")
        kind = "softmax" if path.endswith(".softmax") else "vae" if path.startswith("vae.") else "dit"
        worst[kind] = max(worst[kind], abs(got.amax - want.amax) / want.amax if want.amax else float(got.amax != 0))
        if want.channel_amax and want.amax:
            channel = max(abs(a - b) for a, b in zip(got.channel_amax, want.channel_amax)) / want.amax
            worst["channel"] = max(worst["channel"], channel)
    return worst

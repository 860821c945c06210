"""Histogram calibration: a per-tensor range chosen by searching, not by taking the largest value.

A layer's |x| values over every observed call are accumulated in a fixed-width histogram whose range
grows (by merging bins pairwise) when a larger value arrives, so memory is constant per layer. The
range (``amax``) is then searched over candidate clipping points:

* ``mse``: the amax whose quantize-dequantize error, over the histogram, is smallest for the target
  format (FP8 E4M3 or INT8) — clipping error above amax plus rounding error below it;
* ``entropy``: TensorRT's classic INT8 entropy calibration — the amax minimising the KL divergence
  between the clipped distribution and its 128-level quantized version.
"""

from __future__ import annotations

import numpy as np
import torch

from wan_trt.calibration.quantize import QMAX, fake_quant

BINS = 2048
_CHUNK = 1 << 24  # values histogrammed at once (float32 counts are exact up to 2^24)


class AbsHistogram:
    """Counts of |x| in ``BINS`` equal bins over [0, upper); ``upper`` doubles as needed."""

    def __init__(self) -> None:
        self.counts = np.zeros(BINS, dtype=np.float64)
        self.upper = 0.0
        self.largest = 0.0  # the largest |x| seen: no candidate amax goes past it

    def add(self, values: torch.Tensor) -> None:
        """Count |``values``| (any float dtype, any device): one host sync per call; |x| in fp32 is made
        ``_CHUNK`` values at a time (each chunk's counts exact in histc's float32)."""
        values = values.detach().reshape(-1)
        if values.numel():
            low, high = torch.aminmax(values)
            top = float(torch.maximum(high, -low))
        else:
            top = 0.0
        self.largest = max(self.largest, top)
        if top <= 0.0:
            self.counts[0] += values.numel()
            return
        if self.upper == 0.0:
            self.upper = top * 1.0001
        while top >= self.upper:  # merge bins pairwise: the range doubles, the bin count stays
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2)])
            self.upper *= 2.0
        total = torch.zeros(BINS, dtype=torch.float64, device=values.device)
        for chunk in values.split(_CHUNK):
            total += torch.histc(chunk.to(torch.float32).abs(), bins=BINS, min=0.0, max=self.upper).double()
        self.counts += total.cpu().numpy()

    def centers(self) -> np.ndarray:
        width = self.upper / BINS
        return (np.arange(BINS) + 0.5) * width


def _candidates(hist: AbsHistogram, count: int = 128) -> np.ndarray:
    """Clipping points from the bin holding the 99th percentile of |x| up to the largest value seen."""
    cumulative = np.cumsum(hist.counts)
    last = int(np.nonzero(hist.counts)[0][-1]) + 1
    start = int(np.searchsorted(cumulative, 0.99 * cumulative[-1])) + 1
    edges = np.unique(np.linspace(max(start, 1), last, count).round().astype(int))
    return np.minimum(edges * (hist.upper / BINS), hist.largest)


def mse_amax(hist: AbsHistogram, precision: str) -> float:
    """The amax with the least quantization error (squared, count-weighted) over the histogram."""
    if hist.upper == 0.0:
        return 0.0
    centers = torch.from_numpy(hist.centers()).float()
    weights = hist.counts
    best, best_error = float(hist.upper), np.inf
    for amax in _candidates(hist):
        scale = float(amax) / QMAX[precision]
        error = ((fake_quant(centers, scale, precision) - centers) ** 2).double().numpy()
        total = float((error * weights).sum())
        if total < best_error:
            best, best_error = float(amax), total
    return best


def entropy_amax(hist: AbsHistogram, levels: int = 128) -> float:
    """TensorRT's INT8 entropy calibration: the clipping bin minimising KL(P || Q)."""
    counts = hist.counts
    if hist.upper == 0.0 or counts.sum() == 0:
        return 0.0
    width = hist.upper / BINS
    last = max(int(np.nonzero(counts)[0][-1]) + 1, levels)
    best, best_kl = last, np.inf
    for stop in range(levels, last + 1, max(1, (last - levels) // 128)):
        reference = counts[:stop].copy()
        reference[stop - 1] += counts[stop:].sum()  # the clipped mass goes to the last kept bin
        nonzero = counts[:stop] > 0
        # merge the kept bins into ``levels`` groups; spread each group's mass over its nonzero bins
        starts = np.array([g[0] for g in np.array_split(np.arange(stop), levels)])
        mass = np.add.reduceat(counts[:stop], starts)
        filled = np.add.reduceat(nonzero.astype(np.float64), starts)
        group_of = np.repeat(np.arange(levels), np.diff(np.append(starts, stop)))
        quantized = np.where(nonzero, mass[group_of] / np.maximum(filled[group_of], 1.0), 0.0)
        p = reference / reference.sum()
        q = quantized / max(quantized.sum(), 1e-30)
        keep = p > 0
        if np.any(q[keep] == 0):
            continue
        kl = float(np.sum(p[keep] * np.log(p[keep] / q[keep])))
        if kl < best_kl:
            best, best_kl = stop, kl
    return min(best * width, hist.largest)

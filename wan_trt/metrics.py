"""Error metrics used by build checks, ``--compare`` and the tests (numpy only)."""

from __future__ import annotations

import numpy as np


def relative_l2(got, want) -> float:
    """‖got − want‖ / ‖want‖ in float64 (the plain norm of the difference when ``want`` is zero)."""
    got64, want64 = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    denominator = np.linalg.norm(want64)
    numerator = np.linalg.norm(got64 - want64)
    return float(numerator / denominator) if denominator > 0 else float(numerator)


def max_abs(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)), initial=0.0))


def psnr(got, want, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    mse = float(np.mean((np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)

"""The runtime's flow-matching samplers by name, and :class:`Sampling`: which one a generation uses on which schedule.

* ``unipc`` — :class:`~wan_trt.runtime.scheduler.FlowUniPCScheduler` (the official default).
* ``euler`` — :class:`FlowEulerSampler`: ``x_next = x + (sigma_next - sigma) * v``. Equals diffusers'
  ``FlowMatchEulerDiscreteScheduler(shift=shift)`` driven by ``set_timesteps(sigmas=…)`` with ComfyUI's
  "simple" spacing (``flow_schedules``); diffusers' own Euler spacing (``set_timesteps(n)``) is not used:
  it shifts its smallest sigma twice and is not what the few-step LoRAs were trained on.
* ``dpmpp`` — :class:`FlowDPMSolverSampler`: DPM-Solver++ (2M, midpoint, data prediction ``x0 = x - sigma * v``).
  Equals diffusers' ``DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=shift)`` with every other argument at its default (order 2, lower_order_final, final sigma 0).
  The official Wan code's dpm++ spaces its steps as ``linspace(1, 0, n + 1)[:n]`` instead: give those with
  ``--sigmas`` to reproduce it.

Every update is computed like its diffusers counterpart (the same 0-d float32 scalars in the same order;
the sample in float32), so the trajectories agree to float32 rounding (``tests/test_scheduler.py``). One
difference: diffusers returns Euler's and DPM++'s sample in the velocity's dtype, these in the sample's (the
pipeline keeps both in float32, where the two agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wan_trt.errors import BadInputError
from wan_trt.runtime.flow_schedules import FlowSampler, check_sigmas
from wan_trt.runtime.scheduler import FlowUniPCScheduler

__all__ = ["SAMPLERS", "FlowDPMSolverSampler", "FlowEulerSampler", "Sampling"]


class FlowEulerSampler(FlowSampler):
    """Flow Euler: one velocity per step, no history; float timesteps ``T * sigma`` (1000, 937.5, …)."""

    spacing = "simple"
    integer_timesteps = False

    def _step(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (sample.to(torch.float32) + dt.to(sample.device, non_blocking=True) * velocity).to(sample.dtype)


class FlowDPMSolverSampler(FlowSampler):
    """DPM-Solver++(2M) for flow models: first order on the first and the last step, second order between.

    With ``alpha = 1 - sigma``, ``lambda = log(alpha) - log(sigma)``, ``h = lambda_next - lambda``::

        x_next = (sigma_next / sigma) * x - alpha_next * (exp(-h) - 1) * (m0 + 0.5 * D1),
        D1 = (m0 - m1) / r,  r = (lambda - lambda_prev) / h

    (``D1 = 0`` on a first-order step), ``m0``/``m1`` the data predictions at this and the previous step.
    A first sigma of exactly 1 (``--sigmas 1,…``) is fine: its lambda is -inf, which makes the first step
    ``x_next = sigma_next * x + alpha_next * m0`` and the second one's ``D1`` 0, as in diffusers.
    """

    spacing = "dpmpp"

    def _start(self) -> None:
        self._previous_x0: torch.Tensor | None = None

    def _step(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = sample - self.sigmas[index] * velocity
        previous, self._previous_x0 = self._previous_x0, x0
        sigma_t, sigma_s = self.sigmas[index + 1], self.sigmas[index]
        alpha_t, alpha_s = 1 - sigma_t, 1 - sigma_s
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        ratio = sigma_t / sigma_s
        c_x0 = alpha_t * (torch.exp(-h) - 1.0)
        first_order = previous is None or index == self.num_inference_steps - 1
        if first_order:
            ratio, c_x0 = torch.stack([ratio, c_x0]).to(sample.device, non_blocking=True)
            return (ratio * sample.to(torch.float32) - c_x0 * x0).to(sample.dtype)
        sigma_p = self.sigmas[index - 1]
        lambda_p = torch.log(1 - sigma_p) - torch.log(sigma_p)
        c_d1 = 1.0 / ((lambda_s - lambda_p) / h)
        c_half = 0.5 * c_x0
        ratio, c_x0, c_d1, c_half = torch.stack([ratio, c_x0, c_d1, c_half]).to(sample.device, non_blocking=True)
        d1 = c_d1 * (x0 - previous)
        return (ratio * sample.to(torch.float32) - c_x0 * x0 - c_half * d1).to(sample.dtype)


SAMPLERS: dict[str, type[FlowSampler]] = {"unipc": FlowUniPCScheduler, "euler": FlowEulerSampler,
                                          "dpmpp": FlowDPMSolverSampler}
DEFAULT_SAMPLER = "unipc"


@dataclass(frozen=True)
class Sampling:
    """A generation's sampler and schedule: ``steps`` at ``shift`` in the sampler's spacing, or explicit ``sigmas``.

    ``sigmas`` is the whole schedule ending at 0; it replaces the other two (``steps`` becomes its length - 1,
    ``shift`` None). Bad values raise :class:`BadInputError` naming the option (``--sampler``, ``--steps``,
    ``--shift``, ``--sigmas``) and the fix.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int = 20
    shift: float | None = 5.0
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise BadInputError(f"--sampler {self.sampler!r} is unknown: use one of {', '.join(SAMPLERS)}")
        if self.sigmas is not None:
            try:
                values = check_sigmas(self.sigmas)
            except ValueError as error:
                raise BadInputError(f"--sigmas {','.join(f'{v:g}' for v in self.sigmas)}: {error}") from None
            object.__setattr__(self, "sigmas", tuple(float(v) for v in values))
            object.__setattr__(self, "steps", len(values) - 1)
            object.__setattr__(self, "shift", None)
            return
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise BadInputError(f"--steps {self.steps}: give a whole number of denoising steps ≥ 1, e.g. 20")
        if self.shift is None or not (0.0 < self.shift < math.inf):
            raise BadInputError(f"--shift {self.shift}: give a finite number > 0, e.g. 5")

    def make(self) -> FlowSampler:
        """A fresh sampler on this schedule (``set_timesteps`` done)."""
        sampler = SAMPLERS[self.sampler](shift=self.shift if self.shift is not None else 1.0)
        sampler.set_timesteps(None if self.sigmas else self.steps, sigmas=self.sigmas)
        return sampler

    def schedule(self) -> list[float]:
        """The sigmas this sampling visits, final 0 included (float32 values, as the sampler stores them)."""
        return [float(v) for v in self.make().sigmas]

    def to_json(self) -> dict[str, Any]:
        """What a calibration cache records: the options and the sigmas they give."""
        return {"sampler": self.sampler, "steps": self.steps, "shift": self.shift, "sigmas": self.schedule(),
                "options": self.describe()}

    def describe(self) -> str:
        """The options that give this sampling, e.g. ``--sampler euler --steps 4 --shift 5``."""
        if self.sigmas is not None:
            return f"--sampler {self.sampler} --sigmas {','.join(f'{v:g}' for v in self.sigmas)}"
        return f"--sampler {self.sampler} --steps {self.steps} --shift {self.shift:g}"


def same_schedule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two recorded samplings (:meth:`Sampling.to_json`) visit the same sigmas with the same sampler."""
    return a["sampler"] == b["sampler"] and np.array_equal(np.float32(a["sigmas"]), np.float32(b["sigmas"]))

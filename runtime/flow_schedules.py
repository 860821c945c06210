"""Flow-matching noise schedules and the common frame of the runtime's samplers (torch + numpy, no diffusers).

``sigma`` is the noise fraction of ``x_sigma = (1 - sigma) * x0 + sigma * noise``; the DiT is told the
timestep ``T * sigma`` (``T = 1000`` training timesteps). ``shift`` moves steps towards high noise:
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``. A schedule is ``n`` decreasing sigmas in (0, 1]
followed by a final 0. Each sampler spaces ``n`` steps as its diffusers counterpart does:

* ``"unipc"``: ``linspace(1, 1/T, n + 1)[:n]``, shifted (diffusers' ``UniPCMultistepScheduler`` with
  ``use_flow_sigmas``; the official Wan FlowUniPC);
* ``"dpmpp"``: ``linspace(1 - 1/T, 0, n + 1)[:n]``, shifted (diffusers' ``DPMSolverMultistepScheduler`` with
  ``use_flow_sigmas``);
* ``"simple"`` (Euler): ComfyUI's "simple" scheduler, which picks entry ``T - int(i * T / n)`` of the table
  ``shift(k / T)``, k = 1..T: ``shift(1 - i / n)`` whenever n divides T. At 4 steps and shift 5 that is
  1, 0.9375, 0.8333…, 0.625 — the schedule LightX2V's 4-step distillation LoRA was trained on.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar, Sequence

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SPACINGS = ("unipc", "dpmpp", "simple")


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_shift(shift: object) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0.0 < float(shift) < math.inf:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    return float(shift)


def check_steps(steps: object) -> int:
    if not is_int(steps) or steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {steps!r}")
    return int(steps)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def spaced_sigmas(spacing: str, steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The ``steps`` shifted sigmas (float64, the final 0 not included) of ``spacing`` (see the module)."""
    n, big_t = check_steps(steps), num_train_timesteps
    if spacing == "unipc":
        s = np.linspace(1.0, 1.0 / big_t, n + 1)[:-1]
    elif spacing == "dpmpp":
        s = np.flip(1.0 - np.linspace(1.0, 1.0 / big_t, n + 1))[:-1]  # diffusers' float64 values, bit for bit
    elif spacing == "simple":
        stride = big_t / n  # ComfyUI's float stride and truncation, so the picks land on the same table entries
        s = np.array([(big_t - int(i * stride)) / big_t for i in range(n)])
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    return shift_sigmas(s, check_shift(shift))


def check_sigmas(sigmas: Sequence[float]) -> np.ndarray:
    """An explicit schedule as float64: at least two values, each in [0, 1], strictly decreasing, the last 0.

    Raises ValueError naming the first problem."""
    values = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    if values.size < 2:
        raise ValueError(f"a schedule needs at least two sigmas (one step), e.g. 1,0; got {len(values)}")
    bad = [float(v) for v in values if not 0.0 <= v <= 1.0]  # NaN fails both comparisons
    if bad:
        raise ValueError(f"sigma {bad[0]:g} is outside [0, 1]")
    rising = np.flatnonzero(np.diff(values) >= 0)
    if rising.size:
        i = int(rising[0])
        raise ValueError(f"sigmas must decrease strictly: {values[i]:g} is followed by {values[i + 1]:g}")
    if values[-1] != 0.0:
        raise ValueError(f"the last sigma must be 0 (the clean video), got {values[-1]:g}")
    return values


class FlowSampler:
    """The frame every flow sampler shares: the schedule, the step counter and the timestep check.

    Usage::

        sampler = FlowEulerSampler(shift=5.0)          # or FlowUniPCScheduler, FlowDPMSolverSampler
        for t in sampler.set_timesteps(steps):         # or set_timesteps(sigmas=[1.0, 0.5, 0.0])
            latents = sampler.step(model(latents, t), t, latents)

    A subclass names its ``spacing``, whether its timesteps are truncated integers (diffusers' UniPC and
    DPM++) or floats (Euler), and implements :meth:`_step`; :meth:`_start` may prepare per-schedule values.
    """

    spacing: ClassVar[str]
    integer_timesteps: ClassVar[bool] = True

    timesteps: torch.Tensor  # CPU, length n: int64 or float32
    sigmas: torch.Tensor  # float32, CPU, length n + 1, last entry 0

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 5.0) -> None:
        if not is_int(num_train_timesteps) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = check_shift(shift)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.int64 if self.integer_timesteps else torch.float32)
        self.sigmas = torch.empty(0, dtype=torch.float32)
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int | None = None,
                      sigmas: Sequence[float] | None = None) -> torch.Tensor:
        """Set the schedule, reset all multistep state and return the timesteps.

        Either ``num_inference_steps`` (this sampler's spacing at :attr:`shift`) or ``sigmas``: the whole
        schedule ending at 0, used as given (``shift`` does not apply); with both, the counts must agree.
        """
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or sigmas")
            s = spaced_sigmas(self.spacing, num_inference_steps, self.shift, self.num_train_timesteps)
        else:
            s = check_sigmas(sigmas)[:-1]
            if num_inference_steps is not None and num_inference_steps != len(s):
                raise ValueError(f"{len(s) + 1} sigmas make {len(s)} steps, not {num_inference_steps}")
        s = self._adjust(s)
        big_t = self.num_train_timesteps
        self.num_inference_steps = len(s)
        self.sigmas = torch.from_numpy(np.append(s, 0.0).astype(np.float32))
        if self.integer_timesteps:
            self.timesteps = torch.from_numpy((s * big_t).astype(np.int64))  # truncated: a first sigma near 1 → T - 1
        else:
            self.timesteps = self.sigmas[:-1] * big_t  # float32, as diffusers' FlowMatchEulerDiscreteScheduler
        self._step_index = 0
        self._start()
        return self.timesteps

    def _adjust(self, sigmas: np.ndarray) -> np.ndarray:
        """A sampler's correction of the float64 sigmas before they are stored (none by default)."""
        return sigmas

    def _start(self) -> None:
        """Reset the multistep state for a new schedule."""

    @property
    def step_index(self) -> int:
        """Index (into ``timesteps``) expected by the next call to :meth:`step`."""
        return self._step_index

    def step(self, velocity: torch.Tensor, timestep: int | float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``sigmas[i]`` to ``sigmas[i + 1]`` (``i`` = :attr:`step_index`) with the
        model's velocity ``v = noise - x0`` at ``sample``."""
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps() must be called before step()")
        i, n = self._step_index, self.num_inference_steps
        if i >= n:
            raise RuntimeError(f"all {n} steps of the schedule are done; call set_timesteps() to start again")
        self._check_timestep(timestep, i)
        out = self._step(i, velocity, sample)
        self._step_index = i + 1
        return out

    def _step(self, index: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_timestep(self, timestep: int | float | torch.Tensor, index: int) -> None:
        """Reject a timestep that is not the schedule's next one.

        Checked for Python/numpy numbers and CPU tensors; a timestep living on an accelerator is not read
        back (that would force a device sync).
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" or timestep.numel() != 1:
                return
            value = timestep.item()
        elif isinstance(timestep, (numbers.Real, np.number)):
            value = timestep
        else:
            raise ValueError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        expected = self.timesteps[index].item()
        if value != expected:
            raise ValueError(f"step {index} expects timestep {expected}, got {value}")

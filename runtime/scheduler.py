"""Flow-matching UniPC multistep sampler for the lean Wan runtime.

:class:`FlowUniPCScheduler` integrates a rectified-flow model (the network
predicts the velocity ``v = noise - x0`` of ``x_sigma = (1 - sigma) * x0 +
sigma * noise``) with the UniPC predictor-corrector of Zhao et al. (2023) in
its data-prediction form with ``B(h) = expm1(-h)`` ("bh2").

It is a self-contained re-implementation (torch + numpy only, no diffusers)
of diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=...)`` with every
other argument at its default (predict_x0=True, solver_type="bh2",
lower_order_final=True, final_sigmas_type="zero", linspace spacing, corrector
always on); ``solver_order`` 1, 2 (default) and 3 are supported.
``tests/test_scheduler.py`` proves the schedule identical and every
intermediate latent equal to diffusers (bit-for-bit on CPU).

Rounding is reproduced, not just the math: the per-step scalars are computed
as 0-d float32 CPU tensors in diffusers' operation order, moved to the
latents' device as one tiny tensor (non-blocking, no sync) and applied with
the same operand kinds and order as diffusers, so dtype promotion (e.g. bf16
latents) behaves the same. The big tensors never leave their device.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["FlowUniPCScheduler"]

_MAX_ORDER = 3
# diffusers nudges a first sigma of exactly 1 down by this much so that
# log(alpha) = log(1 - sigma) stays finite.
_SIGMA_ONE_EPS = 1e-6


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class FlowUniPCScheduler:
    """UniPC multistep sampler (predictor UniP + corrector UniC) for flow models.

    Usage::

        sched = FlowUniPCScheduler(shift=5.0)
        for t in sched.set_timesteps(steps):
            latents = sched.step(model(latents, t), t, latents)
    """

    timesteps: torch.Tensor  # int64, CPU, length n
    sigmas: torch.Tensor  # float32, CPU, length n + 1, last entry 0

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0, solver_order: int = 2) -> None:
        if not _is_int(num_train_timesteps) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0.0 < float(shift) < float("inf"):
            raise ValueError(f"shift must be a positive finite number, got {shift!r}")
        if not _is_int(solver_order) or not 1 <= solver_order <= _MAX_ORDER:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")

        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.solver_order = int(solver_order)

        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.int64)
        self.sigmas = torch.empty(0, dtype=torch.float32)
        self._lambdas: list[torch.Tensor] = []
        self._reset_state()

    # ------------------------------------------------------------------ schedule

    def _reset_state(self) -> None:
        self._step_index = 0
        self._x0_history: list[torch.Tensor] = []  # newest last, at sigma indices step-1, step-2, ...
        self._last_sample: torch.Tensor | None = None  # input of the previous predictor
        self._last_order = 0  # order of the previous predictor (= order of this step's corrector)

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Build the shifted flow schedule, reset all multistep state and return the timesteps.

        sigmas: ``s_i = linspace(1, 1/T, n + 1)[i]`` for i < n, shifted to
        ``shift * s / (1 + (shift - 1) * s)`` in float64, with ``s_0 = 1``
        nudged to ``1 - 1e-6``; a final 0 is appended and the result cast to
        float32. timesteps: ``int64(s_i * T)`` from the float64 sigmas
        (truncation, so the first timestep is ``T - 1``).
        """
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = int(num_inference_steps)
        big_t = self.num_train_timesteps

        s = np.linspace(1.0, 1.0 / big_t, n + 1)[:-1]
        s = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        if abs(s[0] - 1.0) < _SIGMA_ONE_EPS:
            s[0] -= _SIGMA_ONE_EPS

        self.num_inference_steps = n
        self.timesteps = torch.from_numpy((s * big_t).astype(np.int64))
        self.sigmas = torch.from_numpy(np.append(s, 0.0).astype(np.float32))
        # Half-log-SNR lambda = log(alpha) - log(sigma), alpha = 1 - sigma, one
        # 0-d float32 tensor at a time (as diffusers). sigma = 0 (lambda = +inf)
        # only occurs as the target of the last step, which step() handles apart.
        self._lambdas = [torch.log(1 - sig) - torch.log(sig) for sig in self.sigmas[:-1]]
        self._reset_state()
        return self.timesteps

    @property
    def step_index(self) -> int:
        """Index (into ``timesteps``) expected by the next call to :meth:`step`."""
        return self._step_index

    # -------------------------------------------------------------- coefficients

    def _coefficients(self, base: int, order: int, corrector: bool) -> tuple[torch.Tensor, int]:
        """Scalars of one UniP (``corrector=False``) or UniC update from sigma index ``base`` to ``base + 1``.

        With ``h = lambda_{base+1} - lambda_base``, ``hh = -h`` and ``B = expm1(hh)``::

            x_next = ratio * x - c_m0 * m0 - c_res * sum_k rho_k * D_k

        ``m0`` is the data prediction at ``base``; ``D_k = (m_k - m0) / r_k``
        are divided differences against the older predictions ``m_k`` at
        ``base - k`` with ``r_k = (lambda_{base-k} - lambda_base) / h``; the
        corrector adds a last term ``D = m_new - m0`` (``r = 1``). ``rho``
        solves ``R rho = b`` with ``R[i][k] = r_k ** i`` and
        ``b_i = i! * h_phi_{i+1}(hh) / B`` (UniC uses the full system, UniP
        drops its last row/column); UniP-2 and UniC-1 use ``rho = 0.5``.

        Returns a float32 CPU vector ``[ratio, c_m0, c_res, r_1.., rho_1..]``
        and the number of ``r_k`` entries.
        """
        lam_s0 = self._lambdas[base]
        h = self._lambdas[base + 1] - lam_s0
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)

        rks = [(self._lambdas[base - k] - lam_s0) / h for k in range(1, order)]
        r_vec = torch.stack(rks + [torch.ones(())])

        # h_phi recursion: g_1 = h_phi_1 / hh - 1, g_{i+1} = g_i / hh - 1 / (i+1)!
        rows, b = [], []
        g = h_phi_1 / hh - 1
        factorial = 1
        for i in range(1, order + 1):
            rows.append(torch.pow(r_vec, i - 1))
            b.append(g * factorial / b_h)
            factorial *= i + 1
            g = g / hh - 1 / factorial
        r_mat, b_vec = torch.stack(rows), torch.stack(b)

        if corrector:
            rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(r_mat, b_vec)
        elif order == 1:
            rhos = torch.empty(0)
        elif order == 2:
            rhos = torch.full((1,), 0.5)
        else:
            rhos = torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])

        sigma_t = self.sigmas[base + 1]
        alpha_t = 1 - sigma_t
        head = torch.stack([sigma_t / self.sigmas[base], alpha_t * h_phi_1, alpha_t * b_h] + rks)
        return torch.cat([head, rhos]), len(rks)

    def _update(
        self,
        base: int,
        order: int,
        x: torch.Tensor,
        m0: torch.Tensor,
        m_new: torch.Tensor | None,
    ) -> torch.Tensor:
        """Apply one UniP (``m_new is None``) or UniC update to ``x`` (see :meth:`_coefficients`).

        ``self._x0_history[-1 - k]`` must be the data prediction at ``base - k``.
        """
        coef, n_r = self._coefficients(base, order, corrector=m_new is not None)
        coef = coef.to(x.device, non_blocking=True)  # tiny; no host sync
        ratio, c_m0, c_res = coef[0], coef[1], coef[2]
        rks = coef[3 : 3 + n_r]
        rhos = coef[3 + n_r :].to(x.dtype)

        out = ratio * x - c_m0 * m0
        residual = None
        for k in range(n_r):
            term = rhos[k] * ((self._x0_history[-2 - k] - m0) / rks[k])
            residual = term if residual is None else residual + term
        if m_new is not None:
            term = rhos[-1] * (m_new - m0)
            residual = term if residual is None else residual + term
        if residual is not None:
            out = out - c_res * residual
        return out.to(x.dtype)

    # ---------------------------------------------------------------------- step

    def step(self, velocity: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from ``sigmas[i]`` to ``sigmas[i + 1]`` (``i`` = :attr:`step_index`).

        UniPC order of operations: turn the velocity into a data prediction
        ``x0 = sample - sigma * v``; from the second step on, correct
        ``sample`` (UniC) using that ``x0`` (the model is not re-evaluated at
        the corrected sample); then predict (UniP) the next sample from the
        corrected sample and the ``x0`` history. The order warms up 1, 2, ...
        and falls back to 1 on the last step.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps() must be called before step()")
        i = self._step_index
        n = self.num_inference_steps
        if i >= n:
            raise RuntimeError(f"all {n} steps of the schedule are done; call set_timesteps() to start again")
        self._check_timestep(timestep, i)

        x0 = sample - self.sigmas[i] * velocity

        # The last step is order 1 towards sigma = 0 (alpha = 1, h = inf), where
        # the UniP update is 0 * sample + x0: exactly the data prediction. The
        # corrector would only change `sample`, whose weight is 0, so skip it.
        if i == n - 1:
            self._step_index = n
            self._x0_history = []
            self._last_sample = None
            return x0.to(sample.dtype)

        if self._last_sample is not None:
            sample = self._update(i - 1, self._last_order, self._last_sample, self._x0_history[-1], x0)

        order = min(self.solver_order, n - i, len(self._x0_history) + 1)
        self._x0_history = (self._x0_history + [x0])[-self.solver_order :]
        self._last_sample = sample
        self._last_order = order
        self._step_index = i + 1
        return self._update(i, order, sample, x0, None).to(sample.dtype)

    def _check_timestep(self, timestep: int | torch.Tensor, index: int) -> None:
        """Reject a timestep that is not the schedule's next one.

        Checked for Python/numpy numbers and CPU tensors; a timestep living on
        an accelerator is not read back (that would force a device sync).
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.device.type != "cpu" or timestep.numel() != 1:
                return
            value = timestep.item()
        elif isinstance(timestep, (numbers.Real, np.number)):
            value = timestep
        else:
            raise ValueError(f"timestep must be an int or a tensor, got {type(timestep).__name__}")
        expected = int(self.timesteps[index])
        if value != expected:
            raise ValueError(f"step {index} expects timestep {expected}, got {value}")

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

import numpy as np
import torch

from wan_trt.runtime.flow_schedules import NUM_TRAIN_TIMESTEPS, FlowSampler, is_int

__all__ = ["FlowUniPCScheduler"]

_MAX_ORDER = 3
# diffusers nudges a first sigma of exactly 1 down by this much so that
# log(alpha) = log(1 - sigma) stays finite.
_SIGMA_ONE_EPS = 1e-6


class FlowUniPCScheduler(FlowSampler):
    """UniPC multistep sampler (predictor UniP + corrector UniC) for flow models.

    Usage::

        sched = FlowUniPCScheduler(shift=5.0)
        for t in sched.set_timesteps(steps):
            latents = sched.step(model(latents, t), t, latents)
    """

    spacing = "unipc"

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = 5.0,
                 solver_order: int = 2) -> None:
        if not is_int(solver_order) or not 1 <= solver_order <= _MAX_ORDER:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        super().__init__(num_train_timesteps, shift)
        self.solver_order = int(solver_order)
        self._lambdas: list[torch.Tensor] = []
        self._start()

    # ------------------------------------------------------------------ schedule

    def _adjust(self, sigmas: np.ndarray) -> np.ndarray:
        """The spacing (``linspace(1, 1/T, n + 1)[:n]`` shifted in float64) or the given sigmas, with a first
        sigma of 1 nudged to ``1 - 1e-6`` as diffusers does; timesteps are then ``int64(s_i * T)`` (truncation,
        so the first timestep is ``T - 1``)."""
        if abs(sigmas[0] - 1.0) < _SIGMA_ONE_EPS:
            sigmas = sigmas.copy()
            sigmas[0] -= _SIGMA_ONE_EPS
        return sigmas

    def _start(self) -> None:
        # Half-log-SNR lambda = log(alpha) - log(sigma), alpha = 1 - sigma, one
        # 0-d float32 tensor at a time (as diffusers). sigma = 0 (lambda = +inf)
        # only occurs as the target of the last step, which _step() handles apart.
        self._lambdas = [torch.log(1 - sig) - torch.log(sig) for sig in self.sigmas[:-1]]
        self._x0_history: list[torch.Tensor] = []  # newest last, at sigma indices step-1, step-2, ...
        self._last_sample: torch.Tensor | None = None  # input of the previous predictor
        self._last_order = 0  # order of the previous predictor (= order of this step's corrector)

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

    def _step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """UniPC order of operations: turn the velocity into a data prediction
        ``x0 = sample - sigma * v``; from the second step on, correct
        ``sample`` (UniC) using that ``x0`` (the model is not re-evaluated at
        the corrected sample); then predict (UniP) the next sample from the
        corrected sample and the ``x0`` history. The order warms up 1, 2, ...
        and falls back to 1 on the last step.
        """
        n = self.num_inference_steps
        x0 = sample - self.sigmas[i] * velocity

        # The last step is order 1 towards sigma = 0 (alpha = 1, h = inf), where
        # the UniP update is 0 * sample + x0: exactly the data prediction. The
        # corrector would only change `sample`, whose weight is 0, so skip it.
        if i == n - 1:
            self._x0_history = []
            self._last_sample = None
            return x0.to(sample.dtype)

        if self._last_sample is not None:
            sample = self._update(i - 1, self._last_order, self._last_sample, self._x0_history[-1], x0)

        order = min(self.solver_order, n - i, len(self._x0_history) + 1)
        self._x0_history = (self._x0_history + [x0])[-self.solver_order :]
        self._last_sample = sample
        self._last_order = order
        return self._update(i, order, sample, x0, None).to(sample.dtype)

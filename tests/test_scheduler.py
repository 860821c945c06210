"""The runtime's flow samplers must reproduce their diffusers counterparts step by step.

UniPC: diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
num_train_timesteps=1000, flow_shift=shift)`` (other arguments at their defaults). Euler:
``FlowMatchEulerDiscreteScheduler(shift=shift)`` on ComfyUI's "simple" spacing. DPM++:
``DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)``.
Both sides run independent denoising loops driven by the same deterministic fake model; every
intermediate latent is compared. The schedules themselves are checked against published numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wan_trt.runtime.samplers import FlowDPMSolverSampler, FlowEulerSampler
from wan_trt.runtime.scheduler import FlowUniPCScheduler

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 16, 6, 8, 8)
# Measured on CPU: error 0.0 (bit-identical) in every case below, float32, bfloat16 and mixed
# dtypes alike. The bounds only leave room for float32 rounding-order differences.
REL_MAX_ABS_TOL = 1e-6
REL_L2_TOL = 1e-6


def reference(shift: float = 5.0, **kwargs) -> "diffusers.UniPCMultistepScheduler":
    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=shift,
        **kwargs,
    )


def make_model(seed: int, dtype: torch.dtype = torch.float32):
    """A deterministic stand-in for the transformer: v(x, t) = 0.3 x + n * t / 1000 - 0.1 x^2."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.randn(SHAPE, generator=gen, dtype=torch.float32).to(dtype)

    def model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * sample + fixed.to(sample.device) * (float(t) / 1000.0) - 0.1 * sample * sample

    return model


def initial_latents(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen, dtype=torch.float32).to(dtype)


def run_ours(sched: FlowUniPCScheduler, steps: int, model, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in sched.set_timesteps(steps):
        x = sched.step(model(x, t), t, x)
        out.append(x)
    return out


def run_reference(sched, steps: int, model, x: torch.Tensor) -> list[torch.Tensor]:
    sched.set_timesteps(steps)
    out = []
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
        out.append(x)
    return out


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max-abs error / max-abs of the reference, L2 error / L2 of the reference), in float64."""
    diff = ours.double() - ref.double()
    scale_max = ref.double().abs().max().item()
    scale_l2 = ref.double().norm().item()
    return diff.abs().max().item() / scale_max, diff.norm().item() / scale_l2


def assert_trajectories_match(ours, ref, rel_max=REL_MAX_ABS_TOL, rel_l2=REL_L2_TOL) -> None:
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), f"non-finite sample at step {i}"
        e_max, e_l2 = errors(a, b)
        assert e_max <= rel_max and e_l2 <= rel_l2, f"step {i}: rel max-abs {e_max:.3e}, rel L2 {e_l2:.3e}"


@pytest.mark.parametrize("steps", [1, 2, 3, 20, 50])
@pytest.mark.parametrize("shift", [5.0, 1.0, 3.0])
def test_schedule_matches_diffusers(steps: int, shift: float) -> None:
    ours = FlowUniPCScheduler(num_train_timesteps=1000, shift=shift)
    ref = reference(shift)
    ref.set_timesteps(steps)
    timesteps = ours.set_timesteps(steps)

    assert timesteps is ours.timesteps
    assert timesteps.dtype == torch.int64 and timesteps.shape == (steps,)
    assert torch.equal(timesteps, ref.timesteps)
    assert ours.sigmas.dtype == ref.sigmas.dtype
    assert ours.sigmas.shape == (steps + 1,)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas[-1].item() == 0.0


@pytest.mark.parametrize("steps", [20, 3, 1])
def test_denoising_loop_matches_diffusers(steps: int) -> None:
    model = make_model(seed=1)
    x_init = initial_latents(seed=2)
    ours = run_ours(FlowUniPCScheduler(shift=5.0), steps, model, x_init.clone())
    ref = run_reference(reference(5.0), steps, model, x_init.clone())
    assert_trajectories_match(ours, ref)
    # The fake model must actually move the latents, otherwise the comparison is empty.
    assert (ours[-1] - x_init).abs().max() > 0.1


@pytest.mark.parametrize(
    ("solver_order", "shift", "steps"),
    [(3, 5.0, 20), (3, 5.0, 3), (1, 5.0, 8), (2, 3.0, 10), (2, 1.0, 10), (2, 5.0, 50)],
)
def test_other_supported_configs_match_diffusers(solver_order: int, shift: float, steps: int) -> None:
    model = make_model(seed=3)
    x_init = initial_latents(seed=4)
    ours = run_ours(FlowUniPCScheduler(shift=shift, solver_order=solver_order), steps, model, x_init)
    ref = run_reference(reference(shift, solver_order=solver_order), steps, model, x_init)
    assert_trajectories_match(ours, ref)


@pytest.mark.parametrize(
    ("latent_dtype", "velocity_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_mixed_and_low_precision_dtypes_match_diffusers(latent_dtype, velocity_dtype) -> None:
    """Latents in one dtype, model output in another (the Wan pipeline keeps float32 latents
    and gets bf16 velocities): dtype promotion and the output dtype must follow diffusers."""
    base = make_model(seed=5, dtype=latent_dtype)

    def model(x, t):
        return base(x, t).to(velocity_dtype)

    x_init = initial_latents(seed=6, dtype=latent_dtype)
    ours = run_ours(FlowUniPCScheduler(shift=5.0), 10, model, x_init)
    ref = run_reference(reference(5.0), 10, model, x_init)
    assert all(x.dtype == latent_dtype for x in ours)
    assert_trajectories_match(ours, ref)


def test_set_timesteps_resets_state() -> None:
    model = make_model(seed=7)
    x_init = initial_latents(seed=8)
    sched = FlowUniPCScheduler(shift=5.0)
    first = run_ours(sched, 20, model, x_init)
    second = run_ours(sched, 20, model, x_init)
    for a, b in zip(first, second):
        assert torch.equal(a, b)

    # Abandon a loop halfway, then run a different length, then the original again.
    sched.set_timesteps(20)
    x = x_init
    for t in sched.timesteps[:7]:
        x = sched.step(model(x, t), t, x)
    assert sched.step_index == 7
    short = run_ours(sched, 3, model, x_init)
    third = run_ours(sched, 20, model, x_init)
    for a, b in zip(first, third):
        assert torch.equal(a, b)
    fresh_short = run_ours(FlowUniPCScheduler(shift=5.0), 3, model, x_init)
    for a, b in zip(short, fresh_short):
        assert torch.equal(a, b)


def test_step_accepts_int_and_tensor_timesteps_and_keeps_dtype() -> None:
    model = make_model(seed=9)
    x_init = initial_latents(seed=10)
    sched = FlowUniPCScheduler()
    with_tensors = run_ours(sched, 5, model, x_init)
    x = x_init
    for t in sched.set_timesteps(5).tolist():
        x = sched.step(model(x, t), int(t), x)
    assert torch.equal(x, with_tensors[-1])
    assert x.dtype == x_init.dtype and x.device == x_init.device


def test_module_does_not_import_diffusers_or_transformers(tmp_path) -> None:
    code = (
        "import sys, torch, wan_trt.runtime.samplers as m\n"
        "for name in m.SAMPLERS:\n"
        "    s = m.Sampling(sampler=name, steps=4).make(); x = torch.ones(2)\n"
        "    for t in s.timesteps: x = s.step(x, t, x)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('diffusers', 'transformers'))\n"
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_diffusers() -> None:
    model = make_model(seed=11)
    x_init = initial_latents(seed=12).cuda()
    ours = run_ours(FlowUniPCScheduler(shift=5.0), 20, model, x_init)
    ref = run_reference(reference(5.0), 20, model, x_init)
    assert all(x.is_cuda for x in ours)
    assert_trajectories_match(ours, ref, rel_max=1e-5, rel_l2=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver_order": 0},
        {"solver_order": 4},
        {"solver_order": 2.0},
        {"shift": 0.0},
        {"shift": -1.0},
        {"shift": float("inf")},
        {"shift": True},
        {"num_train_timesteps": 0},
        {"num_train_timesteps": 1000.0},
    ],
)
def test_unsupported_configuration_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FlowUniPCScheduler(**kwargs)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_count_raises(steps) -> None:
    with pytest.raises(ValueError):
        FlowUniPCScheduler().set_timesteps(steps)


def test_misuse_raises() -> None:
    x = initial_latents(seed=13)
    sched = FlowUniPCScheduler()
    with pytest.raises(RuntimeError):
        sched.step(x, 999, x)  # before set_timesteps
    timesteps = sched.set_timesteps(2)
    with pytest.raises(ValueError):
        sched.step(x, int(timesteps[1]), x)  # wrong timestep for step 0
    for t in timesteps:
        x = sched.step(x, t, x)
    with pytest.raises(RuntimeError):
        sched.step(x, timesteps[-1], x)  # past the end of the schedule


# ------------------------------------------------------------------------------------- Euler, DPM++, explicit sigmas


def euler_reference(shift: float) -> "diffusers.FlowMatchEulerDiscreteScheduler":
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def dpmpp_reference(shift: float) -> "diffusers.DPMSolverMultistepScheduler":
    return diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 num_train_timesteps=1000, flow_shift=shift)


def comfy_simple_sigmas(steps: int, shift: float) -> list[float]:
    """ComfyUI's flow model sampling (a 1000-entry float32 table of shifted t = k/1000, k = 1..1000) read by
    its "simple" scheduler: entry -(1 + int(i * 1000 / steps)) for each step, then 0."""
    t = torch.arange(1, 1001, 1) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    stride = len(table) / steps
    return [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def run_ours_on(sched, model, x: torch.Tensor) -> list[torch.Tensor]:
    """Run a sampler whose schedule is already set."""
    out = []
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x)
        out.append(x)
    return out


def run_reference_on(sched, model, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
        out.append(x)
    return out


def test_euler_4_steps_at_shift_5_is_the_distillation_schedule() -> None:
    """The schedule LightX2V's 4-step LoRA was trained on (shared/reference/recipes.md), exactly."""
    sampler = FlowEulerSampler(shift=5.0)
    timesteps = sampler.set_timesteps(4)
    want = torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0], dtype=torch.float32)
    assert torch.equal(sampler.sigmas, want)
    assert timesteps.dtype == torch.float32 and torch.equal(timesteps, want[:-1] * 1000)
    assert timesteps.tolist()[:2] == [1000.0, 937.5] and timesteps[3].item() == 625.0


def test_euler_8_steps_gives_lightx2v_s_8_step_list() -> None:
    """ModelTC/LightX2V-Wan2.2-Lightning issue 3: 1000, 972.2, 937.5, 892.9, 833.3, 750.0, 625.0, 416.7."""
    timesteps = FlowEulerSampler(shift=5.0).set_timesteps(8)
    want = [1000, 972.2, 937.5, 892.9, 833.3, 750.0, 625.0, 416.7]
    assert [round(t, 1) for t in timesteps.tolist()] == want


@pytest.mark.parametrize(("steps", "shift"), [(6, 8.0), (4, 5.0), (3, 5.0), (7, 3.0), (20, 5.0)])
def test_euler_spacing_is_comfyui_simple(steps: int, shift: float) -> None:
    """Also where 1000 / steps is not whole (6 steps: t = 1, .834, .667, .5, .334, .167, not a linspace)."""
    sampler = FlowEulerSampler(shift=shift)
    sampler.set_timesteps(steps)
    want = torch.tensor(comfy_simple_sigmas(steps, shift))
    torch.testing.assert_close(sampler.sigmas, want, rtol=0, atol=2e-7)  # ComfyUI's table is float32 arithmetic
    if steps == 6:
        assert abs(sampler.sigmas[1].item() - 8 * 0.834 / (1 + 7 * 0.834)) < 1e-7


@pytest.mark.parametrize("steps", [1, 4, 6, 20])
@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_euler_matches_diffusers_per_step(steps: int, shift: float) -> None:
    ours = FlowEulerSampler(shift=shift)
    ours.set_timesteps(steps)
    ref = euler_reference(shift)
    unshifted = [(1000 - int(i * (1000 / steps))) / 1000 for i in range(steps)]  # ComfyUI's picks before the shift
    ref.set_timesteps(sigmas=unshifted)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1.2e-7)  # float64 vs diffusers' float32 shift
    model, x_init = make_model(seed=21), initial_latents(seed=22)
    assert_trajectories_match(run_ours_on(ours, model, x_init), run_reference_on(ref, model, x_init))


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 20])
@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_dpmpp_matches_diffusers_schedule_and_per_step(steps: int, shift: float) -> None:
    ours = FlowDPMSolverSampler(shift=shift)
    timesteps = ours.set_timesteps(steps)
    ref = dpmpp_reference(shift)
    ref.set_timesteps(steps)
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    model, x_init = make_model(seed=23), initial_latents(seed=24)
    ours_run = run_ours_on(ours, model, x_init)
    assert_trajectories_match(ours_run, run_reference_on(ref, model, x_init))
    assert (ours_run[-1] - x_init).abs().max() > 0.1


EXPLICIT = [1.0, 0.9, 0.75, 0.5, 0.2, 0.0]


def test_unipc_on_explicit_sigmas_matches_diffusers() -> None:
    """``set_timesteps(sigmas=…)`` uses the sigmas as given: diffusers' at flow_shift 1 (no shift), first sigma nudged."""
    ours = FlowUniPCScheduler(shift=5.0)
    timesteps = ours.set_timesteps(sigmas=EXPLICIT)
    ref = reference(1.0)
    ref.set_timesteps(sigmas=np.array(EXPLICIT[:-1]))  # diffusers takes an array (it scales it)
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    model, x_init = make_model(seed=25), initial_latents(seed=26)
    assert_trajectories_match(run_ours_on(ours, model, x_init), run_reference_on(ref, model, x_init))


def test_dpmpp_on_explicit_sigmas_matches_diffusers_update() -> None:
    """diffusers' DPM++ takes no explicit sigmas: its schedule is replaced after set_timesteps. A first sigma of
    exactly 1 (lambda = -inf) must give finite samples on both sides."""
    ours = FlowDPMSolverSampler()
    ours.set_timesteps(sigmas=EXPLICIT)
    ref = dpmpp_reference(1.0)
    ref.set_timesteps(len(EXPLICIT) - 1)
    ref.sigmas = torch.tensor(EXPLICIT, dtype=torch.float32)
    ref.timesteps = (torch.tensor(EXPLICIT[:-1], dtype=torch.float64) * 1000).to(torch.int64)
    assert torch.equal(ours.timesteps, ref.timesteps)
    model, x_init = make_model(seed=27), initial_latents(seed=28)
    assert_trajectories_match(run_ours_on(ours, model, x_init), run_reference_on(ref, model, x_init))


def test_euler_on_explicit_sigmas_matches_diffusers() -> None:
    ours = FlowEulerSampler(shift=5.0)
    ours.set_timesteps(sigmas=EXPLICIT)
    ref = euler_reference(1.0)
    ref.set_timesteps(sigmas=np.array(EXPLICIT[:-1]))  # diffusers takes an array (it scales it)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)
    model, x_init = make_model(seed=29), initial_latents(seed=30)
    assert_trajectories_match(run_ours_on(ours, model, x_init), run_reference_on(ref, model, x_init))


@pytest.mark.parametrize("sampler_class", [FlowEulerSampler, FlowDPMSolverSampler])
def test_other_samplers_restart_and_refuse_misuse(sampler_class) -> None:
    model, x = make_model(seed=31), initial_latents(seed=32)
    sampler = sampler_class(shift=5.0)
    with pytest.raises(RuntimeError):
        sampler.step(x, 999, x)  # before set_timesteps
    sampler.set_timesteps(5)
    first = run_ours_on(sampler, model, x)
    with pytest.raises(RuntimeError):
        sampler.step(x, sampler.timesteps[-1], x)  # past the end
    sampler.set_timesteps(5)
    with pytest.raises(ValueError):
        sampler.step(x, sampler.timesteps[1], x)  # not the next timestep
    assert torch.equal(run_ours_on(sampler, model, x)[-1], first[-1])


@pytest.mark.parametrize("sigmas", [[1.0, 0.5], [1.0, 0.5, 0.7, 0.0], [1.0, 0.5, 0.5, 0.0], [1.5, 0.5, 0.0],
                                    [1.0, -0.1], [float("nan"), 0.0], [0.0], []])
@pytest.mark.parametrize("sampler_class", [FlowUniPCScheduler, FlowEulerSampler, FlowDPMSolverSampler])
def test_bad_explicit_sigmas_raise(sampler_class, sigmas) -> None:
    with pytest.raises(ValueError):
        sampler_class().set_timesteps(sigmas=sigmas)

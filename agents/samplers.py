"""Every sampler in one place: DDPM, DDIM(k), DPM-Solver++(k) and the STEP warm start.

All samplers work in the backbone's normalised action space on batches ``(B, H, A)`` and call a
denoiser ``eps = denoise(x, t, cond)`` (t: int64 tensor of shape (B,)) that they drive themselves.

Schedules come from diffusers (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``) configured like the backbone's training
schedule, and ``set_timesteps`` is called once at construction. For DDIM, whose update is the hot
path of STEP, the per-step coefficients are read from the diffusers tables into Python floats once,
and the update is two fused tensor ops (diffusers' ``step`` re-indexes tables and allocates on every
call, which is measurable next to a 5 ms network at batch 1). ``tests/test_samplers.py`` checks that
this update equals ``DDIMScheduler.step``. DDPM and DPM-Solver++ are baselines and use the
schedulers' own ``step``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from agents.backbone import PolicyConfig

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


_POLICY = PolicyConfig()  # the schedule's values are defined once, in PolicyConfig (what a backbone trains with)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule of the backbone (must match what it was trained with).

    Derived from the backbone's config (``PolicyConfig.schedule`` / ``ScheduleConfig.from_policy``); the defaults
    are ``PolicyConfig``'s own, not restated here. Only ``timestep_spacing`` (inference) is the sampler's."""

    num_train_timesteps: int = _POLICY.num_train_timesteps
    beta_schedule: str = _POLICY.beta_schedule
    beta_start: float = _POLICY.beta_start
    beta_end: float = _POLICY.beta_end
    prediction_type: str = _POLICY.prediction_type
    clip_sample: bool = _POLICY.clip_sample
    clip_sample_range: float = _POLICY.clip_sample_range
    timestep_spacing: str = "leading"  # as Diffusion Policy / LeRobot: DDIM-2 runs t = 50, 0

    def common_kwargs(self) -> dict:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
        )

    @classmethod
    def from_policy(cls, cfg) -> "ScheduleConfig":
        """Every schedule field the policy config also has (the training schedule); the rest keep defaults."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


def randn(shape, generators: list[torch.Generator] | None, device="cpu", dtype=torch.float32) -> Tensor:
    """Gaussian noise with one generator per batch row, so row i is the same whatever the batch size."""
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"Need one generator per batch row: {len(generators)} for batch {shape[0]}.")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generators])


def _timestep_tensors(timesteps) -> list[Tensor]:
    # One (1,) int64 tensor per step, expanded to the batch without copying at call time.
    return [torch.tensor([int(t)], dtype=torch.long) for t in timesteps]


class Sampler:
    """Base: ``sample(denoise, cond, shape, generators=None, x_init=None, trace=None) -> x0`` of ``shape`` (B, H, A).

    ``generators``: one torch.Generator per batch row (or None); ``x_init``: the starting sample instead of noise;
    ``trace``: a list that receives every intermediate sample."""

    name = "sampler"
    steps: int

    def sample(self, denoise: Denoiser, cond: Tensor, shape, generators=None, x_init: Tensor | None = None,
               trace: list | None = None) -> Tensor:
        raise NotImplementedError


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0) on diffusers' DDIMScheduler tables, k steps."""

    name = "ddim"

    def __init__(self, steps: int, schedule: ScheduleConfig = ScheduleConfig(), timesteps: list[int] | None = None):
        from diffusers import DDIMScheduler

        self.steps = steps
        self.schedule = schedule
        self.scheduler = DDIMScheduler(
            **schedule.common_kwargs(),
            clip_sample=schedule.clip_sample,
            clip_sample_range=schedule.clip_sample_range,
            timestep_spacing=schedule.timestep_spacing,
            set_alpha_to_one=True,
        )
        self.scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps] if timesteps is None else [int(t) for t in timesteps]
        if len(self.timesteps) != steps or any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])) \
                or not 0 <= self.timesteps[-1] <= self.timesteps[0] < schedule.num_train_timesteps:
            raise ValueError(f"DDIM timesteps {self.timesteps}: need {steps} strictly decreasing values in "
                             f"[0, {schedule.num_train_timesteps}).")
        self._t = _timestep_tensors(self.timesteps)
        abar = self.scheduler.alphas_cumprod.double()
        final = float(self.scheduler.final_alpha_cumprod)
        # Per step: x0 = (x - b_t eps) / a_t ; x_prev = a_prev x0 + b_prev eps  (diffusers' formula). Each step
        # lands on the next timestep of the list (diffusers' t - stride for its own spacings), the last on x0.
        self.coef = []
        for i, t in enumerate(self.timesteps):
            prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
            ab_t = float(abar[t])
            ab_prev = float(abar[prev]) if prev >= 0 else final
            self.coef.append((math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_prev), math.sqrt(1 - ab_prev)))
        self.start_timestep = self.timesteps[0]
        self.start_alpha = self.coef[0][0]  # sqrt(abar_k) at the first timestep: the warm-start weights
        self.start_sigma = self.coef[0][1]
        self.clip = schedule.clip_sample_range if schedule.clip_sample else None

    def run(self, denoise: Denoiser, cond: Tensor, x: Tensor, trace: list | None = None) -> Tensor:
        batch = x.shape[0]
        for t, (a_t, b_t, a_prev, b_prev) in zip(self._t, self.coef):
            eps = denoise(x, t.expand(batch), cond)
            x0 = (x - b_t * eps) / a_t
            if self.clip is not None:
                x0 = x0.clamp(-self.clip, self.clip)
            x = a_prev * x0 + b_prev * eps
            if trace is not None:
                trace.append(x)
        return x

    def sample(self, denoise, cond, shape, generators=None, x_init=None, trace=None):
        x = randn(shape, generators, cond.device) if x_init is None else x_init
        return self.run(denoise, cond, x, trace)


class DDPMSampler(Sampler):
    """Ancestral DDPM (variance "fixed_small", as DDPMScheduler's default) on diffusers' tables.

    The update is written out so each batch row draws its variance noise from its own generator
    (``DDPMScheduler.step`` draws one stream for the whole batch, which would make a row's actions
    depend on the batch size). ``tests/test_samplers.py`` checks it equals ``DDPMScheduler.step``.
    """

    name = "ddpm"

    def __init__(self, steps: int = 100, schedule: ScheduleConfig = ScheduleConfig()):
        from diffusers import DDPMScheduler

        self.steps = steps
        self.scheduler = DDPMScheduler(
            **schedule.common_kwargs(), clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
            timestep_spacing=schedule.timestep_spacing,
        )
        self.scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self._t = _timestep_tensors(self.timesteps)
        abar = self.scheduler.alphas_cumprod.double()
        stride = schedule.num_train_timesteps // steps
        self.coef = []
        for t in self.timesteps:
            prev = t - stride
            ab_t = float(abar[t])
            ab_prev = float(abar[prev]) if prev >= 0 else 1.0
            beta = 1 - ab_t / ab_prev
            c_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
            c_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
            std = math.sqrt(max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20)) if t > 0 else 0.0
            self.coef.append((math.sqrt(ab_t), math.sqrt(1 - ab_t), c_x0, c_xt, std))
        self.clip = schedule.clip_sample_range if schedule.clip_sample else None

    def step(self, eps: Tensor, index: int, x: Tensor, noise: Tensor | None) -> Tensor:
        a_t, b_t, c_x0, c_xt, std = self.coef[index]
        x0 = (x - b_t * eps) / a_t
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        mean = c_x0 * x0 + c_xt * x
        return mean if (std == 0.0 or noise is None) else mean + std * noise

    def sample(self, denoise, cond, shape, generators=None, x_init=None, trace=None):
        x = randn(shape, generators, cond.device) if x_init is None else x_init
        batch = x.shape[0]
        for i, tt in enumerate(self._t):
            eps = denoise(x, tt.expand(batch), cond)
            noise = randn(x.shape, generators, x.device) if self.coef[i][4] > 0 else None
            x = self.step(eps, i, x, noise)
            if trace is not None:
                trace.append(x)
        return x


class DPMSolverSampler(Sampler):
    """DPM-Solver++ (2nd-order multistep) with diffusers' DPMSolverMultistepScheduler, k steps.

    The scheduler keeps the previous model outputs between steps; we clear that state at the start of
    every chunk instead of calling ``set_timesteps`` again (which rebuilds all tables).
    """

    name = "dpmsolver"

    def __init__(self, steps: int, schedule: ScheduleConfig = ScheduleConfig(), solver_order: int = 2):
        from diffusers import DPMSolverMultistepScheduler

        self.steps = steps
        self.scheduler = DPMSolverMultistepScheduler(
            **schedule.common_kwargs(),
            algorithm_type="dpmsolver++",
            solver_order=solver_order,
            # DPM-Solver's own clipping is dynamic thresholding; with ratio 1.0 and max = clip range it
            # reduces to clamping x0 to [-range, range], i.e. the backbone's clip_sample.
            thresholding=schedule.clip_sample,
            dynamic_thresholding_ratio=1.0,
            sample_max_value=schedule.clip_sample_range,
            lower_order_final=True,
        )
        self.scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self._t = _timestep_tensors(self.timesteps)

    def _reset_state(self) -> None:
        s = self.scheduler
        s.model_outputs = [None] * s.config.solver_order
        s.lower_order_nums = 0
        s._step_index = None
        s._begin_index = None

    def sample(self, denoise, cond, shape, generators=None, x_init=None, trace=None):
        x = randn(shape, generators, cond.device) if x_init is None else x_init
        self._reset_state()
        batch = x.shape[0]
        for t, tt in zip(self.timesteps, self._t):
            eps = denoise(x, tt.expand(batch), cond)
            x = self.scheduler.step(eps, t, x, return_dict=False)[0]
            if trace is not None:
                trace.append(x)
        return x


@dataclass
class WarmStart:
    """STEP's warm start: noise the predicted chunk to the first timestep k of the K'-step DDIM schedule.

    x_k = lam * sqrt(abar_k) * pred + sqrt(1 - abar_k) * noise + sigma * xi
    (lam = 1, sigma = 0 is diffusers' ``add_noise``; the stall detector raises sigma / lowers lam).
    """

    sampler: DDIMSampler

    def initial(self, pred: Tensor, noise: Tensor, lam: Tensor | float = 1.0, sigma: Tensor | float = 0.0,
                xi: Tensor | None = None) -> Tensor:
        x = (self.sampler.start_alpha * lam) * pred + self.sampler.start_sigma * noise
        if xi is not None:
            x = x + sigma * xi
        return x

    def sample(self, denoise, cond, pred, generators=None, lam=1.0, sigma=0.0, trace=None) -> Tensor:
        # xi is drawn at every warm start, whatever the stall settings, so that (a) each row's random stream does
        # not depend on the other rows of the batch and (b) the denoising noise is the same stream with the
        # detector off and on: a detector that never fires changes nothing. (Drawing xi only when the detector
        # could fire shifted all later noise.) The cost is one (H, A) randn per chunk.
        noise = randn(pred.shape, generators, pred.device)
        xi = randn(pred.shape, generators, pred.device)
        return self.sampler.run(denoise, cond, self.initial(pred, noise, lam, sigma, xi), trace)


def make_sampler(name: str, steps: int, schedule: ScheduleConfig) -> Sampler:
    """``ddpm`` / ``ddim`` / ``dpmsolver`` (``step`` uses ``ddim`` underneath with a WarmStart)."""
    if name == "ddpm":
        return DDPMSampler(steps, schedule)
    if name in ("ddim", "step"):
        return DDIMSampler(steps, schedule)
    if name == "dpmsolver":
        return DPMSolverSampler(steps, schedule)
    raise ValueError(f"Unknown sampler {name!r}: ddpm, ddim, dpmsolver.")

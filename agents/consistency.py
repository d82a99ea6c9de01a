"""Consistency Policy (Prasad, Lin, Wu, Zhou and Bohg, RSS 2024), ``cp:k``: a consistency student distilled from
the task's frozen DDPM backbone (``step train-baseline --method cp``; training loop and checkpoint in
agents/distill.py).

Student: the teacher's U-Net architecture, initialised from the teacher's weights, read as a consistency function
through the skip / out parameterisation of consistency models (Song et al. 2023) in the form Latent Consistency
Models use for epsilon-prediction networks:

    f(x, t) = c_skip(t) x + c_out(t) x0(x, t),   x0(x, t) = (x - b_t eps_theta(x, t, o)) / a_t,
    c_skip(t) = sd^2 / ((s t)^2 + sd^2),   c_out(t) = s t / sqrt((s t)^2 + sd^2),   sd = 0.5, s = 10,

with t the integer DDPM timestep, so f(x, 0) = x exactly (the boundary condition, by construction) and for t >= 1
f is within 0.25 % of the network's clean estimate (which is why the teacher's weights are a good start).

Objective (consistency distillation, CD): the chain is the teacher's DDPM timesteps 0 .. top_t (top_t = 90, see
agents/distill.py for why not 99); per sample, n ~ U{0 .. top_t - skip}, t_n = n, t_{n+1} = n + skip, a demo chunk
x0 is noised to x_{t_{n+1}} = a x0 + b eps, the frozen teacher takes ONE deterministic DDIM step (its x0 clip
included, as its sampler) from t_{n+1} to t_n, giving x_hat_{t_n}, and

    loss = E[ d( f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_hat_{t_n}, t_n) ) ],
    d(u, v) = sqrt(||u - v||^2 + c^2) - c  (pseudo-Huber, c = 0.00054 sqrt(H A), Song & Dhariwal 2023),

theta- an EMA of theta with decay mu = 0.95 (the target network, no gradient); weighting lambda = 1. The saved
weights are the usual evaluation EMA of theta (power 0.75, max 0.9999, as every backbone here).

Sampling ``cp:k``: k = 1: x ~ N(0, I) read as x_{top_t}, one call, out = clip(f(x, top_t)). k > 1 (multistep
consistency sampling): then for tau in round(top_t (k - i) / k), i = 1 .. k-1 (k = 2: 90, 45; k = 3: 90, 60,
30): x = a_tau out + b_tau z with fresh z ~ N(0, I), out = clip(f(x, tau)). k network calls per chunk, Ta actions
executed, each row's noise from its own generator (batched rows equal single-env runs).

Where this differs from the paper (and its public code, github.com/Aaditya-Prasad/consistency-policy):
  * teacher: the project's DDPM (epsilon, squaredcos, 100 steps) backbone, not an EDM-trained one; one DDIM step
    as the ODE solver, not Heun; the chain is the teacher's discrete timesteps 0..90 with skip 2 (45 pairs), not
    80 Karras bins on sigma in [0.02, 80].
  * objective: plain consistency distillation (Song et al. 2023), not the Consistency Trajectory Model objective
    (student conditioned on a stop time s, any-to-any jumps) plus the DSM loss that Consistency Policy trains; a
    DSM term would pull an s-less student towards the posterior mean, so none is added.
  * no dropout in the student (theirs 0.2), our target decay 0.95 (CM's CD setting; theirs starts at 0) and
    the boundary at DDPM t = 0, where b_0 = 0.025 of noise is left (the analogue of CM's sigma_min), instead of
    their sigma_min = 0.02.
  * multistep times: ours (evenly spaced below top_t); their default chains at bins 27 and 54 of 80.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from agents.backbone import Backbone, PolicyConfig
from agents.compute import autocast
from agents.distill import DistilledAgent, Distiller, gather, optimize, schedule_tables
from agents.samplers import randn

SIGMA_DATA = 0.5  # the data scale in c_skip / c_out (consistency models; actions are min-max normalised to [-1, 1])
TIME_SCALE = 10.0  # s: DDPM timestep t enters c_skip / c_out as s t (LCM's scaling)


def default_settings(cfg: PolicyConfig, top_t: int = 90) -> dict:
    return {"method": "cp", "top_t": int(top_t), "sigma_data": SIGMA_DATA, "time_scale": TIME_SCALE}


def boundary_coefficients(t: Tensor, sigma_data: float = SIGMA_DATA, scale: float = TIME_SCALE) -> tuple[Tensor, Tensor]:
    """(c_skip(t), c_out(t)) per row, shaped (B, 1, 1); exactly (1, 0) at t = 0."""
    st = scale * t.float().view(-1, 1, 1)
    return sigma_data ** 2 / (st ** 2 + sigma_data ** 2), st / torch.sqrt(st ** 2 + sigma_data ** 2)


def consistency_fn(net: Backbone, x: Tensor, t: Tensor, cond: Tensor, a: Tensor, b: Tensor,
                   sigma_data: float = SIGMA_DATA, scale: float = TIME_SCALE) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) (x - b_t eps(x, t)) / a_t: one network call."""
    c_skip, c_out = boundary_coefficients(t, sigma_data, scale)
    eps = net.denoise(x, t, cond)
    x0 = (x - gather(b, t) * eps) / gather(a, t)
    return c_skip * x + c_out * x0


def sampling_times(top_t: int, k: int) -> list[int]:
    """The k timesteps of ``cp:k``: top_t, then evenly spaced re-noising levels below it."""
    return [top_t] + [round(top_t * (k - i) / k) for i in range(1, k)]


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """sqrt(||diff||^2 + c^2) - c per row (B, ...) -> (B,)."""
    return torch.sqrt(diff.flatten(1).pow(2).sum(1) + c * c) - c


class ConsistencyDistiller(Distiller):
    method = "cp"

    def __init__(self, teacher: Backbone, cfg, optimizer_factory=None):
        if cfg.cp_skip > cfg.top_t:
            raise ValueError(f"--cp-skip ({cfg.cp_skip}) must not exceed --top-t ({cfg.top_t}).")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        self.aux = copy.deepcopy(teacher).requires_grad_(False).eval()  # the target network theta-
        self.a, self.b = schedule_tables(teacher.cfg)
        horizon, action_dim = teacher.action_shape
        self.c = cfg.cp_huber_c if cfg.cp_huber_c is not None else 0.00054 * math.sqrt(horizon * action_dim)
        self.top, self.skip, self.decay = cfg.top_t, cfg.cp_skip, cfg.cp_target_decay
        pc = teacher.cfg
        self.clip = pc.clip_sample_range if pc.clip_sample else None
        self._settings = default_settings(pc, cfg.top_t)
        self.optimizer = self.lr_schedule = None  # set by the training loop (agents/training.py make_optimizer)

    def settings(self) -> dict:
        return dict(self._settings)

    def teacher_step(self, x: Tensor, t_from: Tensor, t_to: Tensor, cond: Tensor) -> Tensor:
        """One deterministic DDIM step of the frozen teacher from t_from to t_to (per row), x0 clipped as its sampler."""
        eps = self.teacher.denoise(x, t_from, cond).float()
        x0 = (x - gather(self.b, t_from) * eps) / gather(self.a, t_from)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return gather(self.a, t_to) * x0 + gather(self.b, t_to) * eps

    def losses(self, obs: dict, action: Tensor, generator: torch.Generator, precision: str = "fp32") -> Tensor:
        """The CD loss of one batch (the student's graph attached)."""
        x0 = self.teacher.normalize_action(action)
        rows = x0.shape[0]
        t_n = torch.randint(0, self.top - self.skip + 1, (rows,), generator=generator)
        t_next = t_n + self.skip
        noise = torch.randn(x0.shape, generator=generator)
        x_next = gather(self.a, t_next) * x0 + gather(self.b, t_next) * noise
        with torch.no_grad(), autocast(precision):
            x_n = self.teacher_step(x_next, t_next, t_n, self.teacher.global_cond(obs))
            target = consistency_fn(self.aux, x_n, t_n, self.aux.global_cond(obs), self.a, self.b).float()
        with autocast(precision):
            pred = consistency_fn(self.student, x_next, t_next, self.student.global_cond(obs), self.a, self.b)
        return pseudo_huber(pred.float() - target, self.c).mean()

    def train_step(self, obs, action, generator, precision="fp32") -> dict[str, float]:
        loss = self.losses(obs, action, generator, precision)
        optimize(loss, self.student, self.optimizer, self.lr_schedule)
        with torch.no_grad():  # theta- <- mu theta- + (1 - mu) theta
            torch._foreach_lerp_(list(self.aux.parameters()), list(self.student.parameters()), 1.0 - self.decay)
        return {"loss": float(loss.detach())}


class ConsistencyAgent(DistilledAgent):
    """Multistep consistency sampling on the shared distilled-agent mechanics (agents/distill.py)."""

    method = "cp"

    def __init__(self, backbone: Backbone, action_space, batch_size: int | None = None, seed: int = 0, steps: int = 1):
        super().__init__(backbone, action_space, batch_size, seed, steps)
        top = int(self.settings["top_t"])
        if not 1 <= steps <= top:
            raise ValueError(f"cp:{steps}: k must be in [1, {top}].")
        self.times = sampling_times(top, steps)
        self.a, self.b = schedule_tables(backbone.cfg)

    def plan(self, cond: Tensor) -> Tensor:
        shape = (self.rows, *self.backbone.action_shape)
        out = None
        for t in self.times:
            z = randn(shape, self.generators, cond.device)
            x = z if out is None else self.a[t] * out + self.b[t] * z
            tt = torch.full((self.rows,), t, dtype=torch.long)
            out = self.clip(consistency_fn(self.backbone, x, tt, cond, self.a, self.b, self.settings["sigma_data"],
                                           self.settings["time_scale"]))
        return out

"""BRIDGeR (Chen, Lim, Lin, Chen and Soh, RSS 2024, "Don't Start from Scratch: Behavioral Refinement via
Interpolant-based Policy Diffusion"), ``bridger:k``: a stochastic-interpolant policy (Albergo, Boffi and
Vanden-Eijnden) that transports an informative SOURCE distribution of action chunks to the demonstrated ones
(``step train-baseline --method bridger``; training loop and checkpoint in agents/distill.py).

Interpolant, on normalised action chunks (B, H, A), x0 from the source, x1 a demonstrated chunk, z ~ N(0, I):

    x_t = I(t, x0, x1) + gamma(t) z,   t in [0, 1],
    I = (1 - t) x0 + t x1                               (``interpolant = "linear"``, the default)
    I = (1 - t)^3 x0 + (1 - (1 - t)^3) x1                (``"power3"``, the authors' configs' choice)
    gamma(t) = d sqrt(2 t (1 - t)),   d = ``gamma_scale`` = 0.03 (the authors' ``beta_max`` and gamma form),

so x_t is exactly the source sample at t = 0 and exactly the data at t = 1. The velocity
b(t, x) = E[dI/dt + gamma'(t) z | x_t = x] is learnt by regression on its conditional target:

    loss = E_{t, x0, x1, z} || b_theta(t, x_t, o) - (dI/dt + gamma'(t) z) ||^2   (mean over elements),

gamma'(t) = d (1 - 2 t) / sqrt(2 t (1 - t)) is infinite at both ends, so t ~ U[t_eps, 1 - t_eps] with t_eps =
1e-3 (the authors' t_min; there |gamma'| = 22 d = 0.67) and the sampler clips its times to the same range.

Source: the paper's Gaussian source fitted to the actions: x0 = mu + sigma n, n ~ N(0, I), with mu and sigma the
per (horizon position, action dim) mean and standard deviation (population, ddof 0) of the normalised action
chunks of EVERY training window of the loop's WindowBank (tail pads included, as the loop trains on them),
computed once at training start (deterministic, so a resumed run gets the same numbers) and stored in
config.json's inference settings as (H, A) lists.

Network: the teacher's U-Net architecture, initialised from the frozen teacher's weights, predicting
b_theta(t, x, o) directly. Its timestep input is tau = (1 - t) (T - 1) as a float (LeRobot's sinusoidal
embedding takes real timesteps), so t = 0 (the source) meets the teacher's noisy end tau = 99 and t = 1 (the
data) its clean end tau = 0.

Sampling ``bridger:k`` (k = 2 when no k is given): x0 = mu + sigma n from each row's own generator, then k Euler
steps of the probability-flow ODE dX = b(t, X) dt on the uniform grid t_i = i / k, i = 0 .. k-1 (b at t_i clipped
to [t_eps, 1 - t_eps]), then the x0 clip of the teacher's config. k network calls per chunk, Ta actions executed;
batched rows equal single-env runs.

Where this differs from the paper (and its public code, github.com/clear-nus/bridger):
  * source: only the fitted Gaussian (no CVAE, no heuristic source); it is unconditioned (one mu, sigma for every
    observation), as a Gaussian source is. The authors' code draws its "gaussian" source as N(0, I); ours is
    fitted per position and dimension, a cheap but more informative start.
  * network: initialised from the teacher's weights to save CPU training (the paper trains from scratch); one
    network, the velocity b, and the deterministic ODE sampler. The authors train b, v and the score s (three
    U-Nets, t in [0, 1] fed to the embedding directly) and sample the forward SDE with epsilon(t) = 1 - t; we
    train no score / denoiser and so have no SDE sampler.
  * loss: the plain squared error (the authors' 0.5 |b|^2 - <target, b> has the same minimiser; its gradient
    is ours up to a constant factor).
  * interpolant default: linear (the authors' configs use power3, available as a setting); the optimiser, EMA
    and learning rate are the project's distillation settings (agents/distill.py), not the authors' 5e-6.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.backbone import Backbone, PolicyConfig
from agents.compute import autocast
from agents.distill import DistilledAgent, Distiller, optimize
from agents.samplers import randn

INTERPOLANTS = ("linear", "power3")
DEFAULT_STEPS = 2  # bridger without :k


def default_settings(cfg: PolicyConfig, action_dim: int, interpolant: str = "linear", gamma_scale: float = 0.03,
                     t_eps: float = 1e-3, source_mean: Tensor | None = None,
                     source_std: Tensor | None = None) -> dict:
    """The inference settings recorded in config.json. Without fitted statistics (``step latency`` on a teacher
    copy) the source is N(0, I)."""
    shape = (cfg.horizon, action_dim)
    mean = torch.zeros(shape) if source_mean is None else source_mean
    std = torch.ones(shape) if source_std is None else source_std
    return {"method": "bridger", "interpolant": interpolant, "gamma_scale": float(gamma_scale),
            "t_eps": float(t_eps), "source_mean": mean.float().tolist(), "source_std": std.float().tolist()}


def fit_source(backbone: Backbone, actions: Tensor) -> tuple[Tensor, Tensor]:
    """Raw action windows (N, H, A) -> per (position, dim) mean and std (H, A) of the normalised chunks."""
    x = backbone.normalize_action(actions)
    return x.mean(0), x.std(0, correction=0)


def source_tensors(settings: dict, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(settings["source_mean"], dtype=torch.float32)
    std = torch.tensor(settings["source_std"], dtype=torch.float32)
    if mean.shape != shape or std.shape != shape:
        raise ValueError(f"BRIDGeR source statistics of shape {tuple(mean.shape)} do not match the action chunk "
                         f"{shape}.")
    return mean, std


def interpolant(kind: str, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
    """(I(t, x0, x1), dI/dt); ``t`` broadcasts against the chunks ((B, 1, 1) or a scalar)."""
    if kind == "linear":
        return (1 - t) * x0 + t * x1, x1 - x0
    if kind == "power3":
        w0 = (1 - t) ** 3
        return w0 * x0 + (1 - w0) * x1, 3 * (1 - t) ** 2 * (x1 - x0)
    raise ValueError(f"Unknown interpolant {kind!r}: {', '.join(INTERPOLANTS)}.")


def gamma(t: Tensor, scale: float) -> Tensor:
    return scale * torch.sqrt(2 * t * (1 - t))


def gamma_dot(t: Tensor, scale: float) -> Tensor:
    """gamma'(t): infinite at t = 0 and 1, so callers keep t inside [t_eps, 1 - t_eps]."""
    return scale * (1 - 2 * t) / torch.sqrt(2 * t * (1 - t))


def interpolate(kind: str, scale: float, t: Tensor, x0: Tensor, x1: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, the conditional velocity dI/dt + gamma'(t) z) for per-row times ``t`` (B, 1, 1)."""
    base, base_dot = interpolant(kind, t, x0, x1)
    if scale == 0:  # no latent noise: the deterministic interpolant, defined at t = 0 and 1 too (0 * inf is NaN)
        return base, base_dot
    return base + gamma(t, scale) * z, base_dot + gamma_dot(t, scale) * z


def unet_time(t, num_train_timesteps: int):
    """Interpolant time t in [0, 1] -> the U-Net's (float) timestep: t = 0 (source) is the teacher's noisy end."""
    return (1.0 - t) * (num_train_timesteps - 1)


def euler(velocity, x: Tensor, steps: int, t_eps: float) -> Tensor:
    """``steps`` Euler steps of dX = b(t, X) dt from t = 0 to 1 on the uniform grid; b is evaluated at the grid
    time clipped to [t_eps, 1 - t_eps], the range it was trained on. ``velocity(t: float, x) -> b``."""
    dt = 1.0 / steps
    for i in range(steps):
        t = min(max(i * dt, t_eps), 1.0 - t_eps)
        x = x + dt * velocity(t, x)
    return x


class BridgerDistiller(Distiller):
    """The BRIDGeR velocity network trained on the demonstrations; the teacher only provides the initial weights
    and the action normaliser (no teacher call, no second network: ``aux`` is None)."""

    method = "bridger"

    def __init__(self, teacher: Backbone, cfg, actions: Tensor, optimizer_factory=None):
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        self.aux = None
        self.kind, self.scale, self.t_eps = cfg.bridger_interpolant, cfg.bridger_gamma, cfg.bridger_t_eps
        self.num_t = teacher.cfg.num_train_timesteps
        with torch.no_grad():
            self.mean, self.std = fit_source(teacher, actions)
        self._settings = default_settings(teacher.cfg, teacher.features.action_dim, self.kind, self.scale,
                                          self.t_eps, self.mean, self.std)
        self.optimizer = self.lr_schedule = None  # set by the training loop (agents/training.py make_optimizer)

    def settings(self) -> dict:
        return dict(self._settings)

    def losses(self, obs: dict, action: Tensor, generator: torch.Generator, precision: str = "fp32") -> Tensor:
        """The velocity regression loss of one batch (the student's graph attached)."""
        x1 = self.student.normalize_action(action)
        rows = x1.shape[0]
        x0 = self.mean + self.std * torch.randn(x1.shape, generator=generator)
        t = self.t_eps + (1 - 2 * self.t_eps) * torch.rand(rows, generator=generator)
        z = torch.randn(x1.shape, generator=generator)
        x_t, target = interpolate(self.kind, self.scale, t.view(-1, 1, 1), x0, x1, z)
        with autocast(precision):
            pred = self.student.denoise(x_t, unet_time(t, self.num_t), self.student.global_cond(obs))
        return F.mse_loss(pred.float(), target)

    def train_step(self, obs, action, generator, precision="fp32") -> dict[str, float]:
        loss = self.losses(obs, action, generator, precision)
        optimize(loss, self.student, self.optimizer, self.lr_schedule)
        return {"loss": float(loss.detach())}


class BridgerAgent(DistilledAgent):
    """The source draw and k Euler steps of the probability-flow ODE."""

    method = "bridger"

    def __init__(self, backbone: Backbone, action_space, batch_size: int | None = None, seed: int = 0,
                 steps: int = DEFAULT_STEPS):
        if steps < 1:
            raise ValueError(f"bridger:{steps}: k must be at least 1.")
        super().__init__(backbone, action_space, batch_size, seed, steps)
        self.mean, self.std = source_tensors(self.settings, backbone.action_shape)
        self.t_eps = float(self.settings["t_eps"])

    def plan(self, cond: Tensor) -> Tensor:
        n = randn((self.rows, *self.backbone.action_shape), self.generators, cond.device)
        num_t = self.backbone.cfg.num_train_timesteps

        def velocity(t: float, x: Tensor) -> Tensor:
            return self.backbone.denoise(x, torch.full((self.rows,), unet_time(t, num_t)), cond)

        return self.clip(euler(velocity, self.mean + self.std * n, self.cfg.steps, self.t_eps))

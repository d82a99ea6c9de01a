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

Source ``cvae`` (``--bridger-source cvae``): the paper's informative source, a conditional VAE of the action
chunk given the observation, fitted on the demonstrations before the velocity network trains and then frozen
(``CVAESource``; the authors' vae_mlp: encoder q(z | o, x1) and decoder p(x1 | o, z) are MLPs of 3 hidden layers of
512 with ELU, a 64-D latent; loss 10 x MSE of the reconstruction + w KL(q || N(0, I)), w annealed from 0 by 1e-4 a
step up to 0.1). The source draw is x0 = decoder(o, z), z ~ N(0, I): an observation-conditioned start. o is the
backbone's global condition (for a state backbone the normalised observation history, parameter-free, so teacher
and student see the same o; image backbones are refused, their encoder trains with the student). The decoder's
weights are saved beside the student (``source.safetensors``), its sizes and fit in config.json's settings; the fit
is restored, not redone, on resume, and its seconds count in the run's training time.

Where this differs from the paper (and its public code, github.com/clear-nus/bridger):
  * source: the fitted Gaussian (default) or the CVAE; no heuristic source (the authors' are hand-written per
    Adroit task). The Gaussian is unconditioned (one mu, sigma for every observation), as a Gaussian source is.
    The authors' code draws its "gaussian" source as N(0, I); ours is fitted per position and dimension, a cheap
    but more informative start. The CVAE is fitted with AdamW at 1e-3, cosine-decayed over its steps, on the
    backbone's batch (the authors': 5e-6, batch 64, 3001 iterations).
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.backbone import Backbone, PolicyConfig
from agents.compute import autocast
from agents.distill import SOURCE_FILE, DistilledAgent, Distiller, optimize
from agents.samplers import randn

INTERPOLANTS = ("linear", "power3")
SOURCES = ("gaussian", "cvae")  # --bridger-source (TrainBaselineConfig restates them: tested equal)
DEFAULT_STEPS = 2  # bridger without :k
CVAE_SIZES = {"latent_dim": 64, "hidden": 512, "layers": 3}  # the authors' vae.json / VAEConditionalMLP
CVAE_KL_RAMP, CVAE_KL_MAX, CVAE_REC_WEIGHT = 1e-4, 0.1, 10.0  # the authors' KL annealing and reconstruction weight


def default_settings(cfg: PolicyConfig, action_dim: int, interpolant: str = "linear", gamma_scale: float = 0.03,
                     t_eps: float = 1e-3, source_mean: Tensor | None = None,
                     source_std: Tensor | None = None, cvae: dict | None = None) -> dict:
    """The inference settings recorded in config.json. Without fitted statistics (``step latency`` on a teacher
    copy) the source is N(0, I). ``cvae``: the CVAE source's sizes and fit (absent for the Gaussian source, so the
    settings of Gaussian runs stay what they were)."""
    shape = (cfg.horizon, action_dim)
    mean = torch.zeros(shape) if source_mean is None else source_mean
    std = torch.ones(shape) if source_std is None else source_std
    settings = {"method": "bridger", "interpolant": interpolant, "gamma_scale": float(gamma_scale),
                "t_eps": float(t_eps), "source_mean": mean.float().tolist(), "source_std": std.float().tolist()}
    if cvae is not None:
        settings.update(source="cvae", cvae=dict(cvae))
    return settings


def _mlp(inputs: int, hidden: int, outputs: int, layers: int) -> nn.Sequential:
    """``layers`` Linear + ELU blocks of width ``hidden``, then a Linear to ``outputs``."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(inputs if i == 0 else hidden, hidden), nn.ELU()]
    return nn.Sequential(*blocks, nn.Linear(hidden, outputs))


class CVAESource(nn.Module):
    """The CVAE source: q(z | o, x) = N(mean, std) and the decoder x = D(o, z) over flattened (H, A) chunks."""

    def __init__(self, cond_dim: int, horizon: int, action_dim: int, latent_dim: int = 64, hidden: int = 512,
                 layers: int = 3):
        super().__init__()
        self.shape, self.latent_dim = (horizon, action_dim), latent_dim
        chunk = horizon * action_dim
        self.encoder = _mlp(cond_dim + chunk, hidden, 2 * latent_dim, layers)
        self.decoder = _mlp(cond_dim + latent_dim, hidden, chunk, layers)

    def posterior(self, cond: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = self.encoder(torch.cat([cond, x.flatten(1)], dim=-1)).chunk(2, dim=-1)
        return mean, F.softplus(raw).clamp(0.01, 10.0)  # the authors' std bounds

    def decode(self, cond: Tensor, z: Tensor) -> Tensor:
        return self.decoder(torch.cat([cond, z], dim=-1)).view(-1, *self.shape)

    def loss(self, cond: Tensor, x: Tensor, eps: Tensor, kl_weight: float) -> tuple[Tensor, Tensor, Tensor]:
        """(weighted total, reconstruction MSE, KL to N(0, I) summed over the latent, mean over rows); ``eps`` is
        the reparameterisation noise (B, latent_dim)."""
        mean, std = self.posterior(cond, x)
        rec = F.mse_loss(self.decode(cond, mean + std * eps), x)
        kl = (-std.log() + 0.5 * (std**2 + mean**2) - 0.5).sum(-1).mean()
        return CVAE_REC_WEIGHT * rec + kl_weight * kl, rec, kl


def cvae_kl_weight(step: int) -> float:
    """The KL weight at fit step ``step`` (0-based): 0, 1e-4, 2e-4, ... up to 0.1 (the authors' annealing)."""
    return min(CVAE_KL_MAX, CVAE_KL_RAMP * step)


def fit_cvae(teacher: Backbone, bank, steps: int, batch_size: int, seed: int, progress: bool = True) -> CVAESource:
    """Fit the CVAE source on the bank's windows (conditions from the frozen teacher), deterministically from
    ``seed``; returns it frozen, in eval mode."""
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the MLPs' initial weights, without moving the caller's global stream
        torch.manual_seed(seed)
        source = CVAESource(cond_dim(teacher, bank), *teacher.action_shape, **CVAE_SIZES).train()
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3, weight_decay=1e-6)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    bar = tqdm(range(steps), desc="BRIDGeR CVAE source", unit="step", disable=not progress)
    for step in bar:
        obs, action, _ = bank.batch(torch.randint(len(bank), (batch_size,), generator=g))
        with torch.no_grad():
            cond, x = teacher.global_cond(obs), teacher.normalize_action(action)
        eps = torch.randn((x.shape[0], source.latent_dim), generator=g)
        loss, rec, kl = source.loss(cond, x, eps, cvae_kl_weight(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{float(rec.detach()):.4f}", kl=f"{float(kl.detach()):.2f}")
    return source.requires_grad_(False).eval()


def cond_dim(teacher: Backbone, bank) -> int:
    """Width of the backbone's global condition (the CVAE's observation input)."""
    with torch.no_grad():
        return teacher.global_cond(bank.batch(torch.arange(1))[0]).shape[-1]


def cvae_settings(source: CVAESource, steps: int) -> dict:
    return {**CVAE_SIZES, "cond_dim": source.decoder[0].in_features - source.latent_dim, "fit_steps": steps}


def load_source(folder, sizes: dict, shape: tuple[int, int]) -> CVAESource:
    """The CVAE source saved in ``folder`` (float16 weights of an export are cast back), frozen."""
    from agents.checkpoint import load_tensors

    source = CVAESource(sizes["cond_dim"], *shape, sizes["latent_dim"], sizes["hidden"], sizes["layers"])
    path = Path(folder) / SOURCE_FILE
    try:
        source.load_state_dict({k: v.float() for k, v in load_tensors(path).items()})
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the CVAE sizes in its config.json: {err}") from None
    return source.requires_grad_(False).eval()


def load_parts(folder, settings: dict, shape: tuple[int, int]) -> dict:
    """What a BRIDGeR checkpoint keeps beside its network: ``{"source": CVAESource}`` for a CVAE source, else {}."""
    if settings.get("source", "gaussian") == "gaussian":
        return {}
    return {"source": load_source(folder, settings["cvae"], shape)}


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

    def __init__(self, teacher: Backbone, cfg, bank, optimizer_factory=None, out=None):
        """``bank``: the training WindowBank (the sources are fitted to its windows); ``out``: the run's folder,
        whose saved CVAE source a resumed run reuses."""
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()
        self.aux = None
        self.kind, self.scale, self.t_eps = cfg.bridger_interpolant, cfg.bridger_gamma, cfg.bridger_t_eps
        self.num_t = teacher.cfg.num_train_timesteps
        start = time.perf_counter()
        with torch.no_grad():
            self.mean, self.std = fit_source(teacher, bank.action)
        self.source: CVAESource | None = None
        cvae = None
        if cfg.bridger_source == "cvae":
            if teacher.features.cameras:
                raise ValueError("--bridger-source cvae conditions on the state observation history; this teacher "
                                 "has cameras (its encoder would train under the frozen source). Use the gaussian "
                                 "source.")
            if out is not None and (Path(out) / SOURCE_FILE).exists():  # a resumed run: the source it trained against
                sizes = {**CVAE_SIZES, "cond_dim": cond_dim(teacher, bank)}
                self.source = load_source(out, sizes, teacher.action_shape)
            else:
                self.source = fit_cvae(teacher, bank, cfg.bridger_source_steps, cfg.batch_size, cfg.seed,
                                       progress=cfg.progress)
            cvae = cvae_settings(self.source, cfg.bridger_source_steps)
        self.setup_seconds = time.perf_counter() - start
        self._settings = default_settings(teacher.cfg, teacher.features.action_dim, self.kind, self.scale,
                                          self.t_eps, self.mean, self.std, cvae)
        self.optimizer = self.lr_schedule = None  # set by the training loop (agents/training.py make_optimizer)

    def settings(self) -> dict:
        return dict(self._settings)

    def parts(self) -> dict:
        return {} if self.source is None else {"source": self.source}

    def files(self) -> dict:
        from agents.checkpoint import _tensor_writer

        return {} if self.source is None else {SOURCE_FILE: _tensor_writer(self.source.state_dict())}

    def draw_source(self, cond: Tensor, generator: torch.Generator) -> Tensor:
        """x0 for a batch: the CVAE decoder at z ~ N(0, I), or the fitted Gaussian."""
        rows = cond.shape[0]
        if self.source is not None:
            with torch.no_grad():
                return self.source.decode(cond.detach().float(), torch.randn((rows, self.source.latent_dim),
                                                                              generator=generator))
        return self.mean + self.std * torch.randn((rows, *self.mean.shape), generator=generator)

    def losses(self, obs: dict, action: Tensor, generator: torch.Generator, precision: str = "fp32") -> Tensor:
        """The velocity regression loss of one batch (the student's graph attached)."""
        x1 = self.student.normalize_action(action)
        rows = x1.shape[0]
        with autocast(precision):
            cond = self.student.global_cond(obs)
        x0 = self.draw_source(cond, generator)
        t = self.t_eps + (1 - 2 * self.t_eps) * torch.rand(rows, generator=generator)
        z = torch.randn(x1.shape, generator=generator)
        x_t, target = interpolate(self.kind, self.scale, t.view(-1, 1, 1), x0, x1, z)
        with autocast(precision):
            pred = self.student.denoise(x_t, unet_time(t, self.num_t), cond)
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
        self.source = getattr(backbone, "distilled_parts", {}).get("source")
        if self.settings.get("source", "gaussian") == "cvae" and self.source is None:
            raise ValueError("This BRIDGeR student was trained from a CVAE source, but its source network is not "
                             f"loaded (load the checkpoint with its {SOURCE_FILE}).")

    def draw_source(self, cond: Tensor) -> Tensor:
        """x0 per row from the row's generator: the CVAE decoder at z ~ N(0, I), or the fitted Gaussian."""
        if self.source is not None:
            return self.source.decode(cond, randn((self.rows, self.source.latent_dim), self.generators, cond.device))
        n = randn((self.rows, *self.backbone.action_shape), self.generators, cond.device)
        return self.mean + self.std * n

    def plan(self, cond: Tensor) -> Tensor:
        num_t = self.backbone.cfg.num_train_timesteps

        def velocity(t: float, x: Tensor) -> Tensor:
            return self.backbone.denoise(x, torch.full((self.rows,), unet_time(t, num_t)), cond)

        return self.clip(euler(velocity, self.draw_source(cond), self.cfg.steps, self.t_eps))

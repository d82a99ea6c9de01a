"""OneDP (Wang et al., ICML 2025, "One-Step Diffusion Policy: Fast Visuomotor Policies via Diffusion
Distillation"), ``onedp``: a one-step action generator distilled from the task's frozen DDPM backbone by matching
its distribution along the diffusion chain (``step train-baseline --method onedp``; loop and checkpoint in
agents/distill.py).

Networks, all the teacher's U-Net architecture and all initialised from the teacher's weights:
  * generator G_theta(z, o) = (z - b_g eps_theta(z, t_g, o)) / a_g, z ~ N(0, I) read as x at the fixed timestep
    t_g = top_t = 90 (the largest usable one, agents/distill.py): at initialisation G is the teacher's one-step
    clean estimate from noise.
  * the frozen teacher eps_phi (the data score along the chain, s_phi = -eps_phi / b_t).
  * the generator-score network eps_psi, trained on the generator's samples by the denoising loss
    E_{t ~ U{0..T-1}, eps} ||eps_psi(a_t A + b_t eps, t, o) - eps||^2, A = G_theta(z, o) detached.

Generator objective (the KL variant, OneDP-S): KL(p_theta || p_phi) integrated over the diffusion chain; its
gradient w.r.t. the generated chunk A, at x_t = a_t A + b_t eps with t ~ U{t_min .. t_max} = U{2 .. 95},
is w(t) a_t (s_psi(x_t) - s_phi(x_t)) = w'(t) (x0_psi(x_t) - x0_phi(x_t)), the difference of the two networks'
clean estimates (x0 = (x_t - b_t eps) / a_t). It is applied through the surrogate
0.5 || A - sg(A - g) ||^2 with g = (x0_psi - x0_phi) / mean|A - x0_phi| (per sample), whose gradient is g: the
weighting normalises each sample's step by the teacher's denoising error (DMD, Yin et al. 2024), so no
t-dependent constant has to be tuned. One generator step, then one score-network step on the same (detached)
samples, per training step.

Sampling: one network call, out = clip(G(z, o)), z from each row's own generator.

Logged per step: ``loss`` (the surrogate, 0.5 mean g^2: the score mismatch, 0 at initialisation because psi =
phi, it rises as psi learns the generator and falls as the generator closes the gap), ``score_loss`` (psi's
denoising loss) and ``teacher_dsm`` (the teacher's denoising loss on generated chunks, a cross-entropy proxy:
it falls as the generator moves to where the teacher puts mass).

Where this differs from the paper: the teacher is the project's DDPM state U-Net (theirs Diffusion Policy's
image U-Net, same DDPM schedule family); the generator's timestep is 90, not T (at T = 99 the epsilon -> x0 map
amplifies errors 2000-fold, agents/distill.py); the chain range 2..95, the DMD normalised weighting, learning
rates (1e-4 both, their generator / score-net rates are not used) and the one-to-one update ratio are our
settings; only the stochastic generator (OneDP-S) is built, not OneDP-D (a deterministic z).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.backbone import Backbone, PolicyConfig
from agents.compute import autocast
from agents.distill import DistilledAgent, Distiller, gather, optimize, schedule_tables, x0_estimate
from agents.samplers import randn


def default_settings(cfg: PolicyConfig, top_t: int = 90) -> dict:
    return {"method": "onedp", "generator_t": int(top_t)}


def generate(net: Backbone, z: Tensor, cond: Tensor, t_g: int, a: Tensor, b: Tensor) -> Tensor:
    """G(z, o): the generator's chunk from latent z, one network call."""
    t = torch.full((z.shape[0],), t_g, dtype=torch.long)
    return x0_estimate(net, z, t, cond, a, b)


class OneDPDistiller(Distiller):
    method = "onedp"

    def __init__(self, teacher: Backbone, cfg, optimizer_factory=None):
        from diffusers.optimization import get_scheduler

        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).requires_grad_(True).train()  # the generator G_theta
        self.aux = copy.deepcopy(teacher).requires_grad_(True).train()  # the generator-score network eps_psi
        self.a, self.b = schedule_tables(teacher.cfg)
        self.t_g, self.t_min, self.t_max = cfg.top_t, cfg.onedp_t_min, cfg.onedp_t_max
        self.num_t = teacher.cfg.num_train_timesteps
        self.aux_optimizer = torch.optim.AdamW(self.aux.model.parameters(), lr=cfg.onedp_score_lr, betas=cfg.betas,
                                               weight_decay=cfg.weight_decay)
        self.aux_schedule = get_scheduler("cosine", self.aux_optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.steps)
        self._settings = default_settings(teacher.cfg, cfg.top_t)
        self.optimizer = self.lr_schedule = None  # set by the training loop (agents/training.py make_optimizer)

    def settings(self) -> dict:
        return dict(self._settings)

    def train_step(self, obs, action, generator, precision="fp32") -> dict[str, float]:
        rows = action.shape[0]
        shape = (rows, *self.teacher.action_shape)
        z = torch.randn(shape, generator=generator)
        # 1. generator: the KL's gradient along the chain
        with autocast(precision):
            sample = generate(self.student, z, self.student.global_cond(obs), self.t_g, self.a, self.b)
        sample = sample.float()
        t = torch.randint(self.t_min, self.t_max + 1, (rows,), generator=generator)
        noise = torch.randn(shape, generator=generator)
        x_t = gather(self.a, t) * sample.detach() + gather(self.b, t) * noise
        with torch.no_grad(), autocast(precision):
            eps_real = self.teacher.denoise(x_t, t, self.teacher.global_cond(obs)).float()
            eps_fake = self.aux.denoise(x_t, t, self.aux.global_cond(obs)).float()
        x0_real = (x_t - gather(self.b, t) * eps_real) / gather(self.a, t)
        x0_fake = (x_t - gather(self.b, t) * eps_fake) / gather(self.a, t)
        scale = (sample.detach() - x0_real).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-4)
        g = (x0_fake - x0_real) / scale
        loss = 0.5 * F.mse_loss(sample, (sample.detach() - g).detach())
        optimize(loss, self.student, self.optimizer, self.lr_schedule)
        # 2. generator-score network: denoising loss on the generator's (detached) samples
        t2 = torch.randint(0, self.num_t, (rows,), generator=generator)
        noise2 = torch.randn(shape, generator=generator)
        x2 = gather(self.a, t2) * sample.detach() + gather(self.b, t2) * noise2
        with autocast(precision):
            pred = self.aux.denoise(x2, t2, self.aux.global_cond(obs))
        score_loss = F.mse_loss(pred.float(), noise2)
        optimize(score_loss, self.aux, self.aux_optimizer, self.aux_schedule)
        return {"loss": float(loss.detach()), "score_loss": float(score_loss.detach()),
                "teacher_dsm": float(F.mse_loss(eps_real, noise))}


class OneDPAgent(DistilledAgent):
    """The shared distilled-agent mechanics (agents/distill.py); the plan is one generator call."""

    method = "onedp"

    def __init__(self, backbone: Backbone, action_space, batch_size: int | None = None, seed: int = 0):
        super().__init__(backbone, action_space, batch_size, seed, steps=1)
        self.t_g = int(self.settings["generator_t"])
        self.a, self.b = schedule_tables(backbone.cfg)

    def plan(self, cond: Tensor) -> Tensor:
        z = randn((self.rows, *self.backbone.action_shape), self.generators, cond.device)
        return self.clip(generate(self.backbone, z, cond, self.t_g, self.a, self.b))

"""Per-position noise levels for the streaming baselines (SDP, RNR-DP): the U-Net variant and its training loss.

The U-Net (LeRobot's ``DiffusionConditionalUnet1d``) takes one timestep per sample: ``diffusion_step_encoder``
turns it into an embedding that is concatenated with the observation condition and drives every FiLM layer.
SDP and RNR-DP need a timestep per action position. The least invasive change, and the one the SDP
authors' public code makes (``diffusion_policy/model/diffusion/conditional_unet1d_tedi.py``: every
position's timestep is embedded, the H embeddings are concatenated and a Linear maps them to the
embedding), is to replace only the timestep encoder:

  * ``PerPositionStepEncoder`` keeps the original encoder's modules under the same names (so a chunk-mode
    checkpoint's weights load unchanged) and adds ``mix``: Linear(H * d -> d). A (B,) timestep goes through
    the original path; a (B, H) timestep embeds every position with the same sinusoid + MLP and ``mix``
    combines them.
  * ``mix`` is initialised to the mean over positions, so equal timesteps give exactly the chunk-mode
    embedding: a streaming backbone fine-tuned from a DDPM backbone (``step train-policy --init-from``)
    starts from that backbone's behaviour, and still serves DDIM / DDPM with a (B,) timestep.

The rest of the U-Net (FiLM blocks, convolutions) is untouched; ``Backbone.denoise(x, t, cond)`` passes
``t`` of shape (B,) or (B, H) through. The checkpoint records ``per_position_timesteps: true`` and the
``noise_mode`` it was trained with; ``load_policy`` rebuilds the encoder from that, and the streaming agents
refuse a checkpoint without it.

Training noise (``noise_mode`` of ``step train-policy``), all in training timesteps 0..T-1 (T = 100):
  * ``chunk``: one timestep per sample (Diffusion Policy, LeRobot's ``compute_loss``; the default).
  * ``sdp``: SDP's scheme from the authors' public code (``tedi_unet_lowdim_policy.get_diff_steps_training``
    with the lowdim config ``train_tedi_unet_*_lowdim_workspace.yaml``): with probability 0.2 a temporally
    constant level (plain DP), else the chunk-wise level k(i, j) = floor(T (i + 1) / h) - 1 - j for chunk i of
    h chunks of ``stream_chunk`` actions (positions before To-1 belong to chunk 0), j ~ U{0 .. T/h - 1}.
  * ``rnrdp``: RNR-DP's mixture noise scheduling (Chen et al. 2025, Sec. 4 "mixture noise scheduling" and the
    project page's Fig. 17): a linear schedule (levels increasing along the buffer, as the noise-relaying
    buffer holds them, with a random phase) mixed with a random schedule (an independent level per
    position). The mixing probability ``mixture_linear_prob`` is 0.5 here; we could not read the paper's
    value in this session, so it is a setting, recorded in the checkpoint.
  * ``streaming``: one backbone for both agents (the lead's CPU budget): 0.2 constant, 0.4 SDP chunk-wise,
    0.4 RNR-DP mixture. ``sdp`` and ``rnrdp`` agents accept it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NOISE_MODES = ("chunk", "sdp", "rnrdp", "streaming")
# which agents a backbone trained with each noise mode can serve
SERVES = {"chunk": (), "sdp": ("sdp",), "rnrdp": ("rnrdp",), "streaming": ("sdp", "rnrdp")}
SDP_CONSTANT_PROB = 0.2  # SDP public code, lowdim configs: temporally_constant_weight 0.2, chunk_wise_weight 0.8


class PerPositionStepEncoder(nn.Sequential):
    """The U-Net's timestep encoder, extended to one timestep per action position (see module docstring)."""

    def __init__(self, base: nn.Sequential, horizon: int):
        super().__init__(*base)
        self.base_len = len(base)
        dim = base[-1].out_features
        self.horizon = horizon
        self.mix = nn.Linear(horizon * dim, dim)
        with torch.no_grad():  # the mean over positions: equal timesteps -> the chunk-mode embedding
            self.mix.weight.copy_(torch.eye(dim).repeat(1, horizon) / horizon)
            self.mix.bias.zero_()

    def _embed(self, t: Tensor) -> Tensor:
        for i in range(self.base_len):  # the original encoder's modules (not ``mix``)
            t = self[i](t)
        return t

    def forward(self, t: Tensor) -> Tensor:
        if t.ndim == 1:
            return self._embed(t)
        b, h = t.shape
        if h != self.horizon:
            raise ValueError(f"Per-position timesteps have {h} positions, the backbone's horizon is {self.horizon}.")
        emb = self._embed(t.reshape(-1))  # (B*H, d), the same sinusoid + MLP for every position
        return self.mix(emb.reshape(b, -1))


def enable_per_position(backbone) -> None:
    """Give ``backbone``'s U-Net a per-position timestep encoder (idempotent)."""
    unet = backbone.model.unet
    if not isinstance(unet.diffusion_step_encoder, PerPositionStepEncoder):
        unet.diffusion_step_encoder = PerPositionStepEncoder(unet.diffusion_step_encoder, backbone.cfg.horizon)
    backbone.per_position = True


def has_per_position(backbone) -> bool:
    return isinstance(backbone.model.unet.diffusion_step_encoder, PerPositionStepEncoder)


# ------------------------------------------------------------------ training noise levels
def chunk_indices(horizon: int, n_obs_steps: int, chunk: int) -> Tensor:
    """Chunk number of every buffer position (SDP's layout): positions <= To-1 in chunk 0, the incomplete
    tail in the last complete chunk."""
    usable = horizon - (n_obs_steps - 1)
    chunks = usable // chunk
    if chunks < 1:
        raise ValueError(f"stream chunk {chunk} is longer than the {usable} future positions of the horizon.")
    idx = torch.div(torch.arange(horizon) - (n_obs_steps - 1), chunk, rounding_mode="floor")
    return idx.clamp(0, chunks - 1)


def sdp_levels(batch: int, horizon: int, n_obs_steps: int, chunk: int, num_train: int) -> Tensor:
    """SDP's chunk-wise training levels (B, H) in training timesteps."""
    idx = chunk_indices(horizon, n_obs_steps, chunk)
    chunks = int(idx.max()) + 1
    j = torch.randint(0, max(1, num_train // chunks), (batch, 1))
    return (torch.floor(num_train * (idx[None] + 1) / chunks).long() - 1 - j).clamp(0, num_train - 1)


def ladder_targets(horizon: int, n_obs_steps: int) -> Tensor:
    """RNR-DP's buffer levels before a step, in ladder units: position To-1 at 0, then +1 per position;
    past positions share the level of To-1. K = H - To + 1 levels in all."""
    return (torch.arange(horizon) - (n_obs_steps - 1)).clamp_min(0)


def level_timesteps(levels: Tensor, levels_total: int, num_train: int) -> Tensor:
    """Ladder level l in {0 .. K-1} (may be fractional) -> training timestep round((l + 1) T / K) - 1."""
    return (torch.round((levels + 1) * num_train / levels_total) - 1).long().clamp(0, num_train - 1)


def rnrdp_levels(batch: int, horizon: int, n_obs_steps: int, num_train: int, linear_prob: float) -> Tensor:
    """RNR-DP's mixture noise scheduling (B, H): per sample, linear (ladder with a random phase) or random."""
    k = horizon - n_obs_steps + 1
    ladder = ladder_targets(horizon, n_obs_steps).float()[None] + torch.rand(batch, 1) - 1.0  # phase in (-1, 0]
    linear = level_timesteps(ladder.clamp_min(-1.0 + 1e-6), k, num_train)
    random = torch.randint(0, num_train, (batch, horizon))
    pick = torch.rand(batch, 1) < linear_prob
    return torch.where(pick, linear, random)


def training_levels(mode: str, batch: int, cfg, stream_chunk: int, linear_prob: float) -> Tensor:
    """(B, H) training timesteps for a per-position noise mode (torch's global RNG, saved with the run)."""
    h, to, n = cfg.horizon, cfg.n_obs_steps, cfg.num_train_timesteps
    constant = torch.randint(0, n, (batch, 1)).expand(batch, h)
    if mode == "sdp":
        parts = [(SDP_CONSTANT_PROB, constant), (1 - SDP_CONSTANT_PROB, sdp_levels(batch, h, to, stream_chunk, n))]
    elif mode == "rnrdp":
        return rnrdp_levels(batch, h, to, n, linear_prob)
    elif mode == "streaming":
        parts = [(SDP_CONSTANT_PROB, constant), (0.4, sdp_levels(batch, h, to, stream_chunk, n)),
                 (0.4, rnrdp_levels(batch, h, to, n, linear_prob))]
    else:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {mode!r}.")
    u = torch.rand(batch, 1)  # a categorical choice of scheme per sample
    cum = 0.0
    out = parts[-1][1].clone()
    for prob, levels in parts[:-1]:
        pick = (u >= cum) & (u < cum + prob)
        out = torch.where(pick, levels, out)
        cum += prob
    return out


def per_position_loss(backbone, obs: dict, action: Tensor, action_is_pad: Tensor | None, levels: Tensor) -> Tensor:
    """Epsilon-prediction loss with a timestep per action position (LeRobot's compute_loss, per position)."""
    model = backbone.model
    batch = backbone.normalize_obs(obs)
    cond = model._prepare_global_conditioning(batch)
    x0 = backbone.normalize_action(action)
    eps = torch.randn_like(x0)
    abar = model.noise_scheduler.alphas_cumprod.to(x0.device)[levels].unsqueeze(-1)  # (B, H, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = model.unet(noisy, levels, global_cond=cond)
    if backbone.cfg.prediction_type == "epsilon":
        target = eps
    elif backbone.cfg.prediction_type == "sample":
        target = x0
    else:
        raise ValueError(f"Unsupported prediction type {backbone.cfg.prediction_type}")
    loss = torch.nn.functional.mse_loss(pred, target, reduction="none")
    if getattr(backbone.lerobot_cfg, "do_mask_loss_for_padding", False) and action_is_pad is not None:
        loss = loss * (~action_is_pad).unsqueeze(-1)
    return loss.mean()


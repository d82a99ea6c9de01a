"""The streaming family: SDP (Hoeg, Du and Egeland, 2024, Streaming Diffusion Policy) ``sdp`` and RNR-DP
(Chen et al., 2025, Responsive Noise-Relaying Diffusion Policy) ``rnrdp``.

Both keep an action buffer of the backbone's horizon whose positions carry increasing noise levels; each
replan denoises the whole buffer (every position one level per network call, each at its own timestep),
executes the now-clean first action(s), shifts the buffer and appends fresh noise at the top level. They
need a backbone trained with per-position noise levels (``agents/per_position.py``; ``step train-policy
--noise-mode sdp|rnrdp|streaming``); a checkpoint without it is refused with a clear error.

Noise levels live on a ladder of K denoising levels: level l in {0 .. K-1} is training timestep
round((l + 1) T / K) - 1 (level K-1 is t = 99, pure noise), level -1 is clean; one network call moves a
position from level l to l - 1 by a deterministic DDIM update with per-position coefficients. Positions
before the executed one (To - 1 of them, the observation steps' actions) share the level of position
To - 1: after a shift they hold executed, clean actions, which are diffused forward to that level again.

SDP, settings from the authors' public code (github.com/Streaming-Diffusion-Policy/streaming_diffusion_policy,
``train_tedi_unet_ddim_lowdim_workspace.yaml`` and ``tedi_unet_lowdim_policy.py``), for horizon 16, To = 2:
  * chunks of c = 5 actions (their DDIM lowdim config's n_action_steps with horizon 16), h = (16 - 1) // 5 = 3
    chunks; K = 16 levels (their num_inference_steps); chunk i starts at level floor(K (i + 1) / h) - 1.
  * a replan runs calls until the first chunk is clean (5, 5 then 6 calls in a cycle: K / h = 5.33 on
    average) and executes its c = 5 actions.
  * first call of an episode: the buffer is zeros diffused to the ladder (their ``buffer_init: zero``).
RNR-DP, from the paper (noise-relaying buffer, sequential denoising, laddering initialization):
  * one action per replan, one network call per replan: position To-1+i sits at level i, so K = H - To + 1
    = 15 levels;
  * first call of an episode: laddering initialization, the buffer starts as pure noise at the top level and
    is denoised, each position stopping at its ladder level (K - 1 = 14 calls), then the ordinary call.
Per replan, ``nfe_per_replan`` and ``actions_per_replan`` give the steady-state cost (SDP 5.33 NFE per 5
actions, RNR-DP 1 NFE per action); the bench also measures both in its rollouts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from agents.diffusion_agents import AgentConfig, DiffusionAgent
from agents.per_position import SERVES, chunk_indices, has_per_position, ladder_targets, level_timesteps
from agents.samplers import randn

STREAMING_METHODS = ("sdp", "rnrdp")
STREAM_FOLDER = "streaming"  # <checkpoint>/streaming: the task's streaming backbone, beside <checkpoint>/predictor
SDP_CHUNK = 5  # authors' public code, DDIM lowdim config with horizon 16
SDP_LEVELS = 16


def find_streaming(checkpoint) -> Path | None:
    """The conventional place of a task's streaming backbone: ``<checkpoint>/streaming``."""
    candidate = Path(checkpoint) / STREAM_FOLDER
    return candidate if (candidate / "config.json").exists() else None


def check_streaming_config(method: str, config: dict, where: str) -> None:
    """Refuse a checkpoint that was not trained with per-position noise suited to ``method``."""
    mode = config.get("noise_mode", "chunk")
    if not config.get("per_position_timesteps") or method not in SERVES.get(mode, ()):
        raise ValueError(
            f"{method} needs a backbone trained with per-position noise levels (noise_mode "
            f"{' or '.join(m for m, s in SERVES.items() if method in s)}); {where} was trained with noise_mode "
            f"{mode!r}. Train one: step train-policy --noise-mode streaming --init-from <checkpoint> ... and export it "
            f"to <checkpoint>/{STREAM_FOLDER}.")
    if method == "sdp" and config.get("stream_chunk", SDP_CHUNK) != SDP_CHUNK:
        raise ValueError(f"sdp executes chunks of {SDP_CHUNK}; {where} was trained for chunks of {config['stream_chunk']}.")


class StreamingAgent(DiffusionAgent):
    """SDP / RNR-DP on a per-position-noise backbone; DiffusionAgent's history, validation and per-row generators."""

    def __init__(self, backbone, action_space, method: str, batch_size: int | None = None, seed: int = 0):
        if method not in STREAMING_METHODS:
            raise ValueError(f"Unknown streaming method {method!r}: {', '.join(STREAMING_METHODS)}.")
        if not has_per_position(backbone):
            raise ValueError(f"{method} needs a backbone trained with per-position noise levels "
                             "(step train-policy --noise-mode streaming); this backbone has one timestep per chunk.")
        super().__init__(backbone, AgentConfig(method="ddim", steps=1, seed=seed), action_space, batch_size)
        pc = backbone.cfg
        self.method = method
        self.horizon, self.to = pc.horizon, pc.n_obs_steps
        self.first = pc.n_obs_steps - 1  # buffer position of the action executed now
        if method == "sdp":
            self.chunk_len, self.levels = SDP_CHUNK, SDP_LEVELS
            idx = chunk_indices(pc.horizon, pc.n_obs_steps, SDP_CHUNK)
            chunks = int(idx.max()) + 1
            self.initial_levels = (torch.floor(SDP_LEVELS * (idx + 1.0) / chunks).long() - 1)
            self.nfe_per_replan = SDP_LEVELS / chunks
        else:
            self.chunk_len, self.levels = 1, pc.horizon - pc.n_obs_steps + 1
            self.initial_levels = ladder_targets(pc.horizon, pc.n_obs_steps)
            self.nfe_per_replan = 1.0
        if self.chunk_len < self.first:
            raise ValueError("The streaming chunk must be at least n_obs_steps - 1 long.")
        self.cfg = dataclasses.replace(self.cfg, steps=self.levels)
        self.actions_per_replan = self.chunk_len
        abar = backbone.model.noise_scheduler.alphas_cumprod.double()
        table = level_timesteps(torch.arange(self.levels).float(), self.levels, pc.num_train_timesteps)
        self.level_t = torch.cat([torch.zeros(1, dtype=torch.long), table])  # index l + 1; clean -> t 0 (unused)
        ab = torch.cat([torch.ones(1, dtype=torch.float64), abar[table]])
        self.sqrt_ab = ab.sqrt().float()
        self.sqrt_1m_ab = (1 - ab).sqrt().float()
        self.clip = pc.clip_sample_range if pc.clip_sample else None

    # ----- episode state -----
    def reset(self) -> None:
        super().reset()
        self.buffer: Tensor | None = None
        self.buffer_levels: Tensor | None = None  # (H,) the same for every row: the schedule is deterministic

    # ----- the ladder -----
    def _noise_to(self, x0: Tensor, levels: Tensor) -> Tensor:
        i = levels + 1
        return self.sqrt_ab[i].view(1, -1, 1) * x0 + self.sqrt_1m_ab[i].view(1, -1, 1) * randn(
            x0.shape, self.generators, x0.device)

    def _call(self, x: Tensor, levels: Tensor, cond: Tensor, move: Tensor) -> tuple[Tensor, Tensor]:
        """One network call: positions in ``move`` go one level down (DDIM, eta = 0)."""
        i = levels + 1
        t = self.level_t[i].unsqueeze(0).expand(x.shape[0], -1)
        eps = self.backbone.denoise(x, t, cond)
        x0 = (x - self.sqrt_1m_ab[i].view(1, -1, 1) * eps) / self.sqrt_ab[i].view(1, -1, 1)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        j = (levels - 1).clamp_min(-1) + 1
        x_new = self.sqrt_ab[j].view(1, -1, 1) * x0 + self.sqrt_1m_ab[j].view(1, -1, 1) * eps
        x = torch.where(move.view(1, -1, 1), x_new, x)
        return x, torch.where(move, levels - 1, levels)

    def _initialise(self, cond: Tensor) -> None:
        shape = (self.rows, *self.backbone.action_shape)
        target = self.initial_levels.clone()
        if self.method == "sdp":  # zeros diffused to the ladder (SDP's buffer_init "zero")
            self.buffer = self._noise_to(torch.zeros(shape), target)
            self.buffer_levels = target
            return
        # RNR-DP laddering initialization: from pure noise, each position stops at its ladder level
        levels = torch.full_like(target, self.levels - 1)
        x = randn(shape, self.generators, cond.device)
        while bool((levels > target).any()):
            x, levels = self._call(x, levels, cond, levels > target)
        self.buffer, self.buffer_levels = x, levels

    def plan(self, cond: Tensor) -> Tensor:
        """Denoise until the first chunk is clean; returns that buffer, and leaves the shifted one for the next call."""
        if self.buffer is None:
            self._initialise(cond)
        x, levels = self.buffer, self.buffer_levels
        last = self.first + self.chunk_len - 1
        while int(levels[last]) >= 0:
            x, levels = self._call(x, levels, cond, levels >= 0)
        planned = x
        # shift out the executed chunk, append fresh noise at the top level
        c = self.chunk_len
        fresh = randn((self.rows, c, x.shape[2]), self.generators, x.device)
        x = torch.cat([x[:, c:], fresh], dim=1)
        levels = torch.cat([levels[c:], torch.full((c,), self.levels - 1, dtype=torch.long)])
        if self.first:  # the observation steps' positions: executed actions, diffused to the level of To-1
            past = torch.full((self.first,), int(levels[self.first]), dtype=torch.long)
            x = torch.cat([self._noise_to(x[:, : self.first], past), x[:, self.first:]], dim=1)
            levels = torch.cat([past, levels[self.first:]])
        self.buffer, self.buffer_levels = x, levels
        return planned

    def _replan(self) -> None:
        with torch.inference_mode():
            cond = self.backbone.global_cond(self.history)
            chunk = self.plan(cond)
            actions = self.backbone.unnormalize_action(chunk[:, self.first: self.first + self.chunk_len])
        self.last_chunk = chunk
        self.cache = np.clip(actions.numpy(), self.low, self.high).astype(np.float32)
        self.cache_index = 0
        self.n_replans += 1


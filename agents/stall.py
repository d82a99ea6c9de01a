"""Velocity-aware perturbation: detect a stalled policy from consecutive chunks, switch (lam, sigma).

delta_t = mean |A_t - A_{t-1}| between two consecutive chunks (normalised action space). Stalled when
delta_t < eps; then the warm start uses (lam_stall, sigma_stall) instead of (lam, sigma).

Which entries are compared (``align``):
  * "index" (default): A_t[j] against A_{t-1}[j], j over the whole chunk. The chunks were planned
    Ta env steps apart, so this is how far the plan moved in Ta steps: about |velocity| x Ta for a
    moving robot and ~0 for a stalled one, which is the stagnation the paper detects ("consecutive
    actions exhibit minimal variation").
  * "time": A_t[j] against A_{t-1}[j + Ta], the part of both chunks that covers the same env steps.
    This measures how much the plan changed, and is ~0 for a robot that moves smoothly as planned,
    so it cannot tell moving from stalled; kept for the ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StallConfig:
    enabled: bool = True
    eps: float = 0.01  # stall threshold on delta (normalised units)
    lam: float = 1.0  # predictor retention, normal execution
    sigma: float = 0.0  # extra perturbation, normal execution
    lam_stall: float = 1.0  # predictor retention when stalled (paper: in [0, 1])
    sigma_stall: float = 0.1  # small in simulation; about 1.0-1.4 on the real arm (paper, App. B)
    align: str = "index"  # "index" or "time", see the module docstring


def chunk_delta(prev: Tensor, cur: Tensor, shift: int, align: str = "index") -> Tensor:
    """Per-row mean |cur - prev|; prev, cur: (B, H, A) -> (B,)."""
    if align == "index":
        return (cur - prev).abs().mean(dim=(1, 2))
    if align != "time":
        raise ValueError(f"align must be 'index' or 'time', got {align!r}")
    horizon = cur.shape[1]
    if not 0 < shift < horizon:
        raise ValueError(f"shift must be in (0, {horizon}), got {shift}")
    return (cur[:, : horizon - shift] - prev[:, shift:]).abs().mean(dim=(1, 2))


class StallDetector:
    """Keeps the last delta per row; ``coefficients()`` gives (lam, sigma, stalled) for the next warm start."""

    def __init__(self, cfg: StallConfig, shift: int):
        self.cfg = cfg
        self.shift = shift
        self.reset()  # a detector is usable before any reset() (an agent's first act() may come first)

    def reset(self) -> None:
        self.delta: Tensor | None = None

    def update(self, prev: Tensor | None, cur: Tensor) -> Tensor | None:
        """Record delta between the previous and the new chunk (None on the first chunk of an episode)."""
        self.delta = None if prev is None else chunk_delta(prev, cur, self.shift, self.cfg.align)
        return self.delta

    def stalled(self, batch: int) -> Tensor:
        if not self.cfg.enabled or self.delta is None:
            return torch.zeros(batch, dtype=torch.bool)
        return self.delta < self.cfg.eps

    def coefficients(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(lam, sigma) as (B, 1, 1) tensors, and the (B,) stalled mask."""
        stalled = self.stalled(batch)
        lam = torch.where(stalled, self.cfg.lam_stall, self.cfg.lam).view(batch, 1, 1)
        sigma = torch.where(stalled, self.cfg.sigma_stall, self.cfg.sigma).view(batch, 1, 1)
        return lam, sigma, stalled

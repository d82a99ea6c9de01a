"""The STEP predictor f(o_t, A_{t-1}) -> Â_t, in the backbone's normalised action space.

Architecture (paper Fig. 2 and App. F.2), d = 128:
  * conditioning tokens: one token per observation step (the backbone's global condition split by
    step, so state and image variants share the code) and one token per step of the previous chunk,
    each with a learned position; a small self-attention encoder mixes them;
  * action tokens (queries): learned positions plus the embedded previous chunk shifted by Ta, i.e.
    the temporal guess for the steps the new chunk covers;
  * 2 cross-attention blocks (queries attend to the encoded conditioning), LayerNorm, Linear.
  * The output is a residual on the shifted previous chunk (the "temporal-only" guess), so the network
    learns the correction that makes the guess agree with the current observation (paper App. F.2).

First call of an episode (no previous chunk): the previous-chunk tokens are replaced by a learned
"no history" token and the residual base by zero. Training drops the previous chunk with probability
``prev_dropout`` so this mode is trained too (the spatial-only prediction); STEP uses it for the first
chunk of every episode, then warm-starts exactly as on later calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PredictorConfig:
    horizon: int = 16
    action_dim: int = 2
    n_obs_steps: int = 2
    cond_dim: int = 36  # backbone global-condition size = n_obs_steps * per-step features
    shift: int = 8  # Ta: the previous chunk was planned this many env steps earlier
    d_model: int = 128
    n_heads: int = 4
    ff_dim: int = 256
    n_encoder_layers: int = 1
    n_cross_blocks: int = 2
    dropout: float = 0.0
    use_prev: bool = True  # False: the spatial-only ablation (observation in, chunk out)
    prev_dropout: float = 0.15  # training: probability of hiding the previous chunk (first-call mode)

    @classmethod
    def for_policy(cls, policy, action_dim: int, cond_dim: int, **fields) -> "PredictorConfig":
        """The predictor of a backbone: horizon, observation steps and shift (Ta) come from its ``PolicyConfig``."""
        return cls(horizon=policy.horizon, action_dim=action_dim, n_obs_steps=policy.n_obs_steps, cond_dim=cond_dim,
                   shift=policy.n_action_steps, **fields)

    @classmethod
    def from_dict(cls, data: dict) -> "PredictorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def shift_chunk(prev: Tensor, shift: int) -> Tensor:
    """The previous chunk moved ``shift`` steps forward; the tail repeats its last action (hold)."""
    tail = prev[:, -1:].expand(-1, shift, -1)
    return torch.cat([prev[:, shift:], tail], dim=1)


class CrossBlock(nn.Module):
    """Pre-norm cross-attention + MLP. Written on scaled_dot_product_attention rather than
    nn.MultiheadAttention: same maths, a fraction of the per-call Python overhead at batch 1."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm_q = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, q: Tensor, memory: Tensor) -> Tensor:
        b, n, d = q.shape
        h = self.heads
        query = self.q(self.norm_q(q)).view(b, n, h, d // h).transpose(1, 2)
        key, value = self.kv(memory).view(b, memory.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        q = q + self.out(att.transpose(1, 2).reshape(b, n, d))
        return q + self.ff(self.norm_ff(q))


class Predictor(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        if cfg.cond_dim % cfg.n_obs_steps:
            raise ValueError(f"cond_dim {cfg.cond_dim} is not a multiple of n_obs_steps {cfg.n_obs_steps}")
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}")
        self.cfg = cfg
        d = cfg.d_model
        self.obs_embed = nn.Linear(cfg.cond_dim // cfg.n_obs_steps, d)
        self.obs_pos = nn.Parameter(torch.randn(cfg.n_obs_steps, d) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(cfg.horizon, d) * 0.02)
        if cfg.use_prev:
            self.prev_embed = nn.Linear(cfg.action_dim, d)
            self.prev_pos = nn.Parameter(torch.randn(cfg.horizon, d) * 0.02)
            self.no_prev = nn.Parameter(torch.zeros(1, 1, d))
            self.base_embed = nn.Linear(cfg.action_dim, d)
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, cfg.ff_dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # 0 layers: the cross blocks attend to the embedded tokens directly (the small, low-latency variant)
        self.encoder = (nn.TransformerEncoder(layer, cfg.n_encoder_layers, enable_nested_tensor=False)
                        if cfg.n_encoder_layers else nn.Identity())
        self.blocks = nn.ModuleList(CrossBlock(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.n_cross_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.action_dim)
        nn.init.zeros_(self.head.weight)  # start as the temporal guess (residual = 0)
        nn.init.zeros_(self.head.bias)

    def forward(self, cond: Tensor, prev: Tensor | None = None, has_prev: Tensor | None = None) -> Tensor:
        """cond: (B, cond_dim); prev: (B, H, A) normalised or None; has_prev: (B,) bool -> (B, H, A)."""
        cfg = self.cfg
        batch = cond.shape[0]
        obs = self.obs_embed(cond.view(batch, cfg.n_obs_steps, -1)) + self.obs_pos
        queries = self.query_pos.expand(batch, -1, -1)
        base = None
        if cfg.use_prev:
            if prev is None:
                prev = cond.new_zeros(batch, cfg.horizon, cfg.action_dim)
                has_prev = torch.zeros(batch, dtype=torch.bool, device=cond.device)
            if has_prev is None:  # every row has a previous chunk: skip the masking ops (hot path)
                prev_tok = self.prev_embed(prev) + self.prev_pos
                base = shift_chunk(prev, cfg.shift)
            else:
                keep = has_prev.view(batch, 1, 1).to(cond.dtype)
                prev_tok = keep * self.prev_embed(prev) + (1 - keep) * self.no_prev + self.prev_pos
                base = keep * shift_chunk(prev, cfg.shift)
            tokens = torch.cat([obs, prev_tok], dim=1)
            queries = queries + self.base_embed(base)
        else:
            tokens = obs
        memory = self.encoder(tokens)
        for block in self.blocks:
            queries = block(queries, memory)
        out = self.head(self.norm(queries))
        return out if base is None else base + out

"""Batch-1 chunk latency of each method, beside the bare one-NFE time measured in the same run.

Timing is of one chunk inference (observation history -> normalised chunk: global condition,
predictor for STEP, k denoiser calls, sampler updates), the part that differs between methods.
Each method's block is preceded by its own NFE measurement, so ``ratio = median / (steps x NFE)`` is
computed from numbers taken seconds apart on the same (possibly noisy, shared) machine. STEP is
timed in steady state: every timed call has the previous call's chunk as its history.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from agents.backbone import PRESETS, Backbone, FeatureSpec
from agents.diffusion_agents import DEFAULT_STEPS, AgentConfig, DiffusionAgent, split_method
from agents.predictor import Predictor, PredictorConfig


@dataclass
class LatencyConfig:
    methods: tuple[str, ...] = ("ddpm:100", "ddim:4", "ddim:2", "dpmsolver:4", "dpmsolver:2", "step:4", "step:2")
    calls: int = 50
    warmup: int = 5
    nfe_calls: int = 100
    threads: int = 1
    seed: int = 0


def _random_history(backbone: Backbone, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A plausible raw-unit observation history (uniform within the normaliser's data range)."""
    norm, feats, steps = backbone.normalizer, backbone.features, backbone.cfg.n_obs_steps

    def within(lo, hi):
        return lo + (hi - lo) * torch.rand((1, steps, lo.shape[0]), generator=generator)

    hist = {"observation.state": within(norm.state_min, norm.state_max)}
    if feats.env_state_dim:
        hist["observation.environment_state"] = within(norm.env_min, norm.env_max)
    for cam, (h, w, c) in feats.cameras.items():
        hist[f"observation.images.{cam}"] = torch.randint(0, 256, (1, steps, c, h, w), generator=generator, dtype=torch.uint8)
    return hist


def _ms(samples: list[float]) -> dict:
    arr = np.asarray(samples) * 1e3
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90))}


def time_nfe(backbone: Backbone, history: dict, calls: int, warmup: int = 5) -> float:
    """Median seconds of one bare denoiser call at batch 1."""
    with torch.inference_mode():
        cond = backbone.global_cond(history)
        x = torch.randn(1, *backbone.action_shape)
        t = torch.tensor([backbone.cfg.num_train_timesteps // 2])
        for _ in range(warmup):
            backbone.denoise(x, t, cond)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            backbone.denoise(x, t, cond)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_latency(backbone: Backbone, predictor: Predictor | None, cfg: LatencyConfig, action_space) -> list[dict]:
    from agents.factory import parse_method

    torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = _random_history(backbone, generator)
    rows = []
    for spec in cfg.methods:
        name, steps = parse_method(spec)
        method, warm_source = split_method(name)
        steps = DEFAULT_STEPS[method] if steps is None else steps  # step:0 runs no NFE
        agent = DiffusionAgent(backbone, AgentConfig(method=method, steps=steps, seed=cfg.seed, warm_source=warm_source),
                               action_space, predictor=predictor if method == "step" else None)
        nfe = time_nfe(backbone, history, cfg.nfe_calls)
        agent.reset()
        for _ in range(cfg.warmup):
            agent.chunk(history)
        samples = []
        for _ in range(cfg.calls):
            t0 = time.perf_counter()
            agent.chunk(history)
            samples.append(time.perf_counter() - t0)
        latency = _ms(samples)
        rows.append({
            "method": name,
            "steps": steps,
            "latency_ms": latency,
            "nfe_ms_median": nfe * 1e3,
            # step:0 (predictor only, no NFE): its time in units of one NFE
            "ratio": latency["median"] / (max(steps, 1) * nfe * 1e3),
        })
    return rows


def default_backbone(task: str = "pusht", preset: str = "pusht_state") -> tuple[Backbone, object]:
    """A freshly initialised backbone for the task's state variant (timing only)."""
    from agents.checkpoint import features_from_spaces
    from step_envs.registry import make_env

    env = make_env(task, obs_type="state" if preset != "pusht_image" else "pixels")
    features: FeatureSpec = features_from_spaces(env.observation_space, env.action_space)
    action_space = env.action_space
    env.close()
    return Backbone(PRESETS[preset], features).eval(), action_space


def fresh_predictor(backbone: Backbone) -> Predictor:
    with torch.inference_mode():
        cond_dim = backbone.global_cond(_random_history(backbone, torch.Generator().manual_seed(0))).shape[1]
    pc = backbone.cfg
    return Predictor(PredictorConfig(horizon=pc.horizon, action_dim=backbone.features.action_dim, n_obs_steps=pc.n_obs_steps,
                                     cond_dim=cond_dim, shift=pc.n_action_steps)).eval()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | steps | median ms | p90 ms | NFE ms | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['latency_ms']['median']:.2f} | {r['latency_ms']['p90']:.2f} | "
                     f"{r['nfe_ms_median']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines)

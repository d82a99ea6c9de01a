"""Batch-1 chunk latency of each method, beside the bare one-NFE time measured in the same run.

Timing is of one chunk inference (observation history -> normalised chunk: global condition,
predictor for STEP, k denoiser calls, sampler updates), the part that differs between methods.
Each method's chunk calls are timed interleaved with its own bare NFE calls (``rounds`` alternating blocks of
each, the first calls of every block untimed), so ``ratio = median / (steps x NFE)`` compares two medians taken
under the same machine conditions: on a shared machine the speed drifts by 10-20 % within seconds, which a
block of NFE calls followed by a block of chunk calls turned straight into the ratio. The observation encoder
(history -> global condition; for image policies a large part of a replan) is timed in its own interleaved
blocks too: ``ratio_with_encode = median / (encode + steps x NFE)``. The NFE is the same
runtime's bare denoiser call at the same batch and thread count (ONNX: ``unet.onnx`` in the agent's own session
options). STEP is timed in steady state: every timed call has the previous call's chunk as its history.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from agents.backbone import PRESETS, Backbone, FeatureSpec
from agents.compute import torch_threads
from agents.config_files import option, validate_fields
from agents.factory import DEFAULT_METHODS, make_agent, parse_method
from agents.predictor import Predictor, PredictorConfig


@dataclass
class LatencyConfig:
    task: str = "pusht"
    methods: tuple[str, ...] = option(DEFAULT_METHODS, help="comma-separated method specs, e.g. ddim:2,step:2")
    checkpoint: str | None = option(None, help="policy checkpoint (default: the task's committed checkpoint, see "
                                               "agents/checkpoint.py:default_checkpoint; an untrained backbone if none)")
    predictor: str | None = option(None, help="predictor checkpoint (default <checkpoint>/predictor)")
    preset: str | None = option(None, choices=PRESETS, help="time a fresh untrained backbone of this preset instead "
                                                           "(default pusht_state when the task has no checkpoint)")
    calls: int = option(50, min=1, help="timed calls per method (>= 50 for reports)")
    warmup: int = option(5, min=0)
    nfe_calls: int = option(100, min=1, help="timed bare denoiser calls per method (interleaved with its chunk calls)")
    rounds: int = option(3, min=1, help="alternating blocks of NFE and chunk calls per method")
    threads: int = option(1, min=1, help="torch threads (fixed for the whole run)")
    runtime: tuple[str, ...] = option(("torch",), help="torch, onnx, or torch,onnx: every method in each runtime, "
                                      "side by side in one run (ONNX Runtime: intra-op threads = --threads)")
    seed: int = 0
    json: str | None = option(None, help="write the rows here")

    def __post_init__(self):
        validate_fields(self)
        if not self.methods:
            raise ValueError("--methods is empty")
        bad = [r for r in self.runtime if r not in ("torch", "onnx")]
        if bad or not self.runtime:
            raise ValueError(f"--runtime takes torch and/or onnx, got {','.join(self.runtime) or 'nothing'}.")


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


def nfe_call(agent, history: dict):
    """A zero-argument callable running one bare denoiser call of ``agent``'s runtime at its batch size."""
    if hasattr(agent, "nfe_call"):  # ONNX Runtime: one unet.onnx call
        return agent.nfe_call(history)
    backbone = agent.backbone
    with torch.inference_mode():
        cond = backbone.global_cond(history)
        x = torch.randn(cond.shape[0], *backbone.action_shape)
        t = torch.full((cond.shape[0],), backbone.cfg.num_train_timesteps // 2, dtype=torch.long)

    def call():
        with torch.inference_mode():  # as agent.chunk runs
            backbone.denoise(x, t, cond)
    return call


def encode_call(agent, history: dict):
    """A zero-argument callable running ``agent``'s observation encoder once (history -> global condition: image
    encoders and state normalisation; ONNX: one encoder.onnx call). A replan runs it once, never per step."""
    if hasattr(agent, "encode_call"):
        return agent.encode_call(history)
    backbone = agent.backbone

    def call():
        with torch.inference_mode():
            backbone.global_cond(history)
    return call


def _warm(fn, calls: int, seconds: float) -> None:
    """Untimed calls: ``calls`` of them or until ``seconds`` have passed, at least one."""
    end = time.perf_counter() + seconds
    for _ in range(max(calls, 1)):
        fn()
        if time.perf_counter() > end:
            break


def alternating_samples(blocks: list[tuple[str, object, int]], rounds: int, warmup_calls: int = 20,
                        warmup_s: float = 0.1) -> dict[str, list[float]]:
    """Seconds of every timed call of each ``(name, fn, calls)`` block, the blocks run in turn ``rounds`` times (each
    block's calls split over the rounds).

    Each block starts with untimed calls (up to ``warmup_calls`` or ``warmup_s`` seconds): after a switch the
    caches hold the other network's weights (the ONNX NFE and chunk graphs are separate sessions, each with its
    own 17 MB copy of the U-Net), and on this class of machine the shared L3 takes ~20 calls to hold the new copy
    again (measured: DDIM-1 / NFE 1.13 after one warm-up call per block, 1.045 after 20)."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in blocks}
    for r in range(rounds):
        for name, fn, n in blocks:
            _warm(fn, warmup_calls, warmup_s)
            for _ in range(n // rounds + (r < n % rounds)):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return samples


def interleaved_medians(nfe, chunk, nfe_calls: int, calls: int, rounds: int, warmup_calls: int = 20,
                        warmup_s: float = 0.1, encode=None) -> tuple[float, list, float | None]:
    """(median seconds of ``nfe()``, every timed ``chunk()`` in seconds, median seconds of ``encode()`` or None)
    from ``rounds`` alternating blocks (encode's blocks, when given, as long as nfe's; see alternating_samples)."""
    rounds = max(1, min(rounds, calls, nfe_calls))
    blocks = [("nfe", nfe, nfe_calls), ("chunk", chunk, calls)]
    if encode is not None:
        blocks.append(("encode", encode, nfe_calls))
    samples = alternating_samples(blocks, rounds, warmup_calls, warmup_s)
    encode_median = statistics.median(samples["encode"]) if encode is not None else None
    return statistics.median(samples["nfe"]), samples["chunk"], encode_median


def count_nfe(agent, history: dict, calls: int) -> float:
    """Mean network calls per ``agent.chunk`` over ``calls`` calls (a forward hook on the U-Net, untimed)."""
    if hasattr(agent, "count_nfe"):  # ONNX Runtime agents count their own graph's network calls
        return agent.count_nfe(history, calls)
    count = [0]
    handle = agent.backbone.model.unet.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        for _ in range(calls):
            agent.chunk(history)
    finally:
        handle.remove()
    return count[0] / calls


def measure_latency(backbone: Backbone, predictor: Predictor | None, cfg: LatencyConfig, action_space) -> list[dict]:
    """Latency rows of ``cfg.methods`` with ``cfg.threads`` torch threads; the caller's count is restored afterwards
    (`step bench` rolls out with its own)."""
    with torch_threads(cfg.threads):
        return _latency_rows(backbone, predictor, cfg, action_space)


def _latency_rows(backbone: Backbone, predictor: Predictor | None, cfg: LatencyConfig, action_space) -> list[dict]:
    generator = torch.Generator().manual_seed(cfg.seed)
    history = _random_history(backbone, generator)
    # make_agent reads only the action space when the backbone is given (no env is stepped here)
    spaces = SimpleNamespace(observation_space=None, action_space=action_space)
    rows = []
    for spec, runtime in [(spec, runtime) for spec in cfg.methods for runtime in cfg.runtime]:
        from agents.peers import timing_backbone  # sdp / rnrdp on a chunk backbone: timed on a per-position copy

        extra = {"runtime": runtime} if runtime != "torch" else {}  # ONNX: agents/onnx_runtime.py
        agent = make_agent(spec, spaces, seed=cfg.seed, backbone=timing_backbone(spec, backbone), predictor_model=predictor,
                           **extra)
        steps = agent.cfg.steps  # step:0 runs no NFE
        nfe_fn = nfe_call(agent, history)  # this runtime's own one-NFE call (ONNX: one unet.onnx call)
        for _ in range(cfg.warmup):
            nfe_fn()
        agent.reset()
        for _ in range(cfg.warmup):
            agent.chunk(history)
        nfe, samples, encode = interleaved_medians(nfe_fn, lambda: agent.chunk(history), cfg.nfe_calls, cfg.calls,
                                                   cfg.rounds, encode=encode_call(agent, history))
        latency = _ms(samples)
        # Per replan: the network calls (counted on untimed calls after the timed ones, in the same steady state)
        # and the actions it executes, so chunked (Ta per replan) and streaming (1 or 5) methods compare per action.
        nfe_per_replan = count_nfe(agent, history, max(cfg.warmup, 3))
        actions = getattr(agent, "actions_per_replan", backbone.cfg.n_action_steps)
        rows.append({
            "method": parse_method(spec)[0],
            "steps": steps,
            "runtime": runtime,
            "latency_ms": latency,
            "nfe_ms_median": nfe * 1e3,
            "encode_ms_median": encode * 1e3,
            "nfe_per_replan": nfe_per_replan,
            "actions_per_replan": actions,
            "ms_per_action": latency["median"] / actions,
            # step:0 (predictor only, no NFE): its time in units of one NFE
            "ratio": latency["median"] / (max(nfe_per_replan, 1) * nfe * 1e3),
            # the chunk time includes one encoding: against encode + k NFE (what matters for image policies)
            "ratio_with_encode": latency["median"] / ((encode + max(nfe_per_replan, 1) * nfe) * 1e3),
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
    return Predictor(PredictorConfig.for_policy(backbone.cfg, backbone.features.action_dim, cond_dim)).eval()


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | steps | median ms / replan | p90 ms | NFE / replan | actions / replan | ms / action | NFE ms | "
             "encode ms | ratio | ratio with encode |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        method = r["method"] + (f" ({r['runtime']})" if r.get("runtime", "torch") != "torch" else "")
        lines.append(f"| {method} | {r['steps']} | {r['latency_ms']['median']:.2f} | {r['latency_ms']['p90']:.2f} | "
                     f"{r['nfe_per_replan']:.2f} | {r['actions_per_replan']} | {r['ms_per_action']:.2f} | "
                     f"{r['nfe_ms_median']:.2f} | {r['encode_ms_median']:.2f} | {r['ratio']:.3f} | "
                     f"{r['ratio_with_encode']:.3f} |")
    return "\n".join(lines)


def runtime_comparison(rows: list[dict]) -> list[dict]:
    """Per method measured in both runtimes: ONNX's median and ratio beside torch's, and the speed-up."""
    by = {(r["method"], r["steps"], r.get("runtime", "torch")): r for r in rows}
    out = []
    for (method, steps, runtime), r in by.items():
        other = by.get((method, steps, "onnx"))
        if runtime != "torch" or other is None:
            continue
        out.append({"method": method, "steps": steps, "torch_ms": r["latency_ms"]["median"],
                    "onnx_ms": other["latency_ms"]["median"], "torch_ratio": r["ratio"], "onnx_ratio": other["ratio"],
                    "onnx_speedup": r["latency_ms"]["median"] / other["latency_ms"]["median"]})
    return out

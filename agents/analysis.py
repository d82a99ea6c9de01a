"""``step analyze``: the STEP paper's Appendix E measured on our own checkpoints.

Five analyses, each a function ``(TaskContext, AnalyzeConfig) -> dict`` (JSON-able), with a Markdown
table and a plot written by ``write_analysis``:

* ``lipschitz`` (Tables 10 and 11, left half): the spectral norm of every linear operator of the backbone
  (Linear, Conv1d/2d, ConvTranspose1d), grouped into down / mid / up / other as Table 10, min / max and
  log10 of the product of the group maxima; plus the empirical local Lipschitz constant of the noise
  network in the noisy action, ``L_emp = max ||d eps_theta(x, t, o) / dx||_2`` over validation windows
  and timesteps (the Jacobian's spectral norm by power iteration on JVP / VJP).
* ``contraction`` (Table 11, right half): DDIM trajectories from random starts and from STEP's warm start;
  the ratio of distances to the trajectory's own final sample between consecutive steps
  (``||x_i - x_N|| / ||x_{i-1} - x_N||``), per step and averaged (rho); and, closer to the proof's error
  recursion (D.13), the ratio of distances to a reference trajectory started from the expert's chunk
  noised with the same noise (``rho_pair``).
* ``kselect`` (Table 12, Figures 10-11): for K' = 1, 2, ... DDIM steps, the MSE between STEP's
  K'-step warm-started sample and a DDPM-100 reference sample drawn from the same initial noise, the same
  for DDIM-K' from that noise, the predictor's own MSE, and the paper's convergence condition
  (Proposition D.14 / its Eq. 61 in the authors' proof):

      predictor MSE  <=  eps_tol^2 / (rho^(2 K') * alpha^2),   eps_tol = 0.1, alpha = 1.0 (paper defaults)

  K'* is the smallest candidate K' meeting it (the paper's "smallest step that satisfies the convergence
  condition"). MSE is the per-element mean in the policy's normalised action space, as the paper's
  figures compare it with eps_tol^2.
* ``mare`` (Table 15 / App. F.2): ``agents.training.evaluate_predictors`` on windows from rollouts: the
  STEP predictor, spatial only (the same predictor without a previous chunk, what ``step-spatial``
  warm-starts from) and temporal only (the previous chunk shifted by Ta, what ``step-temporal`` and action
  reuse warm-start from; RTI-DP's initial guess, ``agents/rtidp.py``), and Falcon's reused chunk (the previous
  chunk shifted and diffused to Falcon's intermediate step, read out by one NFE under the current
  observation: ``falcon_reuse_error``). BRIDGER does not exist in this library yet.
* ``predictor-only``: closed-loop rollouts of ``step:0`` (the predictor's chunk executed as it is) beside
  DDPM-100 and STEP-k, with the consistency of consecutive chunks in closed loop; and, offline on the same
  validation windows, the spread of DDPM-100's and STEP-k's samples, the distance between them and the
  predictor, and each one's distance to the expert's chunk.

Validation windows (every analysis but the spectral norms): the task's scripted expert (or any agent spec,
``window_source``) is rolled out on evaluation seeds; its observations and actions are recorded, and
windows are built exactly as ``step train-predictor`` builds its pairs (``build_predictor_pairs``,
``prev_source="dataset"``): the observation history (n_obs_steps frames) at a frame, the target chunk
(the recorded actions from that frame), and the previous chunk (the recorded action window Ta frames
earlier). Only windows that have a previous chunk are used. Nothing is cached outside the output folder;
no dataset is needed, so the analyses run from a fresh clone on the committed checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from agents.config_files import option, validate_fields
from step_envs.seeds import EVAL_SEEDS

ANALYSES = ("lipschitz", "contraction", "kselect", "mare", "predictor-only")
REPO_ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("down", "mid", "up", "other")
# Sub-modules that act on the observation / timestep, not on the noisy action x.
COND_PATH = ("cond_encoder", "diffusion_step_encoder", "rgb_encoder")


@dataclass
class AnalyzeConfig:
    tasks: tuple[str, ...] = option(("pusht",), help="comma-separated tasks, e.g. pusht,lift,can,square")
    checkpoint: str | None = option(None, help="policy checkpoint (one task only; default: the task's committed "
                                               "checkpoint)")
    out: str | None = option(None, help="output folder (default results/analysis[/<analysis>])")
    seed_start: int = EVAL_SEEDS.start  # first evaluation seed, for the windows' rollouts and the closed-loop rollouts
    window_episodes: int = option(20, min=1, help="rollouts that provide the validation windows")
    window_source: str = "expert"  # or an agent spec (e.g. "ddim:8"), rolled out on the task's checkpoint
    windows: int = option(512, min=1, help="windows used by contraction and mare (a fixed random subset)")
    num_envs: int = option(20, min=1, help="envs per rollout wave (20 episodes: one wave, one batched call per replan)")
    seed: int = 0
    threads: int = 0  # 0: every core
    batch: int = option(256, min=1, help="rows per network call")
    progress: bool = True
    # lipschitz
    power_iters: int = option(100, min=1, help="power iterations per convolution (stops early at 1e-7 relative change)")
    lip_windows: int = option(32, min=1)
    lip_timesteps: tuple[int, ...] = (0, 10, 25, 50, 75, 99)
    lip_iters: int = option(10, min=1, help="JVP/VJP power iterations per (window, timestep)")
    # contraction
    contraction_steps: tuple[int, ...] = (10, 4, 2)  # DDIM schedules measured; the first gives kselect's rho
    # kselect
    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10)
    eps_tol: float = 0.1
    alpha: float = 1.0
    rho: float | None = None  # override the measured rho
    kselect_windows: int = option(256, min=1)
    # predictor-only
    methods: tuple[str, ...] = ("ddpm:100", "step:2", "step:0")
    episodes: int = option(20, min=1)
    max_steps: int | None = None  # cap closed-loop episodes (smoke runs only)
    spread_windows: int = option(64, min=1)
    spread_samples: int = option(4, min=2, help="samples per window (a spread needs two)")

    def __post_init__(self):
        check_config(self)


# ================================================================ per-task context and windows
@dataclass
class ValidationWindows:
    """Windows recorded from rollouts: ``pairs`` (a PredictorData) in a fixed random order."""

    source: str
    seed_start: int
    episodes: int
    successes: int
    frames: int
    pairs: object  # agents.training.PredictorData, every row has a previous chunk
    obs_sample: dict  # one raw observation history (shapes for the layer hooks)
    available: int  # windows with a previous chunk in the rollouts (``pairs`` holds a random subset)

    def take(self, n: int):
        from agents.training import PredictorData

        p = self.pairs
        n = min(n, len(p.cond))
        return PredictorData(p.cond[:n], p.target[:n], p.prev[:n], p.has_prev[:n])

    def used(self, n: int | None) -> int:
        return len(self.pairs.cond) if n is None else min(n, len(self.pairs.cond))

    def describe(self, used: int | None = None) -> str:
        return (f"{self.source} rollouts on evaluation seeds {self.seed_start}-{self.seed_start + self.episodes - 1} "
                f"({self.episodes} episodes, {self.successes} successful, {self.frames} frames); "
                f"{self.used(used)} of {self.available} windows with a previous chunk")

    def meta(self, used: int | None = None) -> dict:
        return {"source": self.source, "seeds": [self.seed_start, self.seed_start + self.episodes - 1],
                "episodes": self.episodes, "successes": self.successes, "frames": self.frames,
                "windows_available": self.available, "windows_used": self.used(used), "text": self.describe(used)}


@dataclass
class TaskContext:
    task: str
    checkpoint: Path
    backbone: object
    policy_config: dict
    predictor: object | None
    _windows: ValidationWindows | None = None
    _env: object | None = None  # one vector env for every rollout of the task (robosuite envs are slow to make)

    def env(self, cfg: AnalyzeConfig):
        if self._env is None:
            from step_envs.registry import make_env

            width = min(cfg.num_envs, max(cfg.window_episodes, cfg.episodes))
            self._env = make_env(self.task, obs_type=self.policy_config["obs_type"], num_envs=width)
        return self._env

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def need_predictor(self):
        if self.predictor is None:
            raise ValueError(f"{self.checkpoint} has no predictor (expected {self.checkpoint}/predictor); "
                             "train one with `step train-predictor`.")
        return self.predictor

    def windows(self, cfg: AnalyzeConfig) -> ValidationWindows:
        if self._windows is None:
            self._windows = collect_windows(self, cfg)
        return self._windows


def check_config(cfg: AnalyzeConfig) -> None:
    """Clear one-line errors for bad input, when the config is made (``AnalyzeConfig.__post_init__``)."""
    from step_envs.registry import get_task
    from step_envs.seeds import EVAL_SEEDS

    if not cfg.tasks:
        raise ValueError("--tasks is empty")
    for task in cfg.tasks:
        get_task(task)  # "Unknown task ..."
    if cfg.checkpoint and len(cfg.tasks) > 1:
        raise ValueError("--checkpoint names one policy; with several --tasks each task uses checkpoints/<task>.")
    validate_fields(cfg)  # the fields' declared minimums
    last = cfg.seed_start + max(cfg.window_episodes, cfg.episodes) - 1
    if cfg.seed_start < EVAL_SEEDS.start or last >= EVAL_SEEDS.stop:
        raise ValueError(f"Seeds {cfg.seed_start}-{last} leave the evaluation block {EVAL_SEEDS.start}-"
                         f"{EVAL_SEEDS.stop - 1} (step_envs/seeds.py); demonstration seeds would be training data.")
    if not cfg.lip_timesteps or min(cfg.lip_timesteps) < 0:
        raise ValueError("lip-timesteps must be training timesteps, e.g. 0,25,50,75,99")
    if not cfg.contraction_steps or min(cfg.contraction_steps) < 2:
        raise ValueError("contraction-steps: DDIM schedules of at least 2 steps (a ratio needs two steps)")
    if not cfg.ks or min(cfg.ks) < 1:
        raise ValueError("ks: candidate step counts must be positive integers, e.g. 1,2,3,4")
    if cfg.eps_tol <= 0 or cfg.alpha <= 0 or (cfg.rho is not None and cfg.rho <= 0):
        raise ValueError("eps-tol, alpha and rho must be positive")
    from agents.factory import parse_method

    for spec in cfg.methods:
        parse_method(spec)


def load_task(task: str, cfg: AnalyzeConfig) -> TaskContext:
    """The task's backbone and predictor; a missing checkpoint or one of another task is refused."""
    from agents.checkpoint import default_checkpoint, find_predictor, load_policy, load_predictor
    from step_envs.registry import get_task

    spec = get_task(task)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(spec.name)
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"No policy checkpoint at {checkpoint} (missing config.json); "
                                "train one with `step train-policy` or pass --checkpoint.")
    backbone, policy_config = load_policy(checkpoint, task=spec.name)
    path = find_predictor(checkpoint)
    predictor = load_predictor(path, backbone)[0] if path else None
    return TaskContext(spec.name, checkpoint, backbone, policy_config, predictor)


class RecordingAgent:
    """Wraps an agent; records every observation and action of a rollout wave, and the chunk of each replan."""

    def __init__(self, agent):
        self.agent = agent
        self.waves: list[dict] = []

    def reset(self) -> None:
        self.agent.reset()
        self.waves.append({"obs": [], "actions": [], "chunks": []})

    def act(self, obs: dict) -> np.ndarray:
        before = getattr(self.agent, "n_replans", None)
        action = self.agent.act(obs)
        wave = self.waves[-1]
        if before is not None and self.agent.n_replans != before:
            wave["chunks"].append((len(wave["actions"]), self.agent.last_chunk.clone()))
        wave["obs"].append(_copy_obs(obs))
        wave["actions"].append(np.array(action, copy=True))
        return action

    def episodes(self, results, width: int) -> list[dict]:
        """Per episode (results order): its observations, actions and (step, chunk) list, cut at its length."""
        out = []
        for k, res in enumerate(results):
            wave, row = self.waves[k // width], k % width
            n = res.length
            obs = [_row_obs(o, row) for o in wave["obs"][:n]]
            actions = np.stack([a[row] for a in wave["actions"][:n]])
            chunks = [(s, c[row]) for s, c in wave["chunks"] if s < n]
            out.append({"seed": res.seed, "success": res.success, "obs": obs, "actions": actions, "chunks": chunks})
        return out


def _copy_obs(obs: dict) -> dict:
    return {k: ({c: np.array(v, copy=True) for c, v in val.items()} if isinstance(val, dict) else np.array(val, copy=True))
            for k, val in obs.items()}


def _row_obs(obs: dict, row: int) -> dict:
    return {k: ({c: v[row] for c, v in val.items()} if isinstance(val, dict) else val[row]) for k, val in obs.items()}


def _vector_rollout(ctx: TaskContext, cfg: AnalyzeConfig, spec: str, episodes: int, max_steps: int | None = None):
    """Roll ``spec`` out on evaluation seeds in waves of ``num_envs``; returns (results, per-episode records)."""
    from agents.factory import make_agent
    from step_envs.rollout import rollout

    seeds = list(range(cfg.seed_start, cfg.seed_start + episodes))
    env = ctx.env(cfg)
    agent = make_agent(spec, env, task=ctx.task, checkpoint=str(ctx.checkpoint), seed=cfg.seed,
                       **({} if spec == "expert" else {"backbone": ctx.backbone, "predictor_model": ctx.predictor}))
    recorder = RecordingAgent(agent)
    results = rollout(env, recorder, seeds, progress=cfg.progress, max_steps=max_steps)
    return results, recorder.episodes(results, env.num_envs)


def frames_from_episodes(episodes: list[dict], backbone):
    """Recorded episodes -> ``agents.training.FrameData`` (what a dataset on disk would have given)."""
    from agents.training import FrameData

    feats = backbone.features
    state = torch.as_tensor(np.concatenate([np.stack([o["agent_pos"] for o in e["obs"]]) for e in episodes]),
                            dtype=torch.float32)
    action = torch.as_tensor(np.concatenate([e["actions"] for e in episodes]), dtype=torch.float32)
    env_state = None
    if feats.env_state_dim:
        env_state = torch.as_tensor(np.concatenate(
            [np.stack([o["environment_state"] for o in e["obs"]]) for e in episodes]), dtype=torch.float32)
    images = {cam: torch.as_tensor(np.concatenate([np.stack([o["pixels"][cam] for o in e["obs"]]) for e in episodes]))
              .permute(0, 3, 1, 2).contiguous() for cam in feats.cameras}
    lengths = [len(e["actions"]) for e in episodes]
    episode = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    bounds = np.cumsum([0] + lengths)
    start = torch.repeat_interleave(torch.as_tensor(bounds[:-1]), torch.tensor(lengths))
    end = torch.repeat_interleave(torch.as_tensor(bounds[1:] - 1), torch.tensor(lengths))
    return FrameData(state, action, env_state, images, episode, start, end)


def collect_windows(ctx: TaskContext, cfg: AnalyzeConfig) -> ValidationWindows:
    from agents.training import TrainPredictorConfig, Windows, build_predictor_pairs, padded_tail, sample_indices

    results, episodes = _vector_rollout(ctx, cfg, cfg.window_source, cfg.window_episodes)
    data = frames_from_episodes(episodes, ctx.backbone)
    pc = ctx.backbone.cfg
    index = sample_indices(data, padded_tail(pc))
    index = index[(index - pc.n_action_steps) >= data.start[index]]  # windows with a previous chunk
    if len(index) == 0:
        raise RuntimeError(f"The {cfg.window_source} rollouts gave no window with a previous chunk; "
                           "raise --window-episodes.")
    available = len(index)
    order = torch.randperm(len(index), generator=torch.Generator().manual_seed(cfg.seed))
    index = index[order[: max(cfg.windows, cfg.kselect_windows, cfg.lip_windows, cfg.spread_windows)]]
    pairs = build_predictor_pairs(ctx.backbone, data, index,
                                  TrainPredictorConfig(policy="", dataset="", prev_source="dataset", seed=cfg.seed))
    obs_sample = Windows(data, pc.n_obs_steps, pc.horizon).obs(index[:1])
    return ValidationWindows(cfg.window_source, cfg.seed_start, len(results), sum(r.success for r in results),
                             len(data.episode), pairs, obs_sample, available)


# ================================================================ small numeric helpers
def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)]


def _noise(shape, seed: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _row_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def _row_mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


def _mean_sem(values) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "sem": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sem": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def _batches(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _schedule(backbone):
    from agents.samplers import ScheduleConfig

    return ScheduleConfig.from_policy(backbone.cfg)


def _predict(predictor, cond: Tensor, prev: Tensor) -> Tensor:
    with torch.inference_mode():
        return predictor(cond, prev).clone()


# ================================================================ 1. lipschitz
def spectral_norm_linear(weight: Tensor) -> float:
    """Largest singular value of a dense weight matrix (exact SVD, float64)."""
    return float(torch.linalg.matrix_norm(weight.detach().double().reshape(weight.shape[0], -1), ord=2))


def conv_operator(module: nn.Module, input_shape: tuple[int, ...]):
    """(forward, adjoint) of a convolution layer's linear map (bias left out) on inputs of ``input_shape``.

    The map is the convolution operator itself on the layer's real input size (zero padding, stride,
    dilation, groups as the layer has them), not the kernel reshaped to a (C_out, C_in * k) matrix:
    for a conv the operator norm can exceed the reshaped kernel's norm by up to sqrt(number of kernel
    taps), so the reshaped matrix (the paper's Lemma D.4) is not a bound. The adjoint of ``conv1d`` is
    ``conv_transpose1d`` with the same weight (``output_padding`` chosen so it lands on the input length),
    and the adjoint of ``conv_transpose1d`` is ``conv1d``; likewise in 2-D for image encoders.
    """
    weight = module.weight.detach().double()
    nd = weight.dim() - 2
    if nd not in (1, 2) or getattr(module, "padding_mode", "zeros") != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"Unsupported convolution {module} (only zero-padded 1-D / 2-D convolutions).")
    conv = F.conv1d if nd == 1 else F.conv2d
    conv_t = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    probe = torch.zeros((1, *input_shape[1:]), dtype=torch.float64)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        def forward(x):
            return conv_t(x, weight, output_padding=module.output_padding, **kw)

        def adjoint(y):
            return conv(y, weight, **kw)
    else:
        out = conv(probe, weight, **kw).shape[2:]
        kernel = weight.shape[2:]
        output_padding = tuple(
            size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, o, s, p, d, k in zip(probe.shape[2:], out, module.stride, module.padding, module.dilation, kernel))

        def forward(x):
            return conv(x, weight, **kw)

        def adjoint(y):
            return conv_t(y, weight, output_padding=output_padding, **kw)
    return forward, adjoint


def power_iteration(forward, adjoint, input_shape, iters: int = 100, tol: float = 1e-7, seed: int = 0) -> float:
    """Largest singular value of the linear map ``forward`` (with its ``adjoint``) by power iteration on A^T A."""
    v = torch.randn((1, *input_shape[1:]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        w = adjoint(forward(v))
        norm = float(w.norm())
        if norm == 0.0:
            return 0.0
        v = w / norm
        new = math.sqrt(norm)  # ||A^T A v|| -> sigma^2 for the top singular vector
        if abs(new - sigma) <= tol * max(new, 1e-30):
            sigma = new
            break
        sigma = new
    return float(forward(v).norm())


def layer_group(name: str) -> str:
    """Table 10's parts: the U-Net's down / mid / up paths, and everything else (step encoder, final conv,
    observation encoder)."""
    for group in ("down", "mid", "up"):
        if f"{group}_modules" in name:
            return group
    return "other"


def _layer_input_shapes(backbone, obs_sample: dict) -> dict[str, tuple[int, ...]]:
    """Each linear operator's real input shape, from one forward pass with hooks."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))  # returns None: the output is left alone
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in backbone.model.named_modules()
             if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.inference_mode():
            cond = backbone.global_cond(obs_sample)
            x = torch.zeros(1, *backbone.action_shape)
            backbone.denoise(x, torch.tensor([backbone.cfg.num_train_timesteps // 2]), cond)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def spectral_norms(backbone, obs_sample: dict, iters: int = 100, progress: bool = False) -> list[dict]:
    """One row per Linear / Conv layer of the backbone: its spectral norm, group and path."""
    shapes = _layer_input_shapes(backbone, obs_sample)
    rows = []
    modules = [(n, m) for n, m in backbone.model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    for name, module in tqdm(modules, desc="spectral norms", unit="layer", disable=not progress, leave=False):
        row = {"layer": name, "kind": type(module).__name__, "group": layer_group(name),
               "path": "cond" if any(p in name for p in COND_PATH) else "x", "weight_shape": list(module.weight.shape)}
        if isinstance(module, nn.Linear):
            row["sigma"] = spectral_norm_linear(module.weight)
            row["method"] = "svd"
        else:
            if name not in shapes:
                continue  # not used in a forward pass
            shape = (1, *shapes[name][1:])
            forward, adjoint = conv_operator(module, shape)
            row["sigma"] = power_iteration(forward, adjoint, shape, iters)
            w = module.weight.detach()
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                w = w.transpose(0, 1)
            row["sigma_reshaped_kernel"] = spectral_norm_linear(w.reshape(w.shape[0], -1))
            row["input_shape"] = list(shape[1:])
            row["method"] = "power iteration on the operator"
        rows.append(row)
    return rows


def summarize_spectral(rows: list[dict]) -> dict:
    sigmas = [r["sigma"] for r in rows]
    groups = {}
    for g in GROUPS:
        sub = [r for r in rows if r["group"] == g]
        if not sub:
            continue
        s = [r["sigma"] for r in sub]
        x_path = [r["sigma"] for r in sub if r["path"] == "x"]
        groups[g] = {"layers": len(sub), "min": min(s), "max": max(s),
                     "log10_product_x_path": float(sum(math.log10(max(v, 1e-300)) for v in x_path))}
    return {
        "layers": len(rows),
        "min_sigma": min(sigmas),
        "max_sigma": max(sigmas),
        # the paper's Table 10: product over the four parts of each part's largest spectral norm
        "log10_bound_paper": float(sum(math.log10(groups[g]["max"]) for g in groups)),
        # the composition bound over every layer on the noisy action's path (Theorem D.6, ignoring skips/norms)
        "log10_bound_x_path": float(sum(math.log10(max(r["sigma"], 1e-300)) for r in rows if r["path"] == "x")),
        "groups": groups,
    }


def jacobian_spectral_norm(fn, x: Tensor, iters: int = 10, seed: int = 0) -> Tensor:
    """Per-row spectral norm of d fn / d x at x, by power iteration on J^T J (JVP then VJP, torch.func).

    ``fn`` must treat batch rows independently (the U-Net does: GroupNorm is per sample).
    """
    x = x.detach()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    v = v / _row_norm(v).view(-1, *([1] * (x.dim() - 1)))
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(fn, x)
        for _ in range(iters):
            _, jv = torch.func.jvp(fn, (x,), (v,))
            w = vjp_fn(jv)[0]
            v = (w / _row_norm(w).clamp_min(1e-30).view(-1, *([1] * (x.dim() - 1)))).detach()
        _, jv = torch.func.jvp(fn, (x,), (v,))
    return _row_norm(jv.detach())


def empirical_lipschitz(ctx: TaskContext, cfg: AnalyzeConfig, pairs) -> dict:
    """L_emp = max over windows and timesteps of ||d eps / d x||_2 at x_t = sqrt(abar_t) A + sqrt(1-abar_t) eps
    (A: the expert's chunk of the window), i.e. on the noised data the network sees."""
    from agents.samplers import DDPMSampler

    backbone = ctx.backbone
    abar = DDPMSampler(backbone.cfg.num_train_timesteps, _schedule(backbone)).scheduler.alphas_cumprod.double()
    n = len(pairs.cond)
    per_t = {}
    noise = _noise(pairs.target.shape, cfg.seed + 11)
    jobs = [(t, s, e) for t in cfg.lip_timesteps for s, e in _batches(n, cfg.batch)]
    for t, s, e in tqdm(jobs, desc="Jacobian norms", unit="batch", disable=not cfg.progress, leave=False):
        if t >= len(abar):
            raise ValueError(f"lip-timesteps: {t} is not a training timestep of this policy (0-{len(abar) - 1}).")
        a, b = math.sqrt(float(abar[t])), math.sqrt(1 - float(abar[t]))
        x = a * pairs.target[s:e] + b * noise[s:e]
        tt = torch.full((e - s,), t, dtype=torch.long)
        cond = pairs.cond[s:e]
        norms = jacobian_spectral_norm(lambda z: backbone.denoise(z, tt, cond), x, cfg.lip_iters, cfg.seed + t)
        per_t.setdefault(t, []).extend(norms.tolist())
    every = [v for vals in per_t.values() for v in vals]
    return {
        "L_emp": float(max(every)),
        "log10_L_emp": float(math.log10(max(every))),
        "mean": float(np.mean(every)),
        "per_timestep": {int(t): {"max": float(max(v)), "mean": float(np.mean(v)), "median": float(np.median(v))}
                         for t, v in per_t.items()},
        "samples": len(every),
        "windows": n,
        "timesteps": list(cfg.lip_timesteps),
    }


def analyze_lipschitz(ctx: TaskContext, cfg: AnalyzeConfig) -> dict:
    windows = ctx.windows(cfg)
    rows = spectral_norms(ctx.backbone, windows.obs_sample, cfg.power_iters, cfg.progress)
    pairs = windows.take(cfg.lip_windows)
    return {"spectral": summarize_spectral(rows), "layers": rows, "empirical": empirical_lipschitz(ctx, cfg, pairs),
            "windows": windows.meta(cfg.lip_windows)}


# ================================================================ 2. contraction
def ddim_trajectory(sampler, denoise, cond: Tensor, x: Tensor) -> list[Tensor]:
    """[x_start, x after step 1, ..., final sample] of a deterministic DDIM run."""
    trace: list[Tensor] = []
    with torch.inference_mode():
        sampler.run(denoise, cond, x, trace)
    return [x] + trace


def contraction_ratios(traj: list[Tensor], reference: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Per-row ratios between consecutive DDIM steps.

    ``to_final``: ||x_i - x_N|| / ||x_{i-1} - x_N||, i = 1..N-1 (x_N the trajectory's own final sample).
    ``pair``: ||x_i - r_i|| / ||x_{i-1} - r_{i-1}||, i = 1..N, against a reference trajectory r.
    Rows whose denominator is below 1e-8 give NaN (left out of averages).
    """
    final = traj[-1]
    d = torch.stack([_row_norm(x - final) for x in traj], dim=1)  # (B, N+1)
    out = {"to_final": _safe_ratio(d[:, 1:-1], d[:, :-2])}
    if reference is not None:
        e = torch.stack([_row_norm(x - r) for x, r in zip(traj, reference)], dim=1)
        out["pair"] = _safe_ratio(e[:, 1:], e[:, :-1])
    return out


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 1e-8, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


def _ratio_summary(r: Tensor, timesteps: list[int]) -> dict:
    flat = r[torch.isfinite(r)]
    per_step = []
    for i in range(r.shape[1]):
        col = r[:, i][torch.isfinite(r[:, i])]
        per_step.append({"t": int(timesteps[i]), "mean": float(col.mean()) if len(col) else float("nan"),
                         "median": float(col.median()) if len(col) else float("nan"),
                         "frac_below_1": float((col < 1).float().mean()) if len(col) else float("nan")})
    return {"rho": float(flat.mean()) if len(flat) else float("nan"),
            "median": float(flat.median()) if len(flat) else float("nan"),
            "max_step_mean": max((p["mean"] for p in per_step), default=float("nan")),
            "frac_below_1": float((flat < 1).float().mean()) if len(flat) else float("nan"),
            "ratios": int(len(flat)), "per_step": per_step}


def contraction_for_steps(ctx: TaskContext, cfg: AnalyzeConfig, pairs, steps: int, starts=("random", "warm")) -> dict:
    from agents.samplers import DDIMSampler

    backbone = ctx.backbone
    sampler = DDIMSampler(steps, _schedule(backbone))
    a, b = sampler.start_alpha, sampler.start_sigma
    n = len(pairs.cond)
    noise = _noise(pairs.target.shape, cfg.seed + 1000 + steps)
    pred = _predict(ctx.need_predictor(), pairs.cond, pairs.prev) if "warm" in starts else None
    ratios = {s: {"to_final": [], "pair": []} for s in starts}
    for s, e in _batches(n, cfg.batch):
        cond = pairs.cond[s:e]
        reference = ddim_trajectory(sampler, backbone.denoise, cond, a * pairs.target[s:e] + b * noise[s:e])
        for start in starts:
            x0 = noise[s:e] if start == "random" else a * pred[s:e] + b * noise[s:e]
            r = contraction_ratios(ddim_trajectory(sampler, backbone.denoise, cond, x0), reference)
            ratios[start]["to_final"].append(r["to_final"])
            ratios[start]["pair"].append(r["pair"])
    ts = sampler.timesteps
    out = {"steps": steps, "timesteps": ts, "start_timestep": ts[0], "windows": n}
    for start in starts:
        out[start] = {"to_final": _ratio_summary(torch.cat(ratios[start]["to_final"]), ts[: steps - 1]),
                      "pair": _ratio_summary(torch.cat(ratios[start]["pair"]), ts)}
    return out


def analyze_contraction(ctx: TaskContext, cfg: AnalyzeConfig) -> dict:
    windows = ctx.windows(cfg)
    pairs = windows.take(cfg.windows)
    schedules = [contraction_for_steps(ctx, cfg, pairs, k)
                 for k in tqdm(cfg.contraction_steps, desc="contraction", unit="schedule", disable=not cfg.progress,
                               leave=False)]
    head = schedules[0]["warm"]
    return {"schedules": schedules, "rho": head["to_final"]["rho"], "rho_pair": head["pair"]["rho"],
            "rho_below_1": bool(head["to_final"]["rho"] < 1), "rho_steps": cfg.contraction_steps[0],
            "windows": windows.meta(cfg.windows)}


# ================================================================ 3. kselect
def convergence_bound(k: int, rho: float, eps_tol: float = 0.1, alpha: float = 1.0) -> float:
    """Prop. D.14: the largest predictor MSE for which K' = k contracting steps reach tolerance eps_tol."""
    return eps_tol ** 2 / (rho ** (2 * k) * alpha ** 2)


def select_k(predictor_mse: float, rho: float, ks, eps_tol: float = 0.1, alpha: float = 1.0) -> int | None:
    """The smallest candidate K' with predictor_mse <= eps_tol^2 / (rho^(2K') alpha^2); None if none does."""
    for k in sorted(ks):
        if predictor_mse <= convergence_bound(k, rho, eps_tol, alpha):
            return int(k)
    return None


def continuous_k(predictor_mse: float, rho: float, eps_tol: float = 0.1, alpha: float = 1.0) -> float | None:
    """The real K' where the condition starts to hold (None when rho >= 1 and it never does)."""
    need = math.log(eps_tol ** 2 / (alpha ** 2 * predictor_mse))  # condition: 2 K' log rho <= need
    if need >= 0:
        return 0.0
    if rho >= 1:
        return None
    return need / (2 * math.log(rho))


def ddpm_samples(backbone, cond: Tensor, noise: Tensor, seed: int, batch: int, progress: bool = False,
                 desc: str = "DDPM-100") -> Tensor:
    """DDPM-100 samples from the given initial noise; each row draws its step noise from its own generator."""
    from agents.samplers import DDPMSampler

    sampler = DDPMSampler(backbone.cfg.num_train_timesteps, _schedule(backbone))
    out = []
    gens = _generators(len(cond), seed)
    for s, e in tqdm(_batches(len(cond), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        with torch.inference_mode():
            out.append(sampler.sample(backbone.denoise, cond[s:e], noise[s:e].shape, gens[s:e], x_init=noise[s:e]))
    return torch.cat(out)


def step_samples(backbone, sampler, cond: Tensor, pred: Tensor, noise: Tensor, batch: int) -> Tensor:
    """STEP's warm start: x_k = sqrt(abar_k) pred + sqrt(1 - abar_k) noise, then the K' DDIM steps."""
    from agents.samplers import WarmStart

    warm = WarmStart(sampler)
    out = []
    with torch.inference_mode():
        for s, e in _batches(len(cond), batch):
            out.append(sampler.run(backbone.denoise, cond[s:e], warm.initial(pred[s:e], noise[s:e])))
    return torch.cat(out)


def ddim_samples(backbone, sampler, cond: Tensor, noise: Tensor, batch: int) -> Tensor:
    out = []
    with torch.inference_mode():
        for s, e in _batches(len(cond), batch):
            out.append(sampler.run(backbone.denoise, cond[s:e], noise[s:e]))
    return torch.cat(out)


def analyze_kselect(ctx: TaskContext, cfg: AnalyzeConfig, contraction: dict | None = None) -> dict:
    from agents.samplers import DDIMSampler

    backbone = ctx.backbone
    windows = ctx.windows(cfg)
    pairs = windows.take(cfg.kselect_windows)
    if cfg.rho is not None:
        rho, rho_pair, rho_from = cfg.rho, None, "given (--rho)"
    else:
        if contraction is None:
            head = contraction_for_steps(ctx, cfg, pairs, cfg.contraction_steps[0], starts=("warm",))
            rho, rho_pair = head["warm"]["to_final"]["rho"], head["warm"]["pair"]["rho"]
        else:
            rho, rho_pair = contraction["rho"], contraction["rho_pair"]
        rho_from = f"measured: warm start, DDIM-{cfg.contraction_steps[0]} (contraction)"
    pred = _predict(ctx.need_predictor(), pairs.cond, pairs.prev)
    noise = _noise(pairs.target.shape, cfg.seed + 2)
    reference = ddpm_samples(backbone, pairs.cond, noise, cfg.seed + 3, cfg.batch, cfg.progress, "DDPM-100 reference")
    other = ddpm_samples(backbone, pairs.cond, _noise(pairs.target.shape, cfg.seed + 4), cfg.seed + 5, cfg.batch,
                         cfg.progress, "DDPM-100 second sample")
    predictor_mse = float(_row_mse(pred, pairs.target).mean())
    rows = []
    for k in tqdm(sorted(cfg.ks), desc="K' sweep", unit="K'", disable=not cfg.progress, leave=False):
        sampler = DDIMSampler(k, _schedule(backbone))
        warm = step_samples(backbone, sampler, pairs.cond, pred, noise, cfg.batch)
        ddim = ddim_samples(backbone, sampler, pairs.cond, noise, cfg.batch)
        row = {"k": int(k), "start_timestep": sampler.start_timestep, "start_alpha": sampler.start_alpha,
               "step_mse_to_ddpm": _mean_sem(_row_mse(warm, reference).numpy()),
               "ddim_mse_to_ddpm": _mean_sem(_row_mse(ddim, reference).numpy()),
               "step_mse_to_target": _mean_sem(_row_mse(warm, pairs.target).numpy()),
               "bound": convergence_bound(k, rho, cfg.eps_tol, cfg.alpha)}
        row["meets_condition"] = bool(predictor_mse <= row["bound"])
        if rho_pair is not None:
            row["bound_pair"] = convergence_bound(k, rho_pair, cfg.eps_tol, cfg.alpha)
        rows.append(row)
    return {
        "rho": rho, "rho_pair": rho_pair, "rho_from": rho_from, "eps_tol": cfg.eps_tol, "alpha": cfg.alpha,
        "predictor_mse": predictor_mse,
        "predictor_mse_to_ddpm": float(_row_mse(pred, reference).mean()),
        "ddpm_floor": _mean_sem(_row_mse(reference, other).numpy()),
        "ddpm_mse_to_target": _mean_sem(_row_mse(reference, pairs.target).numpy()),
        "k_star": select_k(predictor_mse, rho, cfg.ks, cfg.eps_tol, cfg.alpha),
        "k_star_pair": select_k(predictor_mse, rho_pair, cfg.ks, cfg.eps_tol, cfg.alpha) if rho_pair else None,
        "k_continuous": continuous_k(predictor_mse, rho, cfg.eps_tol, cfg.alpha),
        "rows": rows, "windows": windows.meta(cfg.kselect_windows),
    }


# ================================================================ 4. mare
def analyze_mare(ctx: TaskContext, cfg: AnalyzeConfig) -> dict:
    from agents.training import evaluate_predictors

    windows = ctx.windows(cfg)
    pairs = windows.take(cfg.windows)
    metrics = evaluate_predictors(ctx.backbone, pairs, {"predictor": ctx.need_predictor(), "temporal_only": None})
    falcon = falcon_reuse_error(ctx.backbone, pairs, cfg.seed)
    from agents.checkpoint import find_predictor

    trained = json.loads((find_predictor(ctx.checkpoint) / "config.json").read_text()).get("metrics", {})
    return {
        "rows": {"spatial": metrics["predictor_no_history"], "temporal": metrics["temporal_only"],
                 "falcon": falcon, "step": metrics["predictor"]},
        "pairs": metrics["pairs"],
        "at_training": {k: trained[k] for k in ("predictor", "temporal_only", "spatial_only", "predictor_no_history")
                        if k in trained},
        "windows": windows.meta(cfg.windows),
    }


FALCON_MARE_K = 4  # Falcon's intermediate step for the MARE row: falcon:4 on DDIM-10 (agents/falcon.py)


def falcon_reuse_error(backbone, pairs, seed: int, k: int = FALCON_MARE_K) -> dict:
    """MSE / MARE of Falcon's reused chunk: the previous chunk shifted by Ta (tail held) as the partially
    denoised latent at Falcon's intermediate step (DDIM-10 index 10 - k), read out as the clean-chunk estimate
    the network makes of it under the current observation (one NFE). Offline there is no previous replan's
    latent, so the previous chunk diffused to that step (fixed noise) stands in for it."""
    from agents.falcon import FalconConfig
    from agents.predictor import shift_chunk
    from agents.samplers import DDIMSampler
    from agents.training import mare

    mask = pairs.has_prev
    target, prev, cond = pairs.target[mask], pairs.prev[mask], pairs.cond[mask]
    ddim = DDIMSampler(FalconConfig().base_steps, _schedule(backbone))
    index = len(ddim.timesteps) - k
    a_t, b_t = ddim.coef[index][0], ddim.coef[index][1]
    guess = shift_chunk(prev, backbone.cfg.n_action_steps)
    with torch.inference_mode():
        x = a_t * guess + b_t * _noise(guess.shape, seed + 31)
        t = torch.full((len(x),), ddim.timesteps[index], dtype=torch.long)
        x0 = ((x - b_t * backbone.denoise(x, t, cond)) / a_t)
        if ddim.clip is not None:
            x0 = x0.clamp(-ddim.clip, ddim.clip)
    unnorm = backbone.unnormalize_action
    return {"mse": float(F.mse_loss(x0, target)), "mare": mare(unnorm(x0), unnorm(target)), "k": k,
            "timestep": ddim.timesteps[index]}


# ================================================================ 5. predictor-only
def chunk_consistency(chunks: list[Tensor], shift: int) -> list[float]:
    """Mean |A_j[t] - A_{j-1}[t + Ta]| over the overlap of consecutive chunks (normalised space): the
    stall detector's Delta, here a measure of how much each replan changes the plan."""
    return [float((cur[: cur.shape[0] - shift] - prev[shift:]).abs().mean()) for prev, cur in zip(chunks, chunks[1:])]


def closed_loop(ctx: TaskContext, cfg: AnalyzeConfig, spec: str) -> dict:
    from agents.bench import wilson_interval

    t0 = time.perf_counter()
    results, episodes = _vector_rollout(ctx, cfg, spec, cfg.episodes, cfg.max_steps)
    deltas = [d for e in episodes for d in chunk_consistency([c for _, c in e["chunks"]], ctx.backbone.cfg.n_action_steps)]
    successes = sum(r.success for r in results)
    lo, hi = wilson_interval(successes, len(results))
    return {"method": spec, "episodes": len(results), "seed_start": cfg.seed_start,
            "success_rate": successes / len(results), "ci95": [lo, hi],
            "mean_max_reward": float(np.mean([r.max_reward for r in results])),
            "mean_length": float(np.mean([r.length for r in results])),
            "chunk_delta": _mean_sem(deltas), "seconds": time.perf_counter() - t0}


def _pairwise_mse(samples: Tensor) -> Tensor:
    """samples (S, N, H, A) -> (N,) mean MSE over the S(S-1)/2 pairs of distinct samples."""
    s = samples.shape[0]
    vals = [_row_mse(samples[i], samples[j]) for i in range(s) for j in range(i + 1, s)]
    return torch.stack(vals).mean(0)


def _cross_mse(a: Tensor, b: Tensor) -> Tensor:
    """a (S, N, ...), b (S', N, ...) -> (N,) mean MSE over all (a_i, b_j)."""
    return torch.stack([_row_mse(x, y) for x in a for y in b]).mean(0)


def offline_spread(ctx: TaskContext, cfg: AnalyzeConfig, pairs, step_ks: list[int]) -> dict:
    """On the same windows: S DDPM-100 samples, S STEP-k samples per k, the predictor's chunk."""
    from agents.samplers import DDIMSampler

    backbone = ctx.backbone
    n, s_count = len(pairs.cond), cfg.spread_samples
    cond = pairs.cond.repeat(s_count, 1)
    shape = (s_count * n, *pairs.target.shape[1:])
    ddpm = ddpm_samples(backbone, cond, _noise(shape, cfg.seed + 21), cfg.seed + 22, cfg.batch, cfg.progress,
                        "DDPM-100 samples").view(s_count, *pairs.target.shape)
    pred = _predict(ctx.need_predictor(), pairs.cond, pairs.prev)
    target = pairs.target
    out = {"windows": n, "samples": s_count,
           "ddpm": {"spread": _mean_sem(_pairwise_mse(ddpm).numpy()),
                    "mse_to_target": _mean_sem(_cross_mse(ddpm, target[None]).numpy())},
           "predictor": {"mse_to_ddpm": _mean_sem(_cross_mse(pred[None], ddpm).numpy()),
                         "mse_to_ddpm_mean": _mean_sem(_row_mse(pred, ddpm.mean(0)).numpy()),
                         "mse_to_target": _mean_sem(_row_mse(pred, target).numpy())},
           "step": {}}
    for k in step_ks:
        sampler = DDIMSampler(k, _schedule(backbone))
        step = step_samples(backbone, sampler, cond, pred.repeat(s_count, 1, 1), _noise(shape, cfg.seed + 23 + k),
                            cfg.batch).view(s_count, *target.shape)
        out["step"][str(k)] = {"spread": _mean_sem(_pairwise_mse(step).numpy()),
                               "mse_to_ddpm": _mean_sem(_cross_mse(step, ddpm).numpy()),
                               "mean_mse_to_ddpm_mean": _mean_sem(_row_mse(step.mean(0), ddpm.mean(0)).numpy()),
                               "mse_to_predictor": _mean_sem(_cross_mse(step, pred[None]).numpy()),
                               "mse_to_target": _mean_sem(_cross_mse(step, target[None]).numpy())}
    return out


def analyze_predictor_only(ctx: TaskContext, cfg: AnalyzeConfig) -> dict:
    from agents.factory import parse_method

    ctx.need_predictor()
    rows = [closed_loop(ctx, cfg, spec) for spec in cfg.methods]
    step_ks = sorted({steps for name, steps in map(parse_method, cfg.methods) if name == "step" and steps})
    windows = ctx.windows(cfg)
    pairs = windows.take(cfg.spread_windows)
    return {"closed_loop": rows, "offline": offline_spread(ctx, cfg, pairs, step_ks or [2]),
            "rollout_seeds": [cfg.seed_start, cfg.seed_start + cfg.episodes - 1],
            "windows": windows.meta(cfg.spread_windows)}


# ================================================================ running, Markdown, plots
RUNNERS = {"lipschitz": analyze_lipschitz, "contraction": analyze_contraction, "kselect": analyze_kselect,
           "mare": analyze_mare, "predictor-only": analyze_predictor_only}


def _config_dict(cfg: AnalyzeConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "progress"}


def run_analysis(name: str, cfg: AnalyzeConfig, contexts: dict[str, TaskContext] | None = None,
                 previous: dict | None = None) -> dict:
    """Run one analysis for every task of ``cfg``; ``contexts`` lets ``all`` share loaded models and windows."""
    from agents.compute import resolve_threads

    if name not in RUNNERS:
        raise ValueError(f"Unknown analysis {name!r}: {', '.join(ANALYSES)}, all")
    torch.set_num_threads(resolve_threads(cfg.threads))
    own = contexts is None  # contexts made here are closed here; run_all closes its own
    contexts = {} if own else contexts
    report = {"analysis": name, "config": _config_dict(cfg), "tasks": {}, "seconds": {}, "cpu_seconds": {}}
    try:
        _run_tasks(name, cfg, contexts, previous, report)
    finally:
        if own:
            for ctx in contexts.values():
                ctx.close()
    return report


def _run_tasks(name: str, cfg: AnalyzeConfig, contexts: dict, previous: dict | None, report: dict) -> None:
    for task in cfg.tasks:
        t0, c0 = time.perf_counter(), time.process_time()
        if task not in contexts:
            contexts[task] = load_task(task, cfg)
        ctx = contexts[task]
        if name == "kselect":
            result = analyze_kselect(ctx, cfg, (previous or {}).get(task))
        else:
            result = RUNNERS[name](ctx, cfg)
        result["checkpoint"] = str(ctx.checkpoint)
        result["obs_type"] = ctx.policy_config["obs_type"]
        report["tasks"][task] = result
        report["seconds"][task] = round(time.perf_counter() - t0, 1)
        # CPU time of this process: on a busy machine a better guide than wall time to an idle run's length
        report["cpu_seconds"][task] = round(time.process_time() - c0, 1)


def write_analysis(report: dict, out) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(report), indent=2))
    (out / "results.md").write_text(MARKDOWN[report["analysis"]](report))
    PLOTS[report["analysis"]](report, out / PLOT_NAMES[report["analysis"]])
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # strict JSON has no NaN / inf
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def _g(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _target(report: dict) -> str:
    """What the windows' target chunks are: the expert's actions, or another agent's recorded actions."""
    return "expert" if report["config"].get("window_source", "expert") == "expert" else "recorded"


def _windows_note(report: dict, key: str = "windows") -> list[str]:
    return [f"- {task}: {res[key]['text']}; checkpoint `{_rel(res['checkpoint'])}`."
            for task, res in report["tasks"].items()]


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def md_lipschitz(report: dict) -> str:
    tgt = _target(report)
    lines = ["## Lipschitz bounds (paper Tables 10 and 11, left)", "",
             "| Task | Layers | Min σ | Max σ | log10 Π group max (Table 10) | log10 Π x-path layers | "
             "L_emp (max ‖∂ε/∂x‖₂) | log10 L_emp | mean ‖∂ε/∂x‖₂ | samples |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task, res in report["tasks"].items():
        s, e = res["spectral"], res["empirical"]
        lines.append(f"| {task} | {s['layers']} | {_f(s['min_sigma'], 2)} | {_f(s['max_sigma'], 2)} | "
                     f"{_f(s['log10_bound_paper'], 2)} | {_f(s['log10_bound_x_path'], 1)} | {_f(e['L_emp'], 1)} | "
                     f"{_f(e['log10_L_emp'], 2)} | {_f(e['mean'], 1)} | {e['windows']} windows x "
                     f"{len(e['timesteps'])} t |")
    lines += ["", "Per part (max σ; log10 of the product over the part's layers on the noisy action's path):", "",
              "| Task | " + " | ".join(GROUPS) + " |", "|---|" + "---|" * len(GROUPS)]
    for task, res in report["tasks"].items():
        g = res["spectral"]["groups"]
        lines.append(f"| {task} | " + " | ".join(
            f"{_f(g[k]['max'], 2)} ({g[k]['layers']} layers; {_f(g[k]['log10_product_x_path'], 1)})" if k in g else "-"
            for k in GROUPS) + " |")
    lines += ["", "Empirical ‖∂ε/∂x‖₂ per timestep (max / mean):", "",
              "| Task | " + " | ".join(f"t={t}" for t in next(iter(report["tasks"].values()))["empirical"]["timesteps"])
              + " |", "|---|" + "---|" * len(next(iter(report["tasks"].values()))["empirical"]["timesteps"])]
    for task, res in report["tasks"].items():
        per = res["empirical"]["per_timestep"]
        lines.append(f"| {task} | " + " | ".join(f"{_f(per[t]['max'], 1)} / {_f(per[t]['mean'], 1)}" for t in per) + " |")
    lines += ["", "σ: spectral norm of every Linear (exact SVD) and convolution (power iteration on the convolution "
              "operator at the layer's real input length, conv_transpose as its adjoint; not the reshaped kernel). "
              "Parts: U-Net down / mid / up paths, other = timestep encoder, final conv, observation encoder. "
              "GroupNorm and the FiLM scale are not linear maps and are left out, so neither product is a proof of "
              "a global bound. L_emp: spectral norm of the noise network's Jacobian in the noisy action "
              f"(power iteration on JVP/VJP) at x_t = sqrt(ᾱ_t)·A + sqrt(1-ᾱ_t)·ε, A the {tgt} chunk of the window.", "",
              "Windows:"] + _windows_note(report)
    return "\n".join(lines) + "\n"


def md_contraction(report: dict) -> str:
    tgt = _target(report)
    lines = ["## Contraction of the DDIM reverse process (paper Table 11, right)", "",
             "| Task | DDIM steps (start t) | Start | ρ to final (mean) | median | max step mean | share < 1 | "
             "ρ pairwise (mean) | ρ < 1? | Sample size |", "|---|---|---|---|---|---|---|---|---|---|"]
    for task, res in report["tasks"].items():
        for sch in res["schedules"]:
            for start in ("random", "warm"):
                tf, pr = sch[start]["to_final"], sch[start]["pair"]
                name = "STEP warm start" if start == "warm" else "random (noise)"
                lines.append(f"| {task} | {sch['steps']} (t={sch['start_timestep']}) | {name} | {_f(tf['rho'])} | "
                             f"{_f(tf['median'])} | {_f(tf['max_step_mean'])} | {_f(tf['frac_below_1'], 2)} | "
                             f"{_f(pr['rho'])} | {'Yes' if tf['rho'] < 1 else 'No'} | "
                             f"{sch['windows']} windows ({tf['ratios']} ratios) |")
    lines += ["", "Per step, warm start, finest schedule (mean ratio to final / pairwise; t = the step's timestep):", ""]
    for task, res in report["tasks"].items():
        sch = res["schedules"][0]
        tf, pr = sch["warm"]["to_final"]["per_step"], sch["warm"]["pair"]["per_step"]
        lines.append(f"- {task}: " + ", ".join(
            f"t={p['t']}: {_f(p['mean'], 2)}/{_f(q['mean'], 2)}" for p, q in zip(tf, pr)))
    lines += ["", "ρ to final: mean over windows and steps of ‖x_i − x_N‖ / ‖x_{i−1} − x_N‖ along one DDIM "
              "trajectory (x_N its final sample; the paper's ratio, Eq. 82). ρ pairwise: mean of "
              f"‖x_i − r_i‖ / ‖x_{{i−1}} − r_{{i−1}}‖ against the trajectory r started from the {tgt} chunk noised "
              "with the same noise (the error recursion of the proof, D.13). Warm start: "
              "sqrt(ᾱ_k)·predictor + sqrt(1−ᾱ_k)·ε at the schedule's first timestep k. "
              "ρ < 1? refers to ρ to final.", "", "Windows:"] + _windows_note(report)
    return "\n".join(lines) + "\n"


def md_kselect(report: dict) -> str:
    tgt = _target(report)
    first = next(iter(report["tasks"].values()))
    lines = ["## Warm-start step selection (paper Table 12, Figures 10-11)", "",
             f"Condition (Prop. D.14): predictor MSE ≤ ε_tol² / (ρ^(2K') α²), ε_tol = {first['eps_tol']}, "
             f"α = {first['alpha']}; K'* = the smallest K' meeting it.", "",
             f"| Task | Predictor MSE (vs {tgt}) | Predictor MSE (vs DDPM-100) | DDPM-100 vs DDPM-100 | DDPM-100 vs {tgt} "
             "| ρ | K'* | K' (continuous) | K'* with ρ pairwise |", "|---|---|---|---|---|---|---|---|---|"]
    for task, res in report["tasks"].items():
        lines.append(f"| {task} | {_g(res['predictor_mse'])} | {_g(res['predictor_mse_to_ddpm'])} | "
                     f"{_g(res['ddpm_floor']['mean'])} | {_g(res['ddpm_mse_to_target']['mean'])} | {_f(res['rho'])} | "
                     f"{res['k_star'] if res['k_star'] is not None else 'none'} | {_f(res['k_continuous'], 2)} | "
                     f"{res['k_star_pair'] if res['k_star_pair'] is not None else ('none' if res['rho_pair'] else '-')} |")
    lines += ["", "MSE to the DDPM-100 reference sample (same initial noise), by K':", "",
              "| Task | Method | " + " | ".join(f"K'={r['k']}" for r in first["rows"]) + " |",
              "|---|---|" + "---|" * len(first["rows"])]
    for task, res in report["tasks"].items():
        lines.append(f"| {task} | warm start at t | " + " | ".join(str(r["start_timestep"]) for r in res["rows"]) + " |")
        lines.append("| | STEP-K' | " + " | ".join(_g(r["step_mse_to_ddpm"]["mean"]) for r in res["rows"]) + " |")
        lines.append("| | DDIM-K' | " + " | ".join(_g(r["ddim_mse_to_ddpm"]["mean"]) for r in res["rows"]) + " |")
        lines.append("| | bound ε²/(ρ^2K' α²) | " + " | ".join(_g(r["bound"]) for r in res["rows"]) + " |")
    lines += ["", "MSE: per-element mean squared error in the policy's normalised action space, averaged over windows. "
              "STEP-K': x_k = sqrt(ᾱ_k)·predictor + sqrt(1−ᾱ_k)·ε, then K' DDIM steps; the DDPM-100 reference "
              "starts from the same ε (its later step noise is its own). 'DDPM-100 vs DDPM-100': two reference "
              "samples from different noise (twice DDPM-100's variance: how far the policy is from itself). ρ: "
              f"{first['rho_from']}.", "", "Windows:"] + _windows_note(report)
    return "\n".join(lines) + "\n"


def md_mare(report: dict) -> str:
    tgt = _target(report)
    tasks = list(report["tasks"])
    names = [("spatial", "SC: spatial only (predictor without history)"),
             ("temporal", "TC: RTI-DP's shifted chunk (previous chunk shifted by Ta, last action held)"),
             ("falcon", f"TC: Falcon's reused chunk (falcon:{FALCON_MARE_K}, its clean estimate under o_t)"),
             ("step", "STC: STEP predictor")]
    names = [(key, label) for key, label in names if all(key in report["tasks"][t]["rows"] for t in tasks)]
    lines = ["## Predictor error (paper Table 15, App. F.2): MARE (MSE)", "",
             "| Method | " + " | ".join(tasks) + " | avg. MARE |", "|---|" + "---|" * (len(tasks) + 1)]
    for key, label in names:
        cells = [f"{_f(report['tasks'][t]['rows'][key]['mare'])} ({_g(report['tasks'][t]['rows'][key]['mse'])})"
                 for t in tasks]
        avg = np.mean([report["tasks"][t]["rows"][key]["mare"] for t in tasks])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_f(float(avg))} |")
    for key, label in (("predictor", "STEP predictor, at training (dataset's held-out episodes)"),
                       ("spatial_only", "separately trained spatial-only model, at training (not saved)")):
        trained = [report["tasks"][t]["at_training"].get(key) for t in tasks]
        if any(trained):
            lines.append(f"| {label} | " + " | ".join(
                f"{_f(m['mare'])} ({_g(m['mse'])})" if m else "-" for m in trained) + " | - |")
    lines += ["", "MARE: mean over chunks of Σ|pred − target| / Σ|target| in raw action units; MSE in the normalised "
              f"space (`agents.training.evaluate_predictors`). Target: the {tgt} chunk; previous chunk: the "
              f"{tgt} action window Ta steps earlier (as `step train-predictor` builds its pairs). SC is what "
              "`step-spatial` warm-starts from, TC what `step-temporal` and `rtidp` (action reuse) warm-start from, "
              "Falcon's row the clean estimate of the latent `falcon:4` resumes from (previous chunk diffused to "
              "its step, `falcon_reuse_error`); "
              "no BRIDGeR row: `bridger:k` starts from a Gaussian fitted to the action windows (agents/bridger.py), "
              "not from an observation-dependent prediction.", "", "Windows:"] + _windows_note(report)
    return "\n".join(lines) + "\n"


def md_predictor_only(report: dict) -> str:
    from agents.bench import method_name

    tgt = _target(report)
    lines = ["## Predictor only vs DDPM-100 vs STEP", "", "Closed loop:", "",
             "| Task | Method | Success [95 % CI] | Mean max reward | Chunk Δ (mean ± sem) | Episodes (seeds) |",
             "|---|---|---|---|---|---|"]
    for task, res in report["tasks"].items():
        for row in res["closed_loop"]:
            name, _, steps = row["method"].partition(":")
            label = "Predictor only (step:0)" if row["method"] == "step:0" else f"{method_name(name)}-{steps or ''}"
            lines.append(f"| {task} | {label} | {row['success_rate']:.2f} [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}] | "
                         f"{row['mean_max_reward']:.3f} | {_g(row['chunk_delta']['mean'])} ± {_g(row['chunk_delta']['sem'])} | "
                         f"{row['episodes']} ({row['seed_start']}-{row['seed_start'] + row['episodes'] - 1}) |")
    lines += ["", "Offline, same windows, per-element MSE in normalised action space:", "",
              "| Task | DDPM-100 spread | STEP-k spread | STEP-k ↔ DDPM-100 | mean STEP-k ↔ mean DDPM-100 | "
              f"predictor ↔ DDPM-100 | STEP-k ↔ predictor | DDPM-100 ↔ {tgt} | STEP-k ↔ {tgt} | predictor ↔ {tgt} |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for task, res in report["tasks"].items():
        off = res["offline"]
        for k, st in off["step"].items():
            lines.append(f"| {task} (k={k}) | {_g(off['ddpm']['spread']['mean'])} | {_g(st['spread']['mean'])} | "
                         f"{_g(st['mse_to_ddpm']['mean'])} | {_g(st['mean_mse_to_ddpm_mean']['mean'])} | "
                         f"{_g(off['predictor']['mse_to_ddpm']['mean'])} | {_g(st['mse_to_predictor']['mean'])} | "
                         f"{_g(off['ddpm']['mse_to_target']['mean'])} | {_g(st['mse_to_target']['mean'])} | "
                         f"{_g(off['predictor']['mse_to_target']['mean'])} |")
    lines += ["", "Chunk Δ: mean |A_j[t] − A_{j−1}[t+Ta]| over the overlap of consecutive chunks in closed loop "
              "(normalised units; the stall detector's Δ): how much each replan changes the plan. Spread: mean MSE "
              "between two samples of the same sampler for the same observation; A ↔ B: mean MSE between a sample of "
              "A and one of B; 'mean ↔ mean': between the per-window sample means. Offline samples: "
              + ", ".join(f"{t}: {r['offline']['samples']} per window on {r['offline']['windows']} windows"
                          for t, r in report["tasks"].items()) + ".", "", "Windows (offline part):"] + _windows_note(report)
    return "\n".join(lines) + "\n"


MARKDOWN = {"lipschitz": md_lipschitz, "contraction": md_contraction, "kselect": md_kselect, "mare": md_mare,
            "predictor-only": md_predictor_only}
PLOT_NAMES = {"lipschitz": "lipschitz.png", "contraction": "contraction.png", "kselect": "kselect.png",
              "mare": "mare.png", "predictor-only": "predictor_only.png"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, height: float = 3.6, width: float = 4.2, rows: int = 1):
    plt = _plt()
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), dpi=110, squeeze=False)
    return plt, fig, axes


def plot_lipschitz(report: dict, path: Path) -> None:
    tasks = list(report["tasks"])
    plt, fig, axes = _panels(len(tasks), height=3.8)
    for ax, task in zip(axes[0], tasks):
        rows = report["tasks"][task]["layers"]
        for gi, g in enumerate(GROUPS):
            vals = [r["sigma"] for r in rows if r["group"] == g]
            ax.scatter([gi + np.random.default_rng(gi).uniform(-0.2, 0.2) for _ in vals], vals, s=12, alpha=0.7,
                       color=f"C{gi}")
        ax.set_xticks(range(len(GROUPS)), GROUPS)
        ax.set_yscale("log")
        ax.set_title(f"{task}: σ per layer (L_emp {report['tasks'][task]['empirical']['L_emp']:.0f})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("spectral norm (log)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _contraction_panel(ax, res: dict, task: str) -> None:
    sch = res["schedules"][0]
    for start, style in (("random", "--"), ("warm", "-")):
        for kind, marker in (("to_final", "o"), ("pair", "s")):
            per = sch[start][kind]["per_step"]
            ax.plot([p["t"] for p in per], [p["mean"] for p in per], style, marker=marker, ms=4,
                    label=f"{'warm' if start == 'warm' else 'random'}, {'to final' if kind == 'to_final' else 'pairwise'}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.invert_xaxis()
    ax.set_xlabel(f"DDIM-{sch['steps']} step at timestep t")
    ax.set_title(f"{task}: ρ = {res['rho']:.2f} (warm, to final)")
    ax.grid(True, alpha=0.3)


def _plot_task_panels(report: dict, path: Path, panel, ylabel: str) -> None:
    """One ``panel(ax, result, task)`` per task side by side, legend on the first."""
    tasks = list(report["tasks"])
    plt, fig, axes = _panels(len(tasks))
    for ax, task in zip(axes[0], tasks):
        panel(ax, report["tasks"][task], task)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_contraction(report: dict, path: Path) -> None:
    _plot_task_panels(report, path, _contraction_panel, "distance ratio per step")


def _kselect_panel(ax, res: dict, task: str) -> None:
    ks = [r["k"] for r in res["rows"]]
    ax.plot(ks, [r["bound"] for r in res["rows"]], "-o", ms=4, color="C0", label="bound ε²/(ρ^2K' α²)")
    ax.axhline(res["predictor_mse"], color="C3", ls="--", label="STEP predictor MSE")
    ax.plot(ks, [r["step_mse_to_ddpm"]["mean"] for r in res["rows"]], "-s", ms=4, color="C2", label="STEP-K' ↔ DDPM-100")
    ax.plot(ks, [r["ddim_mse_to_ddpm"]["mean"] for r in res["rows"]], ":^", ms=4, color="C1", label="DDIM-K' ↔ DDPM-100")
    ax.axhline(res["ddpm_floor"]["mean"], color="grey", ls=":", label="DDPM-100 ↔ DDPM-100")
    if res["k_star"] is not None:
        ax.axvline(res["k_star"], color="C3", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("K' (DDIM steps after the warm start)")
    ax.set_title(f"{task} (ρ = {res['rho']:.2f}, K'* = {res['k_star'] if res['k_star'] is not None else 'none'})")
    ax.grid(True, which="both", alpha=0.3)


def plot_kselect(report: dict, path: Path) -> None:
    _plot_task_panels(report, path, _kselect_panel, "MSE (normalised actions, log)")


def plot_mare(report: dict, path: Path) -> None:
    plt = _plt()
    tasks = list(report["tasks"])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(tasks) + 2), 3.6), dpi=110)
    bars = [(key, label) for key, label in (("spatial", "SC"), ("temporal", "TC: RTI-DP shift"),
                                            ("falcon", "TC: Falcon reuse"), ("step", "STEP (STC)"))
            if all(key in report["tasks"][t]["rows"] for t in tasks)]
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        ax.bar(np.arange(len(tasks)) + (i - (len(bars) - 1) / 2) * width,
               [report["tasks"][t]["rows"][key]["mare"] for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("MARE")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_predictor_only(report: dict, path: Path) -> None:
    tasks = list(report["tasks"])
    plt, fig, axes = _panels(len(tasks), rows=2, height=3.0)
    for col, task in enumerate(tasks):
        rows = report["tasks"][task]["closed_loop"]
        x = np.arange(len(rows))
        sr = [r["success_rate"] for r in rows]
        err = [[r["success_rate"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["success_rate"] for r in rows]]
        axes[0][col].bar(x, sr, yerr=err, capsize=3, color=[f"C{i}" for i in x])
        axes[0][col].scatter(x, [r["mean_max_reward"] for r in rows], color="k", marker="D", s=18, zorder=3,
                             label="mean max reward")
        axes[0][col].set_ylim(0, 1.05)
        axes[0][col].set_title(task)
        axes[1][col].bar(x, [r["chunk_delta"]["mean"] for r in rows], color=[f"C{i}" for i in x])
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(x, [r["method"] for r in rows], fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("success (95 % CI)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].set_ylabel("chunk Δ (closed loop)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PLOTS = {"lipschitz": plot_lipschitz, "contraction": plot_contraction, "kselect": plot_kselect, "mare": plot_mare,
         "predictor-only": plot_predictor_only}


# ================================================================ everything
def run_all(cfg: AnalyzeConfig, out, analyses=ANALYSES) -> dict:
    """Every analysis for every task; each into ``out/<analysis>``, plus ``out/results.md`` (all tables),
    ``out/results.json`` (an index) and ``out/overview.png``. Task by task: a task's models, windows and
    envs are loaded once for all its analyses and released before the next task."""
    out = Path(out)
    reports: dict[str, dict] = {}
    t0 = time.perf_counter()
    for task in cfg.tasks:
        one = dataclasses.replace(cfg, tasks=(task,), checkpoint=cfg.checkpoint)
        contexts: dict[str, TaskContext] = {}
        try:
            for name in analyses:
                previous = reports["contraction"]["tasks"] if name == "kselect" and "contraction" in reports else None
                part = run_analysis(name, one, contexts, previous)
                if name not in reports:
                    reports[name] = part
                else:
                    for key in ("tasks", "seconds", "cpu_seconds"):
                        reports[name][key].update(part[key])
        finally:
            for ctx in contexts.values():
                ctx.close()
        for name, report in reports.items():  # after every task, so an interrupted run keeps what it finished
            report["config"]["tasks"] = list(report["tasks"])
            write_analysis(report, out / name)
    index = {"analyses": {n: {"folder": n, "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"]}
                          for n, r in reports.items()},
             "tasks": list(cfg.tasks), "config": _config_dict(cfg), "wall_seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(index), indent=2))
    (out / "results.md").write_text(md_all(reports, index))
    plot_overview(reports, out / "overview.png")
    return {"reports": reports, "index": index}


def md_all(reports: dict, index: dict) -> str:
    head = [f"# `step analyze all`: {', '.join(index['tasks'])}", "",
            f"Wall time {index['wall_seconds']:.0f} s. Each analysis also has its own folder with results.json, "
            "results.md and a plot.", ""]
    return "\n".join(head) + "\n".join(MARKDOWN[n](r) for n, r in reports.items())


def plot_overview(reports: dict, path: Path) -> None:
    tasks = list(next(iter(reports.values()))["tasks"])
    panels = [n for n in ("kselect", "contraction") if n in reports]
    if not panels:
        PLOTS[next(iter(reports))](next(iter(reports.values())), path)
        return
    plt, fig, axes = _panels(len(tasks), rows=len(panels))
    for row, name in enumerate(panels):
        for ax, task in zip(axes[row], tasks):
            (_kselect_panel if name == "kselect" else _contraction_panel)(ax, reports[name]["tasks"][task], task)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

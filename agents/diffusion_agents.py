"""Diffusion agents with one API: DDPM-100, DDIM-k, DPM-Solver++-k and STEP-k.

All share the same trained backbone and the same mechanics, written once in ``DiffusionAgent``:
  * observation history of n_obs_steps (=2); the first observation of an episode is repeated;
  * action-chunk cache: plan a chunk of horizon H (=16) in normalised space, execute the
    n_action_steps (=8) actions starting at the current step (chunk positions To-1 .. To+Ta-2, as
    LeRobot's Diffusion Policy does), then replan;
  * single env (obs arrays without batch dim, returns (A,)) or a VectorEnv batch (returns (B, A)), one
    batched network call per replan;
  * one torch.Generator per batch row (seeded ``seed + row``), so row i of a batch gives the same
    actions as a single-env agent with seed ``seed + i`` on the same episode;
  * actions are unnormalised and clipped to the env's action space; malformed observations (wrong
    keys, shapes, NaN/inf) raise ValueError.

STEP adds the predictor, the previous chunk and the stall detector (``plan`` below). First call of an
episode (no previous chunk), ``first_call="predictor"`` (default): the predictor runs in its trained
"no history" mode (spatial-only guess from the observation) and the same k-step warm start follows,
so every STEP call costs the same k NFE + one predictor pass. ``first_call="noise"``: plain DDIM-k from
noise for that one chunk.

``step@t:k`` (``AgentConfig.warm_start_t``) moves where the warm start enters: at timestep t, with the k DDIM
steps spread evenly from t down to x0, instead of the paper's first timestep of the k-step schedule (t = 50, 0
for k = 2, whose second step at t = 0 barely changes the sample). Starts from noise keep the plain schedule.

``step:0`` (steps = 0) is the predictor alone: its chunk is executed as it is, with no denoising and no
stall perturbation (the "predictor only" row of ``step analyze predictor-only``). Its first call uses
the predictor's "no history" mode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from agents.backbone import Backbone
from agents.factory import DEFAULT_STEPS, WARM_SOURCES, warm_timesteps
from agents.predictor import Predictor, shift_chunk
from agents.samplers import DDIMSampler, Sampler, ScheduleConfig, WarmStart, make_sampler
from agents.sb3 import DiffusionRowsMixin
from agents.stall import StallConfig, StallDetector
from step_envs.contract import AGENT_POS, ENVIRONMENT_STATE, PIXELS
from step_envs.dataset import ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY

FIRST_CALL_MODES = ("predictor", "noise")


@dataclass
class AgentConfig:
    method: str = "ddim"  # ddpm | ddim | dpmsolver | step
    steps: int = 4
    seed: int = 0
    first_call: str = "predictor"  # STEP only, see module docstring
    warm_source: str = "predictor"  # STEP only, see WARM_SOURCES
    # STEP only: the timestep where the warm start enters (None: the paper's, the first timestep of the K'-step
    # DDIM schedule: STEP-2 runs t = 50, 0); an int t runs K' steps spread from t down to x0 (factory.warm_timesteps)
    warm_start_t: int | None = None
    # STEP only: run the predictor as a frozen TorchScript trace in steady state. At batch 1 on a CPU the
    # eager module's per-op Python overhead is most of its cost; the trace cuts it about in half.
    trace_predictor: bool = True
    stall: StallConfig = field(default_factory=StallConfig)


class DiffusionAgent(DiffusionRowsMixin):  # + stable-baselines3's predict() (agents/sb3.py)
    def __init__(self, backbone: Backbone, cfg: AgentConfig, action_space, batch_size: int | None = None,
                 predictor: Predictor | None = None):
        if cfg.method not in DEFAULT_STEPS:
            raise ValueError(f"Unknown diffusion method {cfg.method!r}: {', '.join(DEFAULT_STEPS)}")
        if cfg.warm_source not in WARM_SOURCES:
            raise ValueError(f"warm_source must be one of {WARM_SOURCES}, got {cfg.warm_source!r}")
        if cfg.method == "step" and predictor is None and cfg.warm_source != "temporal":
            raise ValueError("STEP needs a trained predictor (`step train-predictor`).")
        if cfg.first_call not in FIRST_CALL_MODES:
            raise ValueError(f"first_call must be one of {FIRST_CALL_MODES}, got {cfg.first_call!r}")
        if cfg.steps < 0 or (cfg.steps == 0 and not (cfg.method == "step" and cfg.warm_source == "predictor")):
            raise ValueError(f"{cfg.method}:{cfg.steps}: steps must be positive (0 only for step:0, the predictor alone).")
        if cfg.steps == 0 and cfg.first_call == "noise":
            raise ValueError("step:0 runs no denoising, so its first call cannot start from noise (first_call='noise').")
        self.backbone = backbone.eval()
        self.cfg = cfg
        self.batch_size = batch_size
        self.rows = batch_size or 1
        self.low = np.asarray(action_space.low, dtype=np.float32)
        self.high = np.asarray(action_space.high, dtype=np.float32)
        pc = backbone.cfg
        if pc.n_action_steps > pc.horizon - pc.n_obs_steps + 1:
            raise ValueError("n_action_steps must be <= horizon - n_obs_steps + 1")
        if cfg.warm_start_t is not None and (cfg.method != "step" or cfg.steps == 0):
            raise ValueError(f"{cfg.method}:{cfg.steps}: a warm-start timestep needs STEP with at least one denoising step.")
        # step:0 has no sampler: the predictor's chunk is the plan
        schedule = ScheduleConfig.from_policy(pc)
        self.sampler: Sampler | None = make_sampler(cfg.method, cfg.steps, schedule) if cfg.steps else None
        # Starts from pure noise (STEP's first_call="noise", step-temporal's first call) run the plain K'-step DDIM
        # schedule; only the warm start enters at warm_start_t.
        self.noise_sampler = self.sampler
        if cfg.warm_start_t is not None:
            self.sampler = DDIMSampler(cfg.steps, schedule, timesteps=warm_timesteps(cfg.warm_start_t, cfg.steps))
        self.predictor = predictor.eval() if predictor is not None else None
        self._traced_predictor = None
        if cfg.method == "step" and predictor is not None:
            if predictor.cfg.shift != pc.n_action_steps or predictor.cfg.horizon != pc.horizon:
                raise ValueError("Predictor horizon/shift do not match the policy's horizon/n_action_steps.")
        if cfg.method == "step":
            assert self.sampler is None or isinstance(self.sampler, DDIMSampler)
            self.warm = WarmStart(self.sampler) if self.sampler is not None else None
            self.stall = StallDetector(cfg.stall, shift=pc.n_action_steps)  # xi: see WarmStart.sample
        self.n_replans = 0
        self.reset()

    # ----- episode state -----
    def reset(self) -> None:
        self.history: dict[str, Tensor] | None = None
        self.cache: np.ndarray | None = None
        self.cache_index = 0
        self.prev_chunk: Tensor | None = None
        self.last_chunk: Tensor | None = None
        self.generators = [torch.Generator().manual_seed(self.cfg.seed + i) for i in range(self.rows)]
        if self.cfg.method == "step":
            self.stall.reset()

    # ----- observations -----
    def _obs_tensors(self, obs: dict) -> dict[str, Tensor]:
        """Validate an env observation and convert it to raw-unit tensors with a batch dim."""
        if not isinstance(obs, dict):
            raise ValueError(f"Observation must be a dict, got {type(obs).__name__}.")
        feats = self.backbone.features
        lead = () if self.batch_size is None else (self.batch_size,)
        out = {}
        wanted = [(AGENT_POS, STATE_KEY, (feats.state_dim,))]
        if feats.env_state_dim:
            wanted.append((ENVIRONMENT_STATE, ENV_STATE_KEY, (feats.env_state_dim,)))
        for key, name, shape in wanted:
            if key not in obs:
                raise ValueError(f"Observation lacks {key!r} (has {sorted(obs)}); the policy needs it.")
            arr = np.asarray(obs[key], dtype=np.float32)
            if arr.shape != lead + shape:
                raise ValueError(f"Observation {key!r} has shape {arr.shape}, expected {lead + shape}.")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Observation {key!r} contains NaN or inf.")
            out[name] = torch.from_numpy(arr).reshape(self.rows, *shape)
        for cam, hwc in feats.cameras.items():
            pixels = obs.get(PIXELS, {})
            if cam not in pixels:
                raise ValueError(f"Observation lacks pixels[{cam!r}]; the policy needs that camera.")
            arr = np.asarray(pixels[cam])
            if arr.shape != lead + tuple(hwc) or arr.dtype != np.uint8:
                raise ValueError(f"pixels[{cam!r}] has shape {arr.shape} {arr.dtype}, expected {lead + tuple(hwc)} uint8.")
            out[IMAGE_PREFIX + cam] = torch.from_numpy(arr).reshape(self.rows, *hwc).permute(0, 3, 1, 2)
        return out

    def _push_history(self, current: dict[str, Tensor]) -> None:
        steps = self.backbone.cfg.n_obs_steps
        if self.history is None:
            self.history = {k: v.unsqueeze(1).repeat(1, steps, *([1] * (v.ndim - 1))) for k, v in current.items()}
        else:
            self.history = {k: torch.cat([self.history[k][:, 1:], current[k].unsqueeze(1)], dim=1) for k in current}

    # ----- planning -----
    def plan(self, cond: Tensor) -> Tensor:
        """One chunk (B, H, A) in normalised space from the global condition."""
        shape = (self.rows, *self.backbone.action_shape)
        denoise = self.backbone.denoise
        if self.cfg.method != "step":
            return self.sampler.sample(denoise, cond, shape, self.generators)
        prev = self.prev_chunk
        source = self.cfg.warm_source
        if self.warm is None:  # step:0, the predictor alone
            chunk = self._predict(cond, prev)
        elif prev is None and (self.cfg.first_call == "noise" or source == "temporal"):
            chunk = self.noise_sampler.sample(denoise, cond, shape, self.generators)
        else:
            if source == "temporal":
                pred = shift_chunk(prev, self.backbone.cfg.n_action_steps)
            else:
                pred = self._predict(cond, prev if source == "predictor" else None)
            lam, sigma, _ = self.stall.coefficients(self.rows)
            chunk = self.warm.sample(denoise, cond, pred, self.generators, lam=lam, sigma=sigma)
        self.stall.update(prev, chunk)
        self.prev_chunk = chunk
        return chunk

    def _predict(self, cond: Tensor, prev: Tensor | None) -> Tensor:
        if prev is None or not self.cfg.trace_predictor:  # first call of an episode: eager, once
            return self.predictor(cond, prev)
        if self._traced_predictor is None:  # traced on first use, for this agent's batch size
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                # The shape-dependent views in the predictor are fixed for this batch size, as intended.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(self.predictor, (cond.clone(), prev.clone()), check_trace=False)
            self._traced_predictor = torch.jit.freeze(traced)
        return self._traced_predictor(cond, prev)

    def _replan(self) -> None:
        pc = self.backbone.cfg
        with torch.inference_mode():
            cond = self.backbone.global_cond(self.history)
            chunk = self.plan(cond)
            start = pc.n_obs_steps - 1
            actions = self.backbone.unnormalize_action(chunk[:, start : start + pc.n_action_steps])
        self.last_chunk = chunk
        # The one clip of the policy's actions: into the env's action space (the env's validate_action only
        # clips float noise within its tolerance and refuses anything further out).
        self.cache = np.clip(actions.numpy(), self.low, self.high).astype(np.float32)
        self.cache_index = 0
        self.n_replans += 1

    def act(self, obs: dict) -> np.ndarray:
        self._push_history(self._obs_tensors(obs))
        if self.cache is None or self.cache_index >= self.cache.shape[1]:
            self._replan()
        action = self.cache[:, self.cache_index]
        self.cache_index += 1
        return action[0].copy() if self.batch_size is None else action.copy()

    def chunk(self, obs_history: dict[str, Tensor]) -> Tensor:
        """One bare chunk inference (used by the latency benchmark): history in, normalised chunk out."""
        with torch.inference_mode():
            return self.plan(self.backbone.global_cond(obs_history))

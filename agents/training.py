"""Training of the diffusion backbone (``step train-policy``) and the STEP predictor (``step train-predictor``).

Why not LeRobot's training loop (``lerobot-train``): it is driven by its own config system and
checkpoint layout, evaluates through LeRobot's env factory (not our ``step/*`` envs and rollout loop),
decodes the dataset item by item through ``delta_timestamps`` (slow on 2 CPU cores for a state task
that fits in memory many times over), and has no EMA of the weights, which Diffusion Policy relies
on. We keep LeRobot's network and loss (``Backbone.loss`` -> ``DiffusionModel.compute_loss``) and
write the loop: AdamW, cosine schedule with warm-up (diffusers), EMA (diffusers' EMAModel, the
Diffusion Policy power schedule), a JSONL loss log, periodic seeded rollouts, resumable checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.backbone import PRESETS, Backbone, FeatureSpec
from agents.checkpoint import (
    flatten_optimizer,
    load_policy,
    load_training_state,
    policy_files,
    policy_fingerprint,
    save_predictor,
    training_state_files,
    unflatten_optimizer,
)
from agents.compute import (
    CHANNELS_LAST,
    autocast,
    resolve_channels_last,
    resolve_device,
    resolve_precision,
    resolve_threads,
    use_channels_last,
)
from agents.config_files import option, validate_fields
from agents.predictor import Predictor, PredictorConfig, shift_chunk
from step_envs.dataset import ACTION_KEY, ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY, load_dataset
from step_envs.safe_io import atomic_write, commit_files, fault_point, folder_lock
from step_envs.seeds import TRAIN_EVAL_SEEDS, check_train_eval_seeds


# ---------------------------------------------------------------- data
@dataclass
class FrameData:
    """A dataset held in memory: per-frame tensors and each frame's episode bounds."""

    state: torch.Tensor  # (N, S)
    action: torch.Tensor  # (N, A)
    env_state: torch.Tensor | None  # (N, E)
    images: dict[str, torch.Tensor]  # cam -> (N, 3, H, W) uint8
    episode: torch.Tensor  # (N,) episode number (0..E-1)
    start: torch.Tensor  # (N,) first frame of the frame's episode
    end: torch.Tensor  # (N,) last frame (inclusive)

    @property
    def num_episodes(self) -> int:
        return int(self.episode.max()) + 1 if len(self.episode) else 0

    def features(self) -> FeatureSpec:
        return FeatureSpec(
            state_dim=self.state.shape[1],
            action_dim=self.action.shape[1],
            env_state_dim=self.env_state.shape[1] if self.env_state is not None else None,
            cameras={cam: [img.shape[2], img.shape[3], img.shape[1]] for cam, img in self.images.items()},
        )


def _decode_camera(ds, key: str, ep_raw: np.ndarray, timestamps: np.ndarray, progress: bool) -> torch.Tensor:
    """All frames of one camera as uint8 (N, 3, H, W), in dataset row order.

    A video camera is decoded one episode at a time (one pass over its frames). LeRobot's per-item access seeks the
    video once per frame: 3 min for Push-T's 31k frames (300 episodes) on the 2-core Xeon, where one pass took
    0.09 s per episode."""
    from lerobot.datasets.video_utils import decode_video_frames

    if key not in ds.meta.video_keys:  # images stored in the parquet files: nothing to seek
        frames = [ds[i][key] for i in tqdm(range(len(ds)), desc=f"decoding {key}", leave=False, disable=not progress)]
        return (torch.stack(frames) * 255).round().to(torch.uint8)
    out = None
    for ep_idx in tqdm(np.unique(ep_raw), desc=f"decoding {key}", unit="ep", leave=False, disable=not progress):
        rows = np.nonzero(ep_raw == ep_idx)[0]
        ep = ds.meta.episodes[int(ep_idx)]
        start = float(ep[f"videos/{key}/from_timestamp"])
        frames = decode_video_frames(ds.root / ds.meta.get_video_file_path(int(ep_idx), key),
                                     [start + float(t) for t in timestamps[rows]], ds.tolerance_s,
                                     backend="pyav", return_uint8=True)
        if len(frames) != len(rows):
            raise ValueError(f"{ds.root}: episode {ep_idx} has {len(rows)} frames but its {key} video gave "
                             f"{len(frames)}; the dataset is damaged, rebuild it with `step collect`.")
        if out is None:
            out = torch.empty((len(ep_raw), *frames.shape[1:]), dtype=torch.uint8)
        out[torch.as_tensor(rows)] = frames
    return out


def _raw_only(path) -> bool:
    """A `step collect` folder reduced to its ``raw/`` episode cache (no LeRobot dataset beside it)."""
    path = Path(path)
    return (path / "raw").is_dir() and not (path / "lerobot").exists() and not (path / "meta").exists()


def load_raw_frames(path, use_images: bool = False, use_env_state: bool = True, progress: bool = True) -> FrameData:
    """Every kept episode of ``<path>/raw/seed_*.npz`` in seed order, as ``load_frames`` returns the dataset.

    For a machine that has torch but not LeRobot's dataset stack (a lent GPU: ``scripts/gpu_train.py``): the raw
    cache is what `step collect` builds its dataset from, with lossless frames where the dataset's videos are
    AV1-encoded. Episodes that `step collect` cached beyond the dataset's count would be read too."""
    files = sorted((Path(path) / "raw").glob("seed_*.npz"))
    if not files:
        raise FileNotFoundError(f"{path}/raw holds no seed_*.npz episodes.")
    parts: dict[str, list[np.ndarray]] = {}
    episode = []
    for number, file in enumerate(tqdm(files, desc="reading raw episodes", leave=False, disable=not progress)):
        try:
            with np.load(file) as z:
                keys = [STATE_KEY, ACTION_KEY] + ([ENV_STATE_KEY] if use_env_state and ENV_STATE_KEY in z else [])
                keys += [k for k in z.files if use_images and k.startswith(IMAGE_PREFIX)]
                for key in keys:
                    parts.setdefault(key, []).append(z[key])
                episode.append(np.full(len(z[ACTION_KEY]), number, dtype=np.int64))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"{file} is not a readable episode ({err}); delete it and rerun `step collect`.") from None
    episode = torch.as_tensor(np.concatenate(episode))
    images = {key[len(IMAGE_PREFIX):]: torch.as_tensor(np.concatenate(v)).permute(0, 3, 1, 2).contiguous()
              for key, v in parts.items() if key.startswith(IMAGE_PREFIX)}  # (N, H, W, 3) -> (N, 3, H, W)
    env_state = (torch.as_tensor(np.concatenate(parts[ENV_STATE_KEY]), dtype=torch.float32)
                 if ENV_STATE_KEY in parts else None)
    state = torch.as_tensor(np.concatenate(parts[STATE_KEY]), dtype=torch.float32)
    action = torch.as_tensor(np.concatenate(parts[ACTION_KEY]), dtype=torch.float32)
    return FrameData(state, action, env_state, images, episode, *_episode_bounds(episode))


def concat_frames(parts: list[FrameData], names: list[str]) -> FrameData:
    """Several datasets of one task as one: frames appended, episode numbers continued. Refuses datasets whose
    features differ (another task, another observation layout)."""
    first = parts[0].features()
    for part, name in zip(parts[1:], names[1:]):
        if part.features() != first:
            raise ValueError(f"Dataset {name} does not match {names[0]}: features {part.features()} against "
                             f"{first}; datasets trained together must come from the same task and obs type.")
    episodes, offset = [], 0
    for part in parts:
        episodes.append(part.episode + offset)
        offset += part.num_episodes
    episode = torch.cat(episodes)
    env_state = torch.cat([p.env_state for p in parts]) if parts[0].env_state is not None else None
    images = {cam: torch.cat([p.images[cam] for p in parts]) for cam in parts[0].images}
    return FrameData(torch.cat([p.state for p in parts]), torch.cat([p.action for p in parts]), env_state, images,
                     episode, *_episode_bounds(episode))


def _episode_bounds(episode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each frame's first and last (inclusive) frame of its episode (episodes are contiguous runs)."""
    n = len(episode)
    idx = torch.arange(n)
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = episode[1:] != episode[:-1]
    start = torch.cummax(torch.where(change, idx, torch.zeros_like(idx)), 0).values
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = episode[1:] != episode[:-1]
    end = torch.flip(torch.cummin(torch.flip(torch.where(last, idx, torch.full_like(idx, n)), [0]), 0).values, [0])
    return start, end


def load_frames(path, use_images: bool = False, use_env_state: bool = True, progress: bool = True) -> FrameData:
    """Read a LeRobotDataset (local root or `step collect` folder) fully into memory.

    A `step collect` folder holding only its ``raw/`` cache is read from that (``load_raw_frames``)."""
    if _raw_only(path):
        return load_raw_frames(path, use_images, use_env_state, progress)
    ds = load_dataset(path)
    hf = ds.hf_dataset.with_format("numpy")
    state = torch.as_tensor(np.stack(hf[STATE_KEY]), dtype=torch.float32)
    action = torch.as_tensor(np.stack(hf[ACTION_KEY]), dtype=torch.float32)
    env_state = None
    if use_env_state and ENV_STATE_KEY in hf.column_names:
        env_state = torch.as_tensor(np.stack(hf[ENV_STATE_KEY]), dtype=torch.float32)
    ep_raw = np.asarray(hf["episode_index"]).astype(np.int64)
    _, episode = np.unique(ep_raw, return_inverse=True)
    episode = torch.as_tensor(episode)
    images = {}
    if use_images:
        cams = [k for k in ds.meta.features if k.startswith(IMAGE_PREFIX)]
        timestamps = np.asarray(hf["timestamp"], dtype=np.float64)
        for key in cams:  # kept as uint8 to save memory
            images[key[len(IMAGE_PREFIX):]] = _decode_camera(ds, key, ep_raw, timestamps, progress)
    return FrameData(state, action, env_state, images, episode, *_episode_bounds(episode))


class Windows:
    """Observation / action windows around frame indices, edge-padded like LeRobot's dataset."""

    def __init__(self, data: FrameData, n_obs_steps: int, horizon: int):
        self.data = data
        self.n_obs_steps, self.horizon = n_obs_steps, horizon
        self.obs_offsets = torch.arange(1 - n_obs_steps, 1)
        self.act_offsets = torch.arange(1 - n_obs_steps, 1 - n_obs_steps + horizon)

    def _clamp(self, index: torch.Tensor, offsets: torch.Tensor):
        raw = index[:, None] + offsets[None]
        lo, hi = self.data.start[index][:, None], self.data.end[index][:, None]
        return raw.clamp(min=lo, max=hi), (raw < lo) | (raw > hi)

    def obs(self, index: torch.Tensor, images: bool = True) -> dict[str, torch.Tensor]:
        rows, _ = self._clamp(index, self.obs_offsets)
        out = {STATE_KEY: self.data.state[rows]}
        if self.data.env_state is not None:
            out[ENV_STATE_KEY] = self.data.env_state[rows]
        for cam, img in self.data.images.items() if images else ():
            out[IMAGE_PREFIX + cam] = img[rows]
        return out

    def action(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, pad = self._clamp(index, self.act_offsets)
        return self.data.action[rows], pad


class WindowBank:
    """Every training window gathered once into contiguous tensors, so a batch is one index per tensor.

    Low-dimensional windows are stored whole ((N, To, S), (N, H, A), ...: a few MB even for Transport);
    images stay uint8 frames and only their row numbers are stored, so memory grows with frames, not
    with windows. This keeps the optimizer, not the data path, the bottleneck on two cores.
    """

    def __init__(self, windows: Windows, index: torch.Tensor):
        self.low_dim = windows.obs(index, images=False)
        self.image_rows, _ = windows._clamp(index, windows.obs_offsets)
        self.images = {IMAGE_PREFIX + cam: img for cam, img in windows.data.images.items()}
        self.action, self.action_is_pad = windows.action(index)

    @classmethod
    def for_policy(cls, data: "FrameData", cfg) -> "WindowBank":
        """Every window a policy with config ``cfg`` trains on (all episodes, tails dropped)."""
        return cls(Windows(data, cfg.n_obs_steps, cfg.horizon), sample_indices(data, padded_tail(cfg)))

    def __len__(self) -> int:
        return len(self.action)

    def to(self, device: torch.device) -> "WindowBank":
        """Every tensor on ``device`` (a GPU run gathers its batches there: images stay uint8)."""
        self.low_dim = {k: v.to(device) for k, v in self.low_dim.items()}
        self.image_rows = self.image_rows.to(device)
        self.images = {k: v.to(device) for k, v in self.images.items()}
        self.action, self.action_is_pad = self.action.to(device), self.action_is_pad.to(device)
        return self

    def batch(self, pick: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        obs = {k: v[pick] for k, v in self.low_dim.items()}
        rows = self.image_rows[pick]
        obs.update({k: img[rows] for k, img in self.images.items()})
        return obs, self.action[pick], self.action_is_pad[pick]


def padded_tail(cfg) -> int:
    """Frames at an episode's end whose training window would be mostly padding (Diffusion Policy drops them)."""
    return cfg.horizon - cfg.n_action_steps - cfg.n_obs_steps + 1


def sample_indices(data: FrameData, drop_last: int, episodes: set[int] | None = None) -> torch.Tensor:
    """Frames that start a training window (the last ``drop_last`` of each episode are mostly padding)."""
    idx = torch.arange(len(data.episode))
    keep = idx <= data.end - drop_last
    if episodes is not None:
        keep &= torch.tensor([int(e) in episodes for e in data.episode])
    return idx[keep]


def fit_normalizer(backbone: Backbone, data: FrameData) -> None:
    sample = None
    if data.images:
        cam = next(iter(data.images))
        sample = data.images[cam][:: max(1, len(data.episode) // 2000)]
    backbone.normalizer.fit(data.state, data.action, data.env_state, sample)


# ---------------------------------------------------------------- train-policy
@dataclass
class TrainPolicyConfig:
    dataset: str = option(help="LeRobotDataset root or `step collect` folder")
    out: str = option(help="checkpoint folder (resumes if it holds a run)")
    # e.g. DART demonstrations (step collect --action-noise) beside the clean ones; the normaliser is fitted on all
    # of them (or taken from --init-from)
    extra_datasets: tuple[str, ...] = option((), help="more datasets of the same task, comma-separated, trained on "
                                                      "together with --dataset")
    task: str = "pusht"
    preset: str = option("pusht_state", choices=PRESETS, help="backbone size (agents/backbone.py PRESETS)")
    # "state": agent_pos + environment_state; "pixels": agent_pos + images
    obs_type: str = option("state", choices=("state", "pixels"))
    steps: int = option(20000, min=1)
    stop_at: int | None = option(None, min=1, help="stop (and save) at this step; rerun to resume towards --steps")
    # fills both cores: ~2.5x the samples/s of batch 64 on one thread (step train-bench)
    batch_size: int = option(256, min=1)
    lr: float = 5e-4
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = option(500, min=0)
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    log_every: int = option(50, min=1)
    save_every: int = option(1000, min=1)
    eval_every: int = option(5000, min=0, help="0: no periodic rollouts")
    eval_episodes: int = option(5, min=1)
    eval_method: str = "ddim:8"
    eval_seed_start: int = TRAIN_EVAL_SEEDS.start  # a block step collect refuses (step_envs/seeds.py)
    eval_max_steps: int | None = None
    seed: int = 0
    # 0: every core (right when the run is alone on the machine)
    threads: int = option(0, min=0, help="torch CPU threads (0: every core)")
    precision: str = option("auto", help="auto | bf16 | fp32 (auto: bf16 for image encoders on a CPU with native "
                                         "bf16, agents/compute.py)")
    channels_last: str = option("auto", choices=CHANNELS_LAST,
                                help="auto | on | off: NHWC image encoder (auto: on for bf16 on a CPU with AMX, "
                                     "agents/compute.py)")
    # Training alone moves to a GPU; its periodic rollouts, and every agent, run on the CPU.
    device: str = option("auto", help="auto | cpu | cuda (auto: a CUDA GPU when torch sees one)")
    # Per-position noise levels for the streaming baselines (agents/per_position.py): chunk (Diffusion Policy) |
    # sdp | rnrdp | streaming (one backbone for both sdp and rnrdp). Recorded in config.json; sdp / rnrdp refuse
    # a backbone trained without.
    noise_mode: str = option("chunk", help="chunk | sdp | rnrdp | streaming: per-position noise levels for sdp / "
                                           "rnrdp (agents/per_position.py)")
    stream_chunk: int = 5  # SDP's chunk length (authors' DDIM lowdim config for horizon 16)
    mixture_linear_prob: float = 0.5  # RNR-DP's mixture: share of linear (ladder) schedules, the rest random
    # Start from another policy checkpoint's weights and normaliser (same preset and features), e.g. to fine-tune a
    # streaming backbone from the task's DDPM backbone instead of training it from scratch.
    init_from: str | None = option(None, help="start from this policy checkpoint's weights (e.g. fine-tune a "
                                              "streaming backbone from the DDPM one)")
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.channels_last, bool):  # YAML `channels_last: true` from before auto existed
            self.channels_last = "on" if self.channels_last else "off"
        validate_fields(self)


def _make_ema(model: torch.nn.Module, cfg: TrainPolicyConfig):
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True, power=cfg.ema_power)


def _ema_backbone(backbone: Backbone, ema) -> Backbone:
    averaged = copy.deepcopy(backbone)
    ema.copy_to(averaged.parameters())
    return averaged.eval()


def _rollout_score(backbone: Backbone, cfg: TrainPolicyConfig) -> dict:
    from agents.factory import make_agent
    from step_envs.registry import make_env
    from step_envs.rollout import rollout, summarize

    backbone = backbone.to("cpu")  # agents run on the CPU, whatever the training's device
    env = make_env(cfg.task, obs_type="state" if cfg.obs_type == "state" else "pixels")
    try:
        agent = make_agent(cfg.eval_method, env, task=cfg.task, backbone=backbone, seed=cfg.seed)
        seeds = range(cfg.eval_seed_start, cfg.eval_seed_start + cfg.eval_episodes)
        summary = summarize(rollout(env, agent, seeds, progress=False, max_steps=cfg.eval_max_steps))
    finally:
        env.close()
    return {k: summary[k] for k in ("episodes", "success_rate", "mean_max_reward", "mean_length")}


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of steps after ``last_step`` (atomically: a kill here loses nothing)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))


def policy_step_loss(backbone: Backbone, obs: dict, action: torch.Tensor, pad: torch.Tensor, precision: str,
                     noise=None) -> torch.Tensor:
    """The diffusion loss of one batch, its forward pass in ``precision`` (weights stay fp32).

    ``noise``: None (one timestep per sample) or a callable ``batch -> (B, H) timesteps`` (per-position noise)."""
    with autocast(precision, action.device.type):
        if noise is None:
            loss = backbone.loss(obs, action, pad)
        else:
            from agents.per_position import per_position_loss

            loss = per_position_loss(backbone, obs, action, pad, noise(action.shape[0]))
    return loss.float()


def make_optimizer(backbone: Backbone, cfg: TrainPolicyConfig):
    """AdamW + cosine schedule with warm-up + EMA, as Diffusion Policy trains."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(backbone.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    return optimizer, lr_schedule, _make_ema(backbone, cfg)


def optimizer_step(backbone: Backbone, optimizer, lr_schedule, ema, obs: dict, action: torch.Tensor,
                   pad: torch.Tensor, precision: str, noise=None) -> float:
    """One training step (the unit ``step train-bench`` times); returns the batch loss."""
    loss = policy_step_loss(backbone, obs, action, pad, precision, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.model.parameters(), 10.0)
    optimizer.step()
    lr_schedule.step()
    ema.step(backbone.parameters())
    return float(loss.detach())


def _noise_setup(backbone: Backbone, cfg: TrainPolicyConfig):
    """``init_from`` weights, the per-position encoder and the noise sampler of ``cfg.noise_mode``.

    Returns (noise sampler or None, the fields recorded in config.json)."""
    from agents.per_position import NOISE_MODES, chunk_indices, enable_per_position, training_levels

    if cfg.noise_mode not in NOISE_MODES:
        raise ValueError(f"--noise-mode must be one of {', '.join(NOISE_MODES)}, got {cfg.noise_mode!r}.")
    if not 0.0 <= cfg.mixture_linear_prob <= 1.0:
        raise ValueError(f"--mixture-linear-prob must lie in [0, 1], got {cfg.mixture_linear_prob}.")
    per_position = cfg.noise_mode != "chunk"
    if per_position:
        chunk_indices(backbone.cfg.horizon, backbone.cfg.n_obs_steps, cfg.stream_chunk)  # a clear error if too long
    if cfg.init_from:
        source, config = load_policy(cfg.init_from)
        if dataclasses.asdict(source.cfg) != dataclasses.asdict(backbone.cfg) or \
                dataclasses.asdict(source.features) != dataclasses.asdict(backbone.features):
            raise ValueError(f"--init-from {cfg.init_from} has another preset or other features than this run "
                             f"(preset {config.get('preset')!r}, features {dataclasses.asdict(source.features)}).")
        if per_position:
            enable_per_position(source)
            enable_per_position(backbone)
        missing, _ = backbone.load_state_dict(source.state_dict(), strict=False)
        if any(not k.endswith((".mix.weight", ".mix.bias")) for k in missing):
            raise ValueError(f"--init-from {cfg.init_from}: weights {missing} are missing.")
    elif per_position:
        enable_per_position(backbone)
    record = {"noise_mode": cfg.noise_mode, "per_position_timesteps": per_position}
    if per_position:
        record.update(stream_chunk=cfg.stream_chunk, mixture_linear_prob=cfg.mixture_linear_prob)
    if cfg.init_from:
        record["init_from"] = str(Path(cfg.init_from).resolve())
    if not per_position:
        return None, record
    return (lambda batch: training_levels(cfg.noise_mode, batch, backbone.cfg, cfg.stream_chunk,
                                          cfg.mixture_linear_prob)), record


def _numpy_rng_state() -> tuple[torch.Tensor, list]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return torch.from_numpy(keys.astype(np.int64)), [kind, int(pos), int(has_gauss), float(cached)]


def _set_numpy_rng_state(keys: torch.Tensor, rest: list) -> None:
    kind, pos, has_gauss, cached = rest
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class TrainingRun:
    """What ``train-policy`` and ``train-baseline`` share: the optimiser, LR schedule, EMA, step and RNGs (the data
    generator's, torch's, NumPy's) saved and restored as one set for an exact resume; the JSONL loss log averaged
    over ``log_every`` steps (the window straddling a save is saved with it); periodic saves and seeded rollouts
    that leave the training's RNG untouched. The caller owns the networks, what else a save holds and the step."""

    def __init__(self, out: Path, cfg, optimizer, lr_schedule, ema, generator: torch.Generator):
        self.out, self.cfg = out, cfg
        self.optimizer, self.lr_schedule, self.ema, self.generator = optimizer, lr_schedule, ema, generator
        self.step, self.elapsed_before, self.window = 0, 0.0, []  # window: the loss dicts of the record in progress
        self.end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
        self.last_eval: dict | None = None
        self.t0 = time.time()

    def restore(self, tensors: dict, meta: dict) -> None:
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        self.ema.shadow_params = [tensors[f"ema.{i}"].to(p.device, copy=True)
                                  for i, p in enumerate(self.ema.shadow_params)]
        self.ema.optimization_step = meta["ema_step"]
        self.step = meta["step"]
        self.generator.set_state(tensors["rng"].to(torch.uint8))
        if "torch_rng" in tensors:  # the loss draws its noise and timesteps from torch's global generator
            torch.set_rng_state(tensors["torch_rng"].to(torch.uint8))
        if "cuda_rng" in tensors and torch.cuda.is_available():  # a GPU run draws them on the GPU
            torch.cuda.set_rng_state(tensors["cuda_rng"].to(torch.uint8))
        if "numpy_rng" in tensors:
            _set_numpy_rng_state(tensors["numpy_rng"], meta["numpy_rng"])
        self.elapsed_before = meta.get("seconds", 0.0)
        # A record straddling the save averages the same losses (older saves kept bare floats: the loss).
        self.window = [w if isinstance(w, dict) else {"loss": w} for w in meta.get("log_window", [])]
        # Records past the saved step came from the part of the run that the kill threw away.
        for log in ("loss.jsonl", "eval.jsonl"):
            _truncate_jsonl(self.out / log, self.step)
        print(f"resuming from step {self.step} in {self.out}")

    def seconds(self) -> float:
        return round(self.elapsed_before + time.time() - self.t0, 2)

    def state(self) -> tuple[dict, dict]:
        """The tensors and metadata of the shared state (the caller adds its weights and fingerprint)."""
        tensors, opt_meta = flatten_optimizer(self.optimizer)
        tensors.update({f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)})
        tensors["rng"] = self.generator.get_state()
        tensors["torch_rng"] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            tensors["cuda_rng"] = torch.cuda.get_rng_state()
        tensors["numpy_rng"], numpy_rng = _numpy_rng_state()
        meta = {"step": self.step, "optimizer": opt_meta, "lr_schedule": self.lr_schedule.state_dict(),
                "ema_step": self.ema.optimization_step, "seconds": self.seconds(), "numpy_rng": numpy_rng,
                "log_window": self.window}
        return tensors, meta

    def begin(self, desc: str):
        """The progress bar; the clock of this session starts here."""
        self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc=desc, unit="step", disable=not self.cfg.progress)
        self.t0 = time.time()
        return self.bar

    def stepped(self, losses: dict[str, float], save, evaluate) -> None:
        """After one optimiser step: log, save (``save()``) and roll out (``evaluate() -> dict``) when due."""
        cfg = self.cfg
        self.step += 1
        self.window.append(losses)
        self.bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            record = {"step": self.step, **{k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]},
                      "lr": self.lr_schedule.get_last_lr()[0], "seconds": self.seconds()}
            _append_jsonl(self.out / "loss.jsonl", record)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}")
            self.window = []
        if self.step % cfg.save_every == 0 or self.step == self.end:
            save()
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
            with torch.random.fork_rng():  # the rollout must not move the training's RNG (exact resume)
                self.last_eval = {"step": self.step, **evaluate()}
            _append_jsonl(self.out / "eval.jsonl", self.last_eval)
            self.bar.write(f"step {self.step}: rollout {self.last_eval}")
        fault_point("train-step")  # tests: STEP_FAULT=train-step:<n> kills the run here, after step n


def train_policy(cfg: TrainPolicyConfig) -> dict:
    """Train (or resume) a Diffusion Policy backbone; returns a summary dict.

    Resuming is an exact continuation: each save commits the EMA weights, config.json and the training state
    (raw weights, optimiser, EMA, LR schedule, step, the data generator's, torch's and NumPy's RNG states) as one
    set (``step_envs.safe_io.commit_files``); a resumed run drops the log records past the saved step and keeps
    counting wall time. One process at a time per ``--out`` (``folder_lock``).
    """
    with folder_lock(cfg.out, "train-policy"):  # the fields were checked when cfg was made (__post_init__)
        return _train_policy(cfg)


def _train_policy(cfg: TrainPolicyConfig) -> dict:
    if cfg.preset not in PRESETS:
        raise ValueError(f"Unknown preset {cfg.preset!r}: {', '.join(PRESETS)}")
    if cfg.obs_type not in ("state", "pixels"):
        raise ValueError("obs_type must be 'state' or 'pixels'")
    if cfg.eval_every:
        check_train_eval_seeds(cfg.eval_seed_start, cfg.eval_episodes)
    torch.set_num_threads(resolve_threads(cfg.threads))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, has_images=cfg.obs_type == "pixels", device_type=device.type)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # every global RNG starts from the seed and is saved with the weights (exact resume)
    paths = [cfg.dataset, *cfg.extra_datasets]
    parts = [load_frames(path, use_images=cfg.obs_type == "pixels", use_env_state=cfg.obs_type == "state",
                         progress=cfg.progress) for path in paths]
    data = concat_frames(parts, paths) if len(parts) > 1 else parts[0]
    if cfg.obs_type == "pixels" and not data.images:
        raise ValueError(f"Dataset {cfg.dataset} has no images; use --obs-type state.")
    if cfg.obs_type == "state" and data.env_state is None:
        raise ValueError(f"Dataset {cfg.dataset} has no {ENV_STATE_KEY}; use --obs-type pixels.")
    features = data.features()
    policy_cfg = PRESETS[cfg.preset]
    backbone = Backbone(policy_cfg, features)
    fit_normalizer(backbone, data)
    noise, noise_record = _noise_setup(backbone, cfg)  # may load init_from's weights and normaliser
    channels_last = bool(data.images) and resolve_channels_last(cfg.channels_last, precision, device.type)
    if channels_last:
        use_channels_last(backbone.model)
    bank = WindowBank.for_policy(data, policy_cfg)
    if len(bank) == 0:
        raise ValueError("Dataset too small: no training windows.")
    backbone.to(device)
    bank.to(device)

    optimizer, lr_schedule, ema = make_optimizer(backbone, cfg)
    run = TrainingRun(out, cfg, optimizer, lr_schedule, ema, torch.Generator().manual_seed(cfg.seed))
    resumed = load_training_state(out)
    if resumed is not None:
        tensors, meta = resumed
        if meta.get("fingerprint") != policy_fingerprint(backbone):
            raise ValueError(f"{out} holds a run on another dataset/config; choose another --out.")
        backbone.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        run.restore(tensors, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def save() -> None:
        averaged = _ema_backbone(backbone, ema)
        files = policy_files(averaged, cfg.task, cfg.obs_type,
                             extra={"train_step": run.step, "preset": cfg.preset, **noise_record})
        tensors, meta = run.state()
        tensors.update({f"model.{k}": v for k, v in backbone.state_dict().items()})
        meta.update(fingerprint=policy_fingerprint(backbone), precision=precision)
        files.update(training_state_files(tensors, meta))
        commit_files(out, files)  # weights, config and state as one set: a kill mid-save never mixes two saves

    backbone.train()
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    bar = run.begin(f"train-policy ({precision}{', NHWC' if channels_last else ''}, {where})")
    while run.step < run.end:
        pick = torch.randint(len(bank), (cfg.batch_size,), generator=run.generator)  # CPU generator: same draws
        obs, action, pad = bank.batch(pick.to(device))
        loss = optimizer_step(backbone, optimizer, lr_schedule, ema, obs, action, pad, precision, noise)
        run.stepped({"loss": loss}, save, lambda: _rollout_score(_ema_backbone(backbone, ema), cfg))
    bar.close()
    if resumed is not None and run.step == resumed[1]["step"]:
        save()  # nothing left to train: still make sure model.safetensors matches the state
    return {"out": str(out), "step": run.step, "eval": run.last_eval}


# ---------------------------------------------------------------- train-predictor
@dataclass
class TrainPredictorConfig:
    policy: str = option(help="policy checkpoint (step train-policy --out)")
    dataset: str = option(help="LeRobotDataset root or `step collect` folder")
    out: str | None = option(None, help="predictor folder (default <policy>/predictor)")
    steps: int = option(4000, min=1)
    batch_size: int = option(256, min=1)
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = option(200, min=0)
    val_fraction: float = option(0.1, help="held-out episodes for the reported metrics, in [0, 1)")
    # training: probability of hiding the previous chunk (the predictor's first-call mode)
    prev_dropout: float = PredictorConfig.prev_dropout
    prev_source: str = option("dataset", choices=("dataset", "policy"),
                              help="previous chunk: 'dataset' (demo window Ta steps earlier) or 'policy' "
                                   "(backbone's own DDIM chunk there)")
    prev_policy_steps: int = option(10, min=1, help="DDIM steps for --prev-source policy")
    ablation: bool = option(True, help="skip the spatial-only predictor (trained by default and reported)")
    # the predictor's size (agents/predictor.py); the default is the paper-sized 0.4 M model, the small one
    # (--n-encoder-layers 0 --n-cross-blocks 1) costs a third of its batch-1 time
    d_model: int = option(PredictorConfig.d_model, min=8)
    n_heads: int = option(PredictorConfig.n_heads, min=1)
    ff_dim: int = option(PredictorConfig.ff_dim, min=8)
    n_encoder_layers: int = option(PredictorConfig.n_encoder_layers, min=0,
                                   help="self-attention layers over the observation and previous-chunk tokens")
    n_cross_blocks: int = option(PredictorConfig.n_cross_blocks, min=1)
    seed: int = 0
    threads: int = option(0, min=0, help="torch CPU threads (0: every core)")
    precision: str = option("auto", help="auto | bf16 | fp32 for the predictor's forward pass (auto: fp32, a 0.4 M "
                                         "model gains nothing)")
    device: str = option("auto", help="auto | cpu | cuda (auto: a CUDA GPU when torch sees one)")
    progress: bool = True

    def __post_init__(self):
        validate_fields(self)


def mare(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean action relative error in raw action units: mean over chunks of sum|pred-target| / sum|target|."""
    num = (pred - target).abs().flatten(1).sum(1)
    den = target.abs().flatten(1).sum(1).clamp_min(1e-8)
    return float((num / den).mean())


@dataclass
class PredictorData:
    cond: torch.Tensor  # (N, C) backbone global condition at each sample frame
    target: torch.Tensor  # (N, H, A) normalised action window at the frame
    prev: torch.Tensor  # (N, H, A) normalised chunk planned Ta frames earlier
    has_prev: torch.Tensor  # (N,) False where Ta frames earlier lies before the episode start

    def to(self, device) -> "PredictorData":
        return PredictorData(*(t.to(device) for t in (self.cond, self.target, self.prev, self.has_prev)))


def build_predictor_pairs(backbone: Backbone, data: FrameData, index: torch.Tensor, cfg: TrainPredictorConfig,
                          batch: int = 512) -> PredictorData:
    """Truly shifted pairs: the input chunk is the one planned Ta env steps BEFORE the target's frame.

    Never a slice of the target window (the public STEP code's leak). With prev_source="dataset" it is
    the demonstration's action window starting Ta frames earlier; with "policy" it is the backbone's
    own DDIM chunk for the observation Ta frames earlier (what the agent really feeds the predictor).
    """
    from agents.samplers import DDIMSampler, ScheduleConfig

    pc = backbone.cfg
    shift = pc.n_action_steps
    windows = Windows(data, pc.n_obs_steps, pc.horizon)
    earlier = (index - shift).clamp(min=data.start[index])
    has_prev = (index - shift) >= data.start[index]
    sampler = DDIMSampler(cfg.prev_policy_steps, ScheduleConfig.from_policy(pc)) if cfg.prev_source == "policy" else None
    conds, targets, prevs = [], [], []
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(backbone.parameters()).device  # the pairs are built where the backbone is, and kept on the CPU

    def obs(rows):
        return {k: v.to(device) for k, v in windows.obs(rows).items()}

    with torch.inference_mode():
        for s in range(0, len(index), batch):
            i, e = index[s : s + batch], earlier[s : s + batch]
            conds.append(backbone.global_cond(obs(i)).cpu())
            targets.append(backbone.normalize_action(windows.action(i)[0].to(device)).cpu())
            if sampler is None:
                prevs.append(backbone.normalize_action(windows.action(e)[0].to(device)).cpu())
            else:
                noise = torch.randn((len(e), *backbone.action_shape), generator=gen).to(device)
                prevs.append(sampler.run(backbone.denoise, backbone.global_cond(obs(e)), noise).cpu())
    return PredictorData(torch.cat(conds).clone(), torch.cat(targets).clone(), torch.cat(prevs).clone(), has_prev)


def _fit_predictor(model: Predictor, train: PredictorData, cfg: TrainPredictorConfig, desc: str) -> None:
    from diffusers.optimization import get_scheduler

    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, has_images=False, device_type=device.type)
    train = train.to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", disable=not cfg.progress)
    for _ in bar:
        pick = torch.randint(len(train.cond), (cfg.batch_size,), generator=generator)
        keep = torch.rand(len(pick), generator=generator) >= model.cfg.prev_dropout
        pick, keep = pick.to(device), keep.to(device)  # drawn on the CPU: the same draws on every device
        has_prev = train.has_prev[pick] & keep
        with autocast(precision, device.type):
            pred = model(train.cond[pick], train.prev[pick], has_prev)
        loss = torch.nn.functional.mse_loss(pred.float(), train.target[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.5f}", refresh=False)
    model.eval()


def evaluate_predictors(backbone: Backbone, val: PredictorData, models: dict[str, Predictor | None]) -> dict:
    """MSE (normalised) and MARE (raw units) on held-out pairs that have a previous chunk."""
    mask = val.has_prev
    target = val.target[mask]
    raw_target = backbone.unnormalize_action(target)
    results = {}
    with torch.inference_mode():
        for name, model in models.items():
            if model is None:  # temporal only: reuse the previous chunk shifted by Ta
                pred = shift_chunk(val.prev[mask], backbone.cfg.n_action_steps)
            else:
                pred = model(val.cond[mask], val.prev[mask])
            results[name] = {
                "mse": float(torch.nn.functional.mse_loss(pred, target)),
                "mare": mare(backbone.unnormalize_action(pred), raw_target),
            }
        if "predictor" in models and models["predictor"] is not None:  # first-call mode
            pred = models["predictor"](val.cond[mask], None)
            results["predictor_no_history"] = {
                "mse": float(torch.nn.functional.mse_loss(pred, target)),
                "mare": mare(backbone.unnormalize_action(pred), raw_target),
            }
    results["pairs"] = int(mask.sum())
    return results


def train_predictor(cfg: TrainPredictorConfig) -> dict:
    if not 0 <= cfg.val_fraction < 1:  # the other fields were checked when cfg was made (__post_init__)
        raise ValueError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}.")
    with folder_lock(cfg.out or Path(cfg.policy) / "predictor", "train-predictor"):
        return _train_predictor(cfg)


def _train_predictor(cfg: TrainPredictorConfig) -> dict:
    torch.set_num_threads(resolve_threads(cfg.threads))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone, policy_config = load_policy(cfg.policy)
    out = Path(cfg.out) if cfg.out else Path(cfg.policy) / "predictor"
    data = load_frames(cfg.dataset, use_images=bool(backbone.features.cameras),
                       use_env_state=bool(backbone.features.env_state_dim), progress=cfg.progress)
    if dataclasses.asdict(data.features()) != dataclasses.asdict(backbone.features):
        raise ValueError(f"Dataset features {dataclasses.asdict(data.features())} do not match the policy's "
                         f"{dataclasses.asdict(backbone.features)}.")
    pc = backbone.cfg
    drop = padded_tail(pc)
    episodes = list(range(data.num_episodes))
    n_val = max(1, round(len(episodes) * cfg.val_fraction)) if len(episodes) > 1 and cfg.val_fraction > 0 else 0
    val_eps = set(episodes[len(episodes) - n_val :])
    train_eps = set(episodes) - val_eps
    backbone.to(device)  # the pairs' conditions (the image encoder's work) are computed there
    train = build_predictor_pairs(backbone, data, sample_indices(data, drop, train_eps), cfg)
    val = build_predictor_pairs(backbone, data, sample_indices(data, drop, val_eps or train_eps), cfg)
    backbone.to("cpu")

    base = PredictorConfig.for_policy(pc, backbone.features.action_dim, train.cond.shape[1],
                                      prev_dropout=cfg.prev_dropout, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                      ff_dim=cfg.ff_dim, n_encoder_layers=cfg.n_encoder_layers,
                                      n_cross_blocks=cfg.n_cross_blocks)
    model = Predictor(base).to(device)
    t0 = time.time()
    _fit_predictor(model, train, cfg, "train-predictor")
    model.to("cpu")
    params = sum(p.numel() for p in model.parameters())
    # training seconds and threads: the cost table (agents/cost.py) puts them beside the distilled peers'
    extra = {"policy_checkpoint": str(Path(cfg.policy).resolve()), "parameters": params,
             "train_config": dataclasses.asdict(cfg), "train_seconds": round(time.time() - t0, 1),
             "train_threads": torch.get_num_threads(), "train_device": device.type}
    # Save before the (long) ablation so that stopping it never loses the predictor itself.
    save_predictor(out, model, backbone, extra=extra)
    models: dict[str, Predictor | None] = {"predictor": model, "temporal_only": None}
    if cfg.ablation:
        spatial = Predictor(dataclasses.replace(base, use_prev=False, prev_dropout=0.0)).to(device)
        _fit_predictor(spatial, train, cfg, "spatial-only ablation")
        spatial.to("cpu")
        models["spatial_only"] = spatial
    metrics = evaluate_predictors(backbone, val, models)
    metrics["validation_episodes"] = sorted(val_eps) if val_eps else "none (train episodes reused)"
    save_predictor(out, model, backbone, extra={**extra, "metrics": metrics})
    return {"out": str(out), "parameters": params, "metrics": metrics}

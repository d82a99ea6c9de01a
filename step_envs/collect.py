"""Demonstrations from scripted experts: parallel, resumable, kept only when good.

Each seed is one episode. A worker writes the finished episode to ``OUT/raw/seed_<s>.npz`` (or a
``seed_<s>.json`` record for a rejected one) with an atomic rename, so a kill loses at most the
episodes in flight; a rerun skips every seed already on disk and, because the expert and the env are
deterministic per seed, redoes the lost ones exactly. No episode is lost or written twice.

Which episodes make the dataset is defined by seed order alone, whatever the worker scheduling: the first
N seeds (from ``--seed-start``) whose best reward reaches ``--min-max-reward``. Seeds that finish after the
N-th good one stay in ``raw/`` for a later, larger run and are never in this dataset (nor in its statistics,
which cover the seeds up to the N-th good one). Keep/reject is decided from each seed's cached best reward
under the threshold of the current run, never from an older run's decision: a stricter threshold drops
episodes, a looser one reruns the seeds whose frames were not kept.

``OUT/lerobot`` is rebuilt from ``raw/`` in a hidden sibling and swapped in only once it reads back whole
(``replace_dataset``); one collect at a time per folder (``folder_lock``), and a folder made for another
task, agent or observation type is refused before anything in it changes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from agents.config_files import option, validate_fields
from step_envs.contract import OBS_TYPES
from step_envs.dataset import LEROBOT_SUBDIR, frame_from_obs, lerobot_features, replace_dataset
from step_envs.registry import get_task
from step_envs.safe_io import atomic_write, folder_lock
from step_envs.seeds import DEMO_SEEDS, check_demo_seeds


@dataclass(kw_only=True)
class CollectConfig:
    task: str = "pusht"
    agent: str = option("expert", help="any make_agent spec: expert (default) or random (quick test data)")
    episodes: int = option(200, min=1, help="good episodes to keep")
    out: str = option(help="output folder (raw/ episode cache + lerobot/ dataset)")
    # store state and images: one dataset serves both policies
    obs_type: str = option("pixels_state", choices=OBS_TYPES)
    workers: int = option(2, min=1)
    seed_start: int = DEMO_SEEDS.start  # never an evaluation seed: see step_envs/seeds.py
    max_seeds: int = option(5_000, min=1, help="give up after this many attempts")
    # Push-T's reward is coverage / 0.95 clipped to 1 (gym-pusht), so 0.9 keeps episodes whose best coverage
    # reaches 0.855; the RoboMimic and SO-101 rewards are 0/1 (success).
    min_max_reward: float = option(0.9, help="keep an episode whose best reward reaches this (Push-T: coverage 0.855)")
    # DART-style demonstrations (ExecutionNoise): the env executes the expert's action plus correlated noise, the
    # dataset keeps the clean action, so the demonstrations show corrections from states a noiseless expert never
    # visits (a policy's few-millimetre errors lead it there).
    action_noise: float = option(0.0, min=0.0, help="std of the noise added to each executed action, in the action's "
                                                    "own units (m for a position goal); the dataset keeps the clean action")
    action_noise_corr: float = option(0.9, min=0.0, help="per-step correlation of that noise (AR(1), below 1)")

    def __post_init__(self):
        validate_fields(self)
        if self.action_noise_corr >= 1.0:
            raise ValueError(f"action_noise_corr must be below 1, got {self.action_noise_corr}")


class ExecutionNoise(gym.ActionWrapper):
    """Executes ``action + noise``: AR(1) Gaussian noise with stationary std ``sigma`` (the action's units) and
    per-step correlation ``rho``, clipped to the action space. Seeded per episode seed, so a rerun of a seed
    executes the same noise. Whoever records the action passed to ``step`` records the clean one."""

    def __init__(self, env: gym.Env, sigma: float, rho: float, seed: int):
        super().__init__(env)
        self.sigma, self.rho = sigma, rho
        self.rng = np.random.default_rng([seed, 0x0DA27])  # not the env's or the expert's stream
        self.noise = np.zeros(self.action_space.shape)

    def reset(self, **kwargs):
        self.noise = self.rng.normal(0.0, self.sigma, self.action_space.shape)  # stationary from the first step
        return self.env.reset(**kwargs)

    def action(self, action):
        fresh = self.rng.normal(0.0, self.sigma, self.action_space.shape)
        self.noise = self.rho * self.noise + np.sqrt(1.0 - self.rho**2) * fresh
        noisy = np.clip(np.asarray(action) + self.noise, self.action_space.low, self.action_space.high)
        return noisy.astype(self.action_space.dtype)


def _raw_dir(out: str | Path) -> Path:
    return Path(out) / "raw"


def run_expert_episode(task: str, obs_type: str, seed: int, agent: str = "expert", action_noise: float = 0.0,
                       action_noise_corr: float = 0.9) -> dict:
    """One episode of a scripted agent; returns per-frame arrays (LeRobot keys) and its summary. With
    ``action_noise`` the env executes noisy actions (ExecutionNoise) and the frames hold the agent's clean ones."""
    from agents.factory import make_agent
    from step_envs.registry import make_env
    from step_envs.rollout import rollout

    env = make_env(task, obs_type=obs_type)
    if action_noise > 0:
        env = ExecutionNoise(env, action_noise, action_noise_corr, seed)
    expert = make_agent(agent, env, task=task, seed=seed)
    frames = []
    t0 = time.perf_counter()
    try:
        (result,) = rollout(env, expert, [seed], progress=False,
                            step_hook=lambda obs, action: frames.append(frame_from_obs(obs, action)))
    finally:
        env.close()
    episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
    summary = {
        "seed": seed,
        "success": result.success,
        "max_reward": result.max_reward,
        "length": result.length,
        "seconds": time.perf_counter() - t0,
    }
    return {"episode": episode, "summary": summary}


def _work(args) -> dict:
    cfg, seed = args
    result = run_expert_episode(cfg.task, cfg.obs_type, seed, cfg.agent, cfg.action_noise, cfg.action_noise_corr)
    summary = result["summary"]
    # The frames are stored only for an episode this run keeps; "kept" and "min_max_reward" in the files record
    # that run's decision, but readers decide again from max_reward under their own threshold (keep()).
    summary["kept"] = summary["max_reward"] >= cfg.min_max_reward
    summary["min_max_reward"] = cfg.min_max_reward
    raw = _raw_dir(cfg.out)
    if summary["kept"]:
        def write_npz(path: Path) -> None:
            with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez_compressed(f, summary=json.dumps(summary), **result["episode"])

        atomic_write(raw / f"seed_{seed:07d}.npz", write_npz)
        (raw / f"seed_{seed:07d}.json").unlink(missing_ok=True)  # rejected under an older, stricter threshold
    else:
        atomic_write(raw / f"seed_{seed:07d}.json", lambda p: p.write_text(json.dumps(summary)))
    summary["has_frames"] = summary["kept"]
    return summary


def _remove_partial_writes(raw: Path) -> None:
    for stale in raw.glob("*.tmp*"):
        stale.unlink(missing_ok=True)


def _damaged(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete it and rerun `step collect`, "
                      f"which runs that seed again.")


def read_summaries(out: str | Path) -> dict[int, dict]:
    """Every finished seed's summary; ``has_frames`` says whether its episode is cached (``.npz``) or not."""
    summaries = {}
    for path in sorted(_raw_dir(out).glob("seed_*")):  # seed_<s>.json sorts before seed_<s>.npz: frames win
        if ".tmp" in path.name:
            continue
        try:
            if path.suffix == ".npz":
                with np.load(path) as data:
                    summary = json.loads(str(data["summary"]))
            else:
                summary = json.loads(path.read_text())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise _damaged(path, err) from None
        summary["has_frames"] = path.suffix == ".npz"
        summaries[summary["seed"]] = summary
    return summaries


def keep(summary: dict, min_max_reward: float) -> bool | None:
    """Keep (True) or reject (False) an episode under this threshold; None when it passes but its frames were
    not stored (rejected by a run with a stricter threshold), so the seed must be run again."""
    passes = summary["max_reward"] >= min_max_reward
    if passes and not summary.get("has_frames", True):
        return None
    return passes


def dataset_seeds(decisions: dict[int, bool], cfg: CollectConfig) -> tuple[list[int], list[int]]:
    """(the dataset's seeds, the seeds tried up to its last one): the first ``cfg.episodes`` kept seeds from
    ``cfg.seed_start`` on, stopping at the first undecided seed, so the answer never depends on which later
    seeds happened to finish first."""
    kept, tried = [], []
    for seed in range(cfg.seed_start, cfg.seed_start + cfg.max_seeds):
        if len(kept) == cfg.episodes or seed not in decisions:
            break
        tried.append(seed)
        if decisions[seed]:
            kept.append(seed)
    return kept, tried


def _check_folder(cfg: CollectConfig) -> None:
    """Refuse an --out that holds another task's, agent's or observation type's data, before touching it."""
    out = Path(cfg.out)
    config_path = out / "collect_config.json"
    if config_path.exists():
        try:
            old = json.loads(config_path.read_text())
        except ValueError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); fix or remove it.") from None
        for field in ("task", "agent", "obs_type", "action_noise", "action_noise_corr"):
            if old.get(field, getattr(CollectConfig, field)) != getattr(cfg, field):
                raise ValueError(
                    f"{out} holds {old.get('task')!r} episodes (agent {old.get('agent')!r}, obs_type "
                    f"{old.get('obs_type')!r}, action_noise {old.get('action_noise', 0.0)!r}); this run asks for "
                    f"{field} {getattr(cfg, field)!r}. "
                    f"Choose another --out.")
    elif (out / LEROBOT_SUBDIR).exists() or (out / "raw").exists():
        raise ValueError(f"{out} holds data that `step collect` did not make (no collect_config.json); "
                         f"choose another --out.")


def collect(cfg: CollectConfig, progress: bool = True) -> dict:
    get_task(cfg.task)  # fail fast on an unknown task (the numbers were checked when cfg was made)
    check_demo_seeds(cfg.seed_start, cfg.max_seeds)  # before anything is written
    with folder_lock(cfg.out, "collect"):
        _check_folder(cfg)
        return _collect(cfg, progress)


def _collect(cfg: CollectConfig, progress: bool) -> dict:
    raw = _raw_dir(cfg.out)
    raw.mkdir(parents=True, exist_ok=True)
    _remove_partial_writes(raw)  # of a killed run
    config_path = Path(cfg.out) / "collect_config.json"
    write_config = lambda path: path.write_text(json.dumps(asdict(cfg), indent=2))  # noqa: E731
    if not config_path.exists():  # marks the folder as collect's from the first run on (see _check_folder)
        atomic_write(config_path, write_config)
    decisions = {seed: keep(s, cfg.min_max_reward) for seed, s in read_summaries(cfg.out).items()}
    decisions = {seed: d for seed, d in decisions.items() if d is not None}
    pending = [s for s in range(cfg.seed_start, cfg.seed_start + cfg.max_seeds) if s not in decisions]
    kept, _ = dataset_seeds(decisions, cfg)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.episodes, initial=len(kept), desc=f"collect {cfg.task}", unit="ep", disable=not progress)
    if len(kept) < cfg.episodes and pending:
        ctx = mp.get_context("spawn")  # fresh interpreters: no torch/pygame state shared across fork
        with ctx.Pool(cfg.workers) as pool:
            # imap (ordered): results arrive in seed order, so every seed before the current one is decided.
            for summary in pool.imap(_work, [(cfg, s) for s in pending]):
                decisions[summary["seed"]] = keep(summary, cfg.min_max_reward)
                kept, tried = dataset_seeds(decisions, cfg)
                bar.update(len(kept) - bar.n)
                bar.set_postfix(tried=len(tried))
                if len(kept) >= cfg.episodes:
                    pool.terminate()  # in-flight episodes are dropped; they were never renamed into place
                    break
        _remove_partial_writes(raw)
    bar.close()
    elapsed = time.perf_counter() - t0
    if len(kept) < cfg.episodes:
        raise RuntimeError(f"Only {len(kept)} episodes reach --min-max-reward {cfg.min_max_reward} in "
                           f"{cfg.max_seeds} seeds; raise --max-seeds or lower --min-max-reward.")
    report = build_dataset(cfg, progress=progress)
    atomic_write(config_path, write_config)  # the settings of the dataset now in lerobot/
    report["collect_wall_seconds_this_run"] = elapsed
    atomic_write(Path(cfg.out) / "collect_report.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    return report


def build_dataset(cfg: CollectConfig, progress: bool = True) -> dict:
    """Write the first ``cfg.episodes`` good episodes (seed order) as a LeRobotDataset; report stats."""
    from step_envs.registry import make_env

    spec = get_task(cfg.task)
    summaries = read_summaries(cfg.out)
    decisions = {seed: keep(s, cfg.min_max_reward) for seed, s in summaries.items()}
    kept_seeds, tried_seeds = dataset_seeds({s: d for s, d in decisions.items() if d is not None}, cfg)
    if len(kept_seeds) < cfg.episodes:
        raise RuntimeError(f"{cfg.out}/raw holds {len(kept_seeds)} of the {cfg.episodes} episodes wanted; "
                           f"run `step collect` to make the rest.")
    # Statistics over the contiguous run of seeds tried up to the last kept one, so the expert's success rate
    # is unbiased and does not depend on which later seeds finished before the run stopped.
    tried = [summaries[s] for s in tried_seeds]
    env = make_env(cfg.task, obs_type=cfg.obs_type)
    features = lerobot_features(env.observation_space, env.action_space)
    env.close()

    def episodes():
        for seed in kept_seeds:
            path = _raw_dir(cfg.out) / f"seed_{seed:07d}.npz"
            try:
                with np.load(path) as data:
                    episode = {key: data[key] for key in features}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
                raise _damaged(path, err) from None
            yield episode

    root = Path(cfg.out) / LEROBOT_SUBDIR
    # Always rebuilt from raw/, the source of truth, beside the old one; swapped in only once it reads back whole.
    replace_dataset(root, spec.fps, features, episodes(), task_text=f"{cfg.task} {cfg.agent}", progress=progress,
                    expected_episodes=len(kept_seeds))
    cpu_seconds = sum(s["seconds"] for s in tried)
    return {
        "task": cfg.task,
        "episodes_in_dataset": len(kept_seeds),
        "seeds_tried": len(tried),
        "expert_success_rate": float(np.mean([s["success"] for s in tried])),
        "expert_mean_max_reward": float(np.mean([s["max_reward"] for s in tried])),
        "kept_fraction": len(kept_seeds) / len(tried),
        "min_max_reward": cfg.min_max_reward,
        "expert_cpu_seconds": cpu_seconds,
        "good_episodes_per_cpu_hour": 3600.0 * len(kept_seeds) / max(cpu_seconds, 1e-9),
        "frames": int(sum(summaries[s]["length"] for s in kept_seeds)),
        "dataset_root": str(root),
    }

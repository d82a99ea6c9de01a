"""Demonstrations from scripted experts: parallel, resumable, kept only when good.

Each seed is one episode. A worker writes the finished episode to ``OUT/raw/seed_<s>.npz`` (or a
``seed_<s>.json`` record for a rejected one) with an atomic rename, so a kill loses at most the
episodes in flight; a rerun skips every seed already on disk and, because the expert and the env are
deterministic per seed, redoes the lost ones exactly. No episode is lost or written twice. When
enough good episodes exist, the first N (in seed order) are written as a LeRobotDataset to
``OUT/lerobot``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from step_envs.dataset import LEROBOT_SUBDIR, frame_from_obs, lerobot_features, write_dataset
from step_envs.registry import get_task
from step_envs.seeds import DEMO_SEEDS, check_demo_seeds


@dataclass
class CollectConfig:
    task: str = "pusht"
    agent: str = "expert"  # any make_agent spec; "random" makes quick test data
    episodes: int = 200  # good episodes wanted
    out: str = "data/pusht"
    obs_type: str = "pixels_state"  # store state and images: one dataset serves both policies
    workers: int = 2
    seed_start: int = DEMO_SEEDS.start  # never an evaluation seed: see step_envs/seeds.py
    max_seeds: int = 5_000  # give up after this many attempts
    min_max_reward: float = 0.9  # keep an episode whose best reward reaches this (Push-T: coverage/0.95)


def _raw_dir(out: str | Path) -> Path:
    return Path(out) / "raw"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def run_expert_episode(task: str, obs_type: str, seed: int, agent: str = "expert") -> dict:
    """One episode of a scripted agent; returns per-frame arrays (LeRobot keys) and its summary."""
    from agents.factory import make_agent
    from step_envs.registry import make_env

    env = make_env(task, obs_type=obs_type)
    expert = make_agent(agent, env, task=task, seed=seed)
    obs, info = env.reset(seed=seed)
    expert.reset()
    frames, rewards, success = [], [], False
    t0 = time.perf_counter()
    while True:
        action = expert.act(obs)
        frames.append(frame_from_obs(obs, action))
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        success |= bool(info["is_success"])
        if terminated or truncated:
            break
    env.close()
    episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
    summary = {
        "seed": seed,
        "success": success,
        "max_reward": float(max(rewards)),
        "length": len(frames),
        "seconds": time.perf_counter() - t0,
    }
    return {"episode": episode, "summary": summary}


def _work(args) -> dict:
    cfg, seed = args
    result = run_expert_episode(cfg.task, cfg.obs_type, seed, cfg.agent)
    summary = result["summary"]
    summary["kept"] = summary["max_reward"] >= cfg.min_max_reward
    raw = _raw_dir(cfg.out)
    if summary["kept"]:
        def write_npz(path: Path) -> None:
            with open(path, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez_compressed(f, summary=json.dumps(summary), **result["episode"])

        _atomic_write(raw / f"seed_{seed:07d}.npz", write_npz)
    else:
        _atomic_write(raw / f"seed_{seed:07d}.json", lambda p: p.write_text(json.dumps(summary)))
    return summary


def _remove_partial_writes(raw: Path) -> None:
    for stale in raw.glob("*.tmp*"):
        stale.unlink(missing_ok=True)


def read_summaries(out: str | Path) -> dict[int, dict]:
    """Every finished seed's summary, kept or rejected."""
    summaries = {}
    for path in sorted(_raw_dir(out).glob("seed_*")):
        if ".tmp" in path.name:
            continue
        if path.suffix == ".npz":
            with np.load(path) as data:
                summary = json.loads(str(data["summary"]))
        else:
            summary = json.loads(path.read_text())
        summaries[summary["seed"]] = summary
    return summaries


def collect(cfg: CollectConfig, progress: bool = True) -> dict:
    get_task(cfg.task)  # fail fast on an unknown task
    check_demo_seeds(cfg.seed_start, cfg.max_seeds)  # before anything is written
    raw = _raw_dir(cfg.out)
    raw.mkdir(parents=True, exist_ok=True)
    _remove_partial_writes(raw)  # of a killed run
    (Path(cfg.out) / "collect_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    done = read_summaries(cfg.out)
    kept = sum(s["kept"] for s in done.values())
    pending = [s for s in range(cfg.seed_start, cfg.seed_start + cfg.max_seeds) if s not in done]
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.episodes, initial=min(kept, cfg.episodes), desc=f"collect {cfg.task}", unit="ep",
               disable=not progress)
    if kept < cfg.episodes:
        ctx = mp.get_context("spawn")  # fresh interpreters: no torch/pygame state shared across fork
        with ctx.Pool(cfg.workers) as pool:
            # imap (ordered): results arrive in seed order, so the run stops after the same seeds whatever
            # the timing, and the dataset (first N good seeds) is the same on every machine.
            for summary in pool.imap(_work, [(cfg, s) for s in pending]):
                done[summary["seed"]] = summary
                kept += summary["kept"]
                bar.update(int(summary["kept"]))
                tried = len(done)
                bar.set_postfix(tried=tried, success=f"{np.mean([d['success'] for d in done.values()]):.2f}")
                if kept >= cfg.episodes:
                    pool.terminate()  # in-flight episodes are dropped; they were never renamed into place
                    break
        _remove_partial_writes(raw)
    bar.close()
    elapsed = time.perf_counter() - t0
    if kept < cfg.episodes:
        raise RuntimeError(f"Only {kept} good episodes after {cfg.max_seeds} seeds; raise --max-seeds.")
    report = build_dataset(cfg)
    report["collect_wall_seconds_this_run"] = elapsed
    (Path(cfg.out) / "collect_report.json").write_text(json.dumps(report, indent=2))
    return report


def build_dataset(cfg: CollectConfig, progress: bool = True) -> dict:
    """Write the first ``cfg.episodes`` good episodes (seed order) as a LeRobotDataset; report stats."""
    from step_envs.registry import make_env

    spec = get_task(cfg.task)
    summaries = read_summaries(cfg.out)
    # Statistics over the contiguous run of seeds tried, so the expert's success rate is unbiased.
    tried = [summaries[s] for s in sorted(summaries)]
    kept_seeds = [s["seed"] for s in tried if s["kept"]][: cfg.episodes]
    env = make_env(cfg.task, obs_type=cfg.obs_type)
    features = lerobot_features(env.observation_space, env.action_space)
    env.close()

    def episodes():
        for seed in kept_seeds:
            with np.load(_raw_dir(cfg.out) / f"seed_{seed:07d}.npz") as data:
                yield {key: data[key] for key in features}

    root = Path(cfg.out) / LEROBOT_SUBDIR
    if root.exists():
        import shutil

        shutil.rmtree(root)  # always rebuilt from raw/, the source of truth
    write_dataset(root, spec.fps, features, episodes(), task_text=f"{cfg.task} {cfg.agent}", progress=progress)
    cpu_seconds = sum(s["seconds"] for s in tried)
    return {
        "task": cfg.task,
        "episodes_in_dataset": len(kept_seeds),
        "seeds_tried": len(tried),
        "expert_success_rate": float(np.mean([s["success"] for s in tried])),
        "expert_mean_max_reward": float(np.mean([s["max_reward"] for s in tried])),
        "kept_fraction": float(np.mean([s["kept"] for s in tried])),
        "expert_cpu_seconds": cpu_seconds,
        "good_episodes_per_cpu_hour": 3600.0 * sum(s["kept"] for s in tried) / max(cpu_seconds, 1e-9),
        "frames": int(sum(summaries[s]["length"] for s in kept_seeds)),
        "dataset_root": str(root),
    }

"""Shared fixtures for the policy-side tests: a tiny Push-T state dataset and a tiny trained checkpoint."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread in every test: the tiny test models gain nothing from a second one, and on a loaded machine
    OpenMP threads spin-wait, which doubled the CPU time of the heaviest tests. Set before each test because a run
    with ``threads=0`` (every core) leaves torch at that count; commands that pick their own count still do."""
    import torch

    torch.set_num_threads(1)


def scripted_episodes(num_episodes: int = 4, steps: int = 40, seed: int = 0):
    """Smooth demonstrations: the pusher moves toward the T block's centre with a slow circular offset."""
    import step_envs  # noqa: F401  (registers the ids)
    from step_envs.dataset import frame_from_obs
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="state")
    episodes = []
    for e in range(num_episodes):
        obs, _ = env.reset(seed=seed + e)
        frames = []
        phase = e * 0.7
        for t in range(steps):
            centre = obs["environment_state"].reshape(8, 2).mean(0)
            target = centre + 60 * np.array([np.cos(phase + 0.1 * t), np.sin(phase + 0.1 * t)])
            pos = obs["agent_pos"]
            action = np.clip(pos + np.clip(target - pos, -25, 25), 0, 512).astype(np.float32)
            frames.append(frame_from_obs(obs, action))
            obs, *_ = env.step(action)
        episodes.append({key: np.stack([f[key] for f in frames]) for key in frames[0]})
    features_env = env
    return episodes, features_env


@pytest.fixture(scope="module")
def env():
    """One Push-T state env shared by a module's tests (each test resets it with its own seed); a module may
    define its own ``env`` (test_diffusion_agents.py: a fresh one per test)."""
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="state")
    yield env
    env.close()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from step_envs.dataset import lerobot_features, write_dataset

    episodes, env = scripted_episodes()
    root = tmp_path_factory.mktemp("data") / "pusht_tiny"
    features = lerobot_features(env.observation_space, env.action_space, use_videos=False)
    write_dataset(root, fps=10, features=features, episodes=episodes, task_text="push the T", progress=False)
    env.close()
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    """A tiny backbone trained for a few steps plus its predictor in <ckpt>/predictor."""
    from agents.training import TrainPolicyConfig, TrainPredictorConfig, train_policy, train_predictor

    out = tmp_path_factory.mktemp("ckpt") / "policy"
    train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=6, batch_size=8,
                                   warmup_steps=2, log_every=2, save_every=3, eval_every=0, progress=False))
    train_predictor(TrainPredictorConfig(policy=str(out), dataset=str(tiny_dataset), steps=5, batch_size=16,
                                         warmup_steps=1, ablation=False, progress=False))
    return out

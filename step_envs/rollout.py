"""The one evaluation loop and video recorder, for simulators and the real arm alike.

It needs nothing but the Gymnasium API (``reset(seed=...)``, ``step``, ``render``,
``info["is_success"]``) and an agent with ``reset()`` / ``act(obs)``. A gymnasium VectorEnv is run in
waves of ``num_envs`` seeds, with one ``act`` call for the whole batch per step.

Every episode loop of the project is this one: evaluation (``step eval``, ``step bench``), demonstration
collection (``step collect``) and recording on the SO-101 (``step record``); the latter two see each step
through ``step_hook(obs, action)`` (called before ``env.step(action)``, with the observation the action was
chosen from), which is where they turn steps into dataset frames.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:  # the contract lives with the agents; step_envs needs it for type hints only
    from agents.protocol import Agent


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    max_reward: float
    length: int
    agent_seconds: float  # time spent inside agent.act for this episode (shared evenly in a batch)
    video: str | None = None


def write_video(path: str | Path, frames: list[np.ndarray], fps: int) -> str:
    """Write RGB frames to an H.264 mp4 playable in browsers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, frames, fps=fps, codec="libx264", macro_block_size=16, pixelformat="yuv420p")
    return str(path)


def _env_fps(env) -> int:
    return int(env.metadata.get("render_fps", 10))


def rollout(
    env,
    agent: Agent,
    seeds: Sequence[int],
    video_dir: str | Path | None = None,
    num_videos: int = 0,
    progress: bool = True,
    max_steps: int | None = None,
    step_hook: Callable[[dict, np.ndarray], None] | None = None,
) -> list[EpisodeResult]:
    """Run one seeded episode per seed and return per-episode results (in seed order).

    Videos of the first ``num_videos`` episodes go to ``video_dir/episode_<seed>.mp4``.
    ``max_steps`` caps an episode in addition to the env's own TimeLimit (useful for hardware dry runs).
    ``step_hook(obs, action)``: called at every step before the env steps (batched arrays for a VectorEnv).
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError("Seeds must be distinct: each seed names one episode.")
    if num_videos and video_dir is None:
        raise ValueError("num_videos > 0 needs a video_dir.")
    is_vector = isinstance(env, gym.vector.VectorEnv)
    width = env.num_envs if is_vector else 1
    results: list[EpisodeResult] = []
    bar = tqdm(total=len(seeds), desc="episodes", unit="ep", disable=not progress)
    for start in range(0, len(seeds), width):
        wave = seeds[start : start + width]
        record = [start + i < num_videos for i in range(len(wave))]
        # A wave of many envs can take minutes: show its env step so the bar is never frozen.
        on_step = (lambda step: bar.set_postfix_str(f"wave step {step}", refresh=True)) if progress else None
        results.extend(_run_wave(env, agent, wave, is_vector, record, video_dir, max_steps, on_step, step_hook))
        bar.update(len(wave))
        bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    bar.close()
    return results


def _run_wave(env, agent, wave, is_vector, record, video_dir, max_steps, on_step=None, step_hook=None):
    n = len(wave)
    if is_vector:
        if n < env.num_envs:  # last wave: pad with extra seeds whose results are dropped
            wave_seeds = wave + [wave[-1] + 1_000_003 + i for i in range(env.num_envs - n)]
        else:
            wave_seeds = wave
        obs, info = env.reset(seed=wave_seeds)
    else:
        obs, info = env.reset(seed=wave[0])
    agent.reset()
    width = env.num_envs if is_vector else 1
    active = np.ones(width, dtype=bool)
    active[n:] = False
    success = np.zeros(width, dtype=bool)
    max_reward = np.full(width, -np.inf)
    length = np.zeros(width, dtype=int)
    agent_time = 0.0
    frames: list[list[np.ndarray]] = [[] for _ in range(width)]

    def grab_frames():
        if not any(record):
            return
        images = env.render()
        images = list(images) if is_vector else [images]
        for i in range(n):
            if record[i] and active[i]:
                frames[i].append(np.asarray(images[i]))

    grab_frames()
    step = 0
    while active.any():
        t0 = time.perf_counter()
        action = agent.act(obs)
        agent_time += time.perf_counter() - t0
        if step_hook is not None:
            step_hook(obs, action)
        if isinstance(env, gym.vector.SyncVectorEnv):
            obs, reward, terminated, truncated, info = _step_active(env, action, active, obs)
        else:
            obs, reward, terminated, truncated, info = env.step(action)
        step += 1
        if on_step is not None and step % 10 == 0:
            on_step(step)
        reward = np.atleast_1d(np.asarray(reward, dtype=float))
        ended = np.atleast_1d(np.asarray(terminated) | np.asarray(truncated))
        is_success = np.atleast_1d(np.asarray(info.get("is_success", False), dtype=bool))
        if is_vector and "_is_success" in info:  # vector infos mask entries that were not set
            is_success = is_success & np.asarray(info["_is_success"], dtype=bool)
        success |= active & is_success
        max_reward = np.where(active, np.maximum(max_reward, reward), max_reward)
        length += active
        if max_steps is not None and step >= max_steps:
            ended = np.ones(width, dtype=bool)
        # Render before marking envs done so the final frame of each episode is kept; a vector env
        # auto-resets on the *next* step, so this frame still shows the episode's end.
        grab_frames()
        active &= ~ended

    share = agent_time / max(n, 1)
    out = []
    for i, seed in enumerate(wave):
        video = None
        if record[i] and frames[i]:
            video = write_video(Path(video_dir) / f"episode_{seed}.mp4", frames[i], fps=_env_fps(env))
        out.append(EpisodeResult(seed, bool(success[i]), float(max_reward[i]), int(length[i]), share, video))
    return out


def _step_active(env, action, active, last_obs):
    """Step only the sub-envs of a SyncVectorEnv that are still in their episode.

    The vector env's own ``step`` would auto-reset finished envs and keep simulating them until the
    slowest episode of the wave ends: with robosuite that is most of a bench's time. Finished rows keep
    their last observation (the agent's rows are independent, so they do not affect the others).
    """
    width = env.num_envs
    reward = np.zeros(width)
    terminated = np.zeros(width, dtype=bool)
    truncated = np.zeros(width, dtype=bool)
    is_success = np.zeros(width, dtype=bool)
    obs = _copy_obs(last_obs)
    for i in np.flatnonzero(active):
        sub_obs, r, term, trunc, sub_info = env.envs[i].step(action[i])
        _set_row(obs, i, sub_obs)
        reward[i], terminated[i], truncated[i] = r, term, trunc
        is_success[i] = bool(sub_info.get("is_success", False))
    return obs, reward, terminated, truncated, {"is_success": is_success}


def _copy_obs(obs):
    """A copy of a batched observation; image observations nest a dict of cameras (``obs["pixels"]["top"]``)."""
    if isinstance(obs, dict):
        return {key: _copy_obs(value) for key, value in obs.items()}
    return np.array(obs, copy=True)


def _set_row(batched, i: int, sub_obs) -> None:
    """Write one sub-env's observation into row ``i`` of the batched (possibly nested) observation."""
    for key, value in sub_obs.items():
        if isinstance(value, dict):
            _set_row(batched[key], i, value)
        else:
            batched[key][i] = value


def summarize(results: list[EpisodeResult]) -> dict:
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r.success for r in results])) if results else 0.0,
        "mean_max_reward": float(np.mean([r.max_reward for r in results])) if results else 0.0,
        "mean_length": float(np.mean([r.length for r in results])) if results else 0.0,
        "per_episode": [asdict(r) for r in results],
    }

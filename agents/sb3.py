"""stable-baselines3's policy API on our agents: ``predict(observation, state, episode_start, deterministic)``.

SB3's tools (``evaluate_policy``, ``VecVideoRecorder``, its callbacks) call ``model.predict(obs, state=...,
episode_start=..., deterministic=...)`` on a VecEnv batch and expect ``(actions, state)``. ``PredictMixin``
maps that onto ``reset()`` / ``act(obs)``:

* the observation is the VecEnv's dict of arrays with a leading ``n_envs`` dimension. An agent built for a
  single env (``make_agent(spec, env)``) takes ``n_envs == 1`` (or an observation without the batch dim); an
  agent built on a VectorEnv of ``n`` envs takes ``n`` rows, one batched network call per replan;
* ``episode_start[i]`` (SB3: the row's previous step ended an episode and the VecEnv reset it) starts row
  i's episode: its observation history restarts and its generator is reseeded (``seed + i``), as
  ``reset()`` does. When only some rows restart, every row replans at this step (one chunk cache for the
  batch) and a STEP agent plans that chunk for every row in its first-call mode (no previous chunk); the
  restarted rows are then exactly what a fresh episode gives, the others replan a few steps early;
* ``deterministic`` is accepted and ignored: diffusion sampling is stochastic but seeded per row, so runs
  repeat exactly whatever its value; ``state`` is passed through (our agents keep their state inside).
"""

from __future__ import annotations

import numpy as np
import torch


class PredictMixin:
    """``predict()`` for agents with ``reset()`` / ``act(obs)`` and a ``batch_size`` (None for one env)."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        batch = getattr(self, "batch_size", None)
        rows = batch or 1
        obs, squeeze = _rows_view(observation, batch)
        starts = np.ones(rows, dtype=bool) if episode_start is None else np.asarray(episode_start, dtype=bool).reshape(-1)
        if starts.shape[0] != rows:
            raise ValueError(f"episode_start has {starts.shape[0]} entries for {rows} env(s).")
        if episode_start is None:
            starts[:] = getattr(self, "_sb3_started", False) is False
        self._sb3_started = True
        if starts.all():
            self.reset()
            action = self.act(obs)
        elif starts.any() and hasattr(self, "_restart_rows"):
            action = self._restart_rows(obs, starts)
        else:
            action = self.act(obs)
        action = np.asarray(action)
        return (action[None] if squeeze else action), state


def _rows_view(observation, batch: int | None):
    """(observation as ``act`` takes it, whether a batch dim of 1 was removed for a single-env agent)."""
    if batch is not None or not isinstance(observation, dict):
        return observation, False
    first = np.asarray(observation.get("agent_pos", next(iter(observation.values()))))
    if first.ndim >= 2 and first.shape[0] == 1:  # SB3's VecEnv of one env: drop its batch dim

        def strip(value):
            return {k: strip(v) for k, v in value.items()} if isinstance(value, dict) else np.asarray(value)[0]

        return strip(observation), True
    if first.ndim >= 2:
        raise ValueError(f"This agent was built for one env but got {first.shape[0]} rows; build it on the VecEnv "
                         f"(make_agent(spec, venv)) for a batch.")
    return observation, False


class DiffusionRowsMixin(PredictMixin):
    """Partial restarts for DiffusionAgent batches (see the module docstring)."""

    def _restart_rows(self, obs, starts: np.ndarray):
        current = self._obs_tensors(obs)
        self._push_history(current)
        steps = self.backbone.cfg.n_obs_steps
        mask = torch.from_numpy(starts)
        for key, value in current.items():
            self.history[key][mask] = value[mask].unsqueeze(1).repeat(1, steps, *([1] * (value.ndim - 1)))
        for row in np.flatnonzero(starts):
            self.generators[row] = torch.Generator().manual_seed(self.cfg.seed + int(row))
        if self.cfg.method == "step":
            self.prev_chunk = None
            self.stall.reset()
        self._replan()
        action = self.cache[:, self.cache_index]
        self.cache_index += 1
        return action.copy()

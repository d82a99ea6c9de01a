"""The observation/action contract every ``step/*`` env follows, and its input checks.

Observations are LeRobot-style dicts:
  ``agent_pos``          float32 proprioception,
  ``environment_state``  float32 object state (state variants),
  ``pixels``             dict camera name -> uint8 HxWx3 (image variants).
``obs_type`` picks ``state``, ``pixels`` or ``pixels_state``.
Every env also has ``hold_action()``: the action that keeps the robot where it is (used by tests and
by the safety guard when an agent misses its deadline).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

# The observation keys (LeRobot's gym conventions) and the variants that pick among them, defined here only.
AGENT_POS = "agent_pos"
ENVIRONMENT_STATE = "environment_state"
PIXELS = "pixels"
OBS_TYPES = ("state", "pixels", "pixels_state")


def check_obs_type(obs_type: str) -> str:
    if obs_type not in OBS_TYPES:
        raise ValueError(f"Unknown obs_type {obs_type!r}. Must be one of {', '.join(OBS_TYPES)}.")
    return obs_type


def wants_state(obs_type: str) -> bool:
    return obs_type in ("state", "pixels_state")


def wants_pixels(obs_type: str) -> bool:
    return obs_type in ("pixels", "pixels_state")


def build_observation_space(
    obs_type: str,
    agent_pos: spaces.Box,
    environment_state: spaces.Box | None,
    cameras: dict[str, tuple[int, int]],
) -> spaces.Dict:
    """Dict space of the contract; ``agent_pos`` is always present (images need proprioception too)."""
    check_obs_type(obs_type)
    entries: dict[str, spaces.Space] = {AGENT_POS: agent_pos}
    if wants_state(obs_type) and environment_state is not None:
        entries[ENVIRONMENT_STATE] = environment_state
    if wants_pixels(obs_type):
        entries[PIXELS] = spaces.Dict(
            {
                name: spaces.Box(0, 255, shape=(h, w, 3), dtype=np.uint8)
                for name, (h, w) in cameras.items()
            }
        )
    return spaces.Dict(entries)


def validate_action(action, space: spaces.Box, tolerance: float = 1e-3) -> np.ndarray:
    """Return the action as float32 or raise a clear ValueError (not numbers, wrong shape, NaN/inf, out of range).

    Only integer and real float arrays are actions: strings, bools, complex numbers and objects are refused
    rather than converted (``np.asarray(["100", "200"], float)`` would silently succeed).
    """
    raw = np.asarray(action)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"Action has dtype {raw.dtype} ({raw.tolist()!r}); this env expects real numbers "
                         f"(int or float) of shape {space.shape}.")
    arr = raw.astype(np.float64)
    if arr.shape != space.shape:
        raise ValueError(f"Action has shape {arr.shape}; this env expects {space.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"Action contains NaN or inf: {arr.tolist()}")
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    if np.any(arr < low - tolerance) or np.any(arr > high + tolerance):
        raise ValueError(
            f"Action {arr.tolist()} is outside the action space [{low.tolist()}, {high.tolist()}]."
        )
    return np.clip(arr, low, high).astype(np.float32)


def validate_observation(obs, space: spaces.Dict, batched: bool = False) -> None:
    """Raise a clear ValueError when an observation does not match the env's space (shape, NaN)."""
    if not isinstance(obs, dict):
        raise ValueError(f"Observation must be a dict with keys {list(space.spaces)}, got {type(obs).__name__}.")
    for key, sub in space.spaces.items():
        if key not in obs:
            raise ValueError(f"Observation is missing {key!r}; expected keys {list(space.spaces)}.")
        if isinstance(sub, spaces.Dict):
            validate_observation(obs[key], sub, batched)
            continue
        value = np.asarray(obs[key])
        shape = value.shape[1:] if batched else value.shape
        if shape != sub.shape:
            raise ValueError(f"Observation {key!r} has shape {shape}; expected {sub.shape}.")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError(f"Observation {key!r} contains NaN or inf.")

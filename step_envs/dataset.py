"""Demonstrations as LeRobotDataset v3, written and read fully offline.

Env observation keys map to LeRobot's names, so LeRobot's policies read our datasets directly:
  agent_pos -> observation.state, environment_state -> observation.environment_state,
  pixels[cam] -> observation.images.<cam>, action -> action.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Nothing may be fetched at run time: LeRobot must read local roots only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
IMAGE_PREFIX = "observation.images."
ACTION_KEY = "action"
LEROBOT_SUBDIR = "lerobot"  # inside a `step collect --out DIR` folder


def lerobot_features(obs_space, action_space, use_videos: bool = True) -> dict:
    """LeRobot feature spec for an env's Dict observation space and Box action space."""
    features = {
        STATE_KEY: {"dtype": "float32", "shape": obs_space["agent_pos"].shape, "names": None},
        ACTION_KEY: {"dtype": "float32", "shape": action_space.shape, "names": None},
    }
    if "environment_state" in obs_space.spaces:
        features[ENV_STATE_KEY] = {
            "dtype": "float32",
            "shape": obs_space["environment_state"].shape,
            "names": None,
        }
    if "pixels" in obs_space.spaces:
        for cam, space in obs_space["pixels"].spaces.items():
            features[IMAGE_PREFIX + cam] = {
                "dtype": "video" if use_videos else "image",
                "shape": space.shape,
                "names": ["height", "width", "channels"],
            }
    return features


def frame_from_obs(obs: dict, action: np.ndarray) -> dict:
    """One LeRobot frame (without 'task') from an env observation and the action taken after it."""
    frame = {STATE_KEY: np.asarray(obs["agent_pos"], dtype=np.float32), ACTION_KEY: np.asarray(action, np.float32)}
    if "environment_state" in obs:
        frame[ENV_STATE_KEY] = np.asarray(obs["environment_state"], dtype=np.float32)
    for cam, image in obs.get("pixels", {}).items():
        frame[IMAGE_PREFIX + cam] = np.asarray(image, dtype=np.uint8)
    return frame


def resolve_root(path: str | Path) -> Path:
    """Accept a LeRobot root or a `step collect` output folder (which holds one under `lerobot/`)."""
    path = Path(path)
    if (path / "meta" / "info.json").exists():
        return path
    if (path / LEROBOT_SUBDIR / "meta" / "info.json").exists():
        return path / LEROBOT_SUBDIR
    raise FileNotFoundError(f"No LeRobotDataset at {path} (expected meta/info.json or {LEROBOT_SUBDIR}/meta/info.json).")


def load_dataset(path: str | Path, **kwargs):
    """Open a local LeRobotDataset without touching the network."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = resolve_root(path)
    # pyav decodes LeRobot's AV1 videos everywhere; torchcodec needs system FFmpeg libraries.
    kwargs.setdefault("video_backend", "pyav")
    return LeRobotDataset(repo_id=f"local/{root.parent.name}", root=root, **kwargs)


def write_dataset(
    root: str | Path,
    fps: int,
    features: dict,
    episodes,
    task_text: str,
    robot_type: str | None = None,
    progress: bool = True,
):
    """Write episodes (each a dict of per-frame arrays keyed by LeRobot feature name) to a new root."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from tqdm.auto import tqdm

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists; remove it or choose another folder.")
    dataset = LeRobotDataset.create(
        repo_id=f"local/{root.parent.name}", fps=fps, features=features, root=root, robot_type=robot_type,
        use_videos=any(f["dtype"] == "video" for f in features.values()),
    )
    try:
        for episode in tqdm(episodes, desc="writing dataset", unit="ep", disable=not progress):
            length = len(episode[ACTION_KEY])
            for t in range(length):
                frame = {key: episode[key][t] for key in features}
                frame["task"] = task_text
                dataset.add_frame(frame)
            dataset.save_episode()
    finally:
        dataset.finalize()
    return dataset

"""Demonstrations as LeRobotDataset v3, written and read fully offline.

Env observation keys map to LeRobot's names, so LeRobot's policies read our datasets directly:
  agent_pos -> observation.state, environment_state -> observation.environment_state,
  pixels[cam] -> observation.images.<cam>, action -> action.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from step_envs.contract import AGENT_POS, ENVIRONMENT_STATE, PIXELS

# Nothing may be fetched at run time: LeRobot must read local roots only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# LeRobot dataset keys of the env observation keys (step_envs/contract.py)
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
IMAGE_PREFIX = "observation.images."
ACTION_KEY = "action"
LEROBOT_SUBDIR = "lerobot"  # inside a `step collect --out DIR` folder


def lerobot_features(obs_space, action_space, use_videos: bool = True) -> dict:
    """LeRobot feature spec for an env's Dict observation space and Box action space."""
    features = {
        STATE_KEY: {"dtype": "float32", "shape": obs_space[AGENT_POS].shape, "names": None},
        ACTION_KEY: {"dtype": "float32", "shape": action_space.shape, "names": None},
    }
    if ENVIRONMENT_STATE in obs_space.spaces:
        features[ENV_STATE_KEY] = {
            "dtype": "float32",
            "shape": obs_space[ENVIRONMENT_STATE].shape,
            "names": None,
        }
    if PIXELS in obs_space.spaces:
        for cam, space in obs_space[PIXELS].spaces.items():
            features[IMAGE_PREFIX + cam] = {
                "dtype": "video" if use_videos else "image",
                "shape": space.shape,
                "names": ["height", "width", "channels"],
            }
    return features


def frame_from_obs(obs: dict, action: np.ndarray) -> dict:
    """One LeRobot frame (without 'task') from an env observation and the action taken after it."""
    frame = {STATE_KEY: np.asarray(obs[AGENT_POS], dtype=np.float32), ACTION_KEY: np.asarray(action, np.float32)}
    if ENVIRONMENT_STATE in obs:
        frame[ENV_STATE_KEY] = np.asarray(obs[ENVIRONMENT_STATE], dtype=np.float32)
    for cam, image in obs.get(PIXELS, {}).items():
        frame[IMAGE_PREFIX + cam] = np.asarray(image, dtype=np.uint8)
    return frame


REBUILD_HINT = ("rebuild it with the command that wrote it (step collect, step import-robomimic --overwrite, "
                "step record)")


def resolve_root(path: str | Path) -> Path:
    """Accept a LeRobot root or a `step collect` output folder (which holds one under `lerobot/`)."""
    from step_envs.safe_io import interrupted_swap

    path = Path(path)
    if (path / "meta" / "info.json").exists():
        return path
    if (path / LEROBOT_SUBDIR / "meta" / "info.json").exists():
        return path / LEROBOT_SUBDIR
    old = interrupted_swap(path / LEROBOT_SUBDIR)
    if old is not None:
        raise FileNotFoundError(f"No LeRobotDataset at {path}: a replacement of {path / LEROBOT_SUBDIR} was killed "
                                f"half-way; the previous dataset is in {old}. Rerun the command that wrote it to "
                                f"restore or finish it.")
    raise FileNotFoundError(f"No LeRobotDataset at {path} (expected meta/info.json or {LEROBOT_SUBDIR}/meta/info.json).")


def check_complete(root: Path) -> None:
    """Refuse (ValueError) a LeRobotDataset folder whose writer stopped before finalising it."""
    info = root / "meta" / "info.json"
    try:
        features = json.loads(info.read_text()).get("features", {})
    except ValueError as err:
        raise ValueError(f"{info} is not valid JSON ({err}): {root} is damaged; {REBUILD_HINT}.") from None
    videos = [f"videos/{key}" for key, feature in features.items() if feature.get("dtype") == "video"]
    for part in ("meta/episodes", "data"):
        if not any((root / part).rglob("*.parquet")):
            raise ValueError(f"{root} is a half-written LeRobotDataset (no {part}/*.parquet: its writer was stopped "
                             f"before it finished); {REBUILD_HINT}.")
    for part in videos:
        if not any((root / part).rglob("*.mp4")):
            raise ValueError(f"{root} has lost its camera videos (no {part}/*.mp4); {REBUILD_HINT}.")


def load_dataset(path: str | Path, **kwargs):
    """Open a local LeRobotDataset without touching the network."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = resolve_root(path)
    check_complete(root)  # LeRobot would otherwise look for the missing parts on the hub (offline: a puzzling error)
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
        # Named, so LeRobot does not probe torchcodec (which prints a page of FFmpeg loading tracebacks here).
        video_backend="pyav",
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


def replace_dataset(root: str | Path, fps: int, features: dict, episodes, task_text: str,
                    robot_type: str | None = None, progress: bool = True, expected_episodes: int | None = None) -> dict:
    """``write_dataset`` into a hidden sibling of ``root``, check that it loads whole, then swap it in.

    A failure anywhere (a bad episode, a kill, a check) leaves ``root`` as it was: the old dataset, or none.
    Returns the new dataset's ``{"episodes", "frames"}``. The caller holds the output folder's lock.
    """
    from step_envs.safe_io import replacing_folder

    root = Path(root)
    with replacing_folder(root) as new:
        written = write_dataset(new, fps, features, episodes, task_text, robot_type=robot_type, progress=progress)
        check = load_dataset(new)
        counts = {"episodes": check.num_episodes, "frames": check.num_frames}
        if counts != {"episodes": written.meta.total_episodes, "frames": written.meta.total_frames} or (
                expected_episodes is not None and counts["episodes"] != expected_episodes):
            raise RuntimeError(f"The dataset written for {root} reads back as {counts}, not the "
                               f"{expected_episodes or written.meta.total_episodes} episodes written; "
                               f"{root} was left unchanged.")
    return counts

"""Import an original RoboMimic hdf5 dataset (ph / mh, low-dim or image) into our LeRobotDataset format.

RoboMimic's layout: ``data/demo_<i>/obs/<key>``, ``data/demo_<i>/actions`` (T, 7 per arm, already in the
OSC_POSE delta units of our envs), ``data/demo_<i>/states`` (flattened MuJoCo states), optional
``mask/<filter>`` (demo names, e.g. ``train``), and ``data.attrs["env_args"]`` (JSON with ``env_name``).

Keys map onto the RoboMimicEnv observation contract, so a policy trained on an imported dataset runs on
``step/<Task>-v0`` unchanged:
  robot<i>_eef_pos + robot<i>_eef_quat + robot<i>_gripper_qpos -> observation.state
  object                                                      -> observation.environment_state
  <camera>_image (stored upright by RoboMimic)                -> observation.images.<camera>
  actions                                                     -> action
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gymnasium import spaces

from agents.config_files import option, validate_fields
from step_envs.contract import OBS_TYPES, build_observation_space, check_obs_type, wants_pixels, wants_state
from step_envs.dataset import (
    ACTION_KEY,
    ENV_STATE_KEY,
    IMAGE_PREFIX,
    LEROBOT_SUBDIR,
    STATE_KEY,
    lerobot_features,
    replace_dataset,
)
from step_envs.registry import get_task
from step_envs.robomimic import ARM_ACTION_DIM, PROPRIO_KEYS, ROBOMIMIC_TASKS, TASK_BY_ROBOSUITE_ENV
from step_envs.safe_io import atomic_write, folder_lock


@dataclass
class RoboMimicImportConfig:
    hdf5: str = option(help="a RoboMimic dataset file (ph / mh, low_dim or image), e.g. lift/ph/low_dim_v141.hdf5")
    out: str = option(help="output folder; the LeRobotDataset goes to OUT/lerobot")
    obs_type: str = option("state", choices=OBS_TYPES, help="image variants need an image hdf5")
    filter_key: str | None = option(None, help="import only the demos in mask/<key>, e.g. train")
    max_episodes: int | None = option(None, min=1, help="the first N demos only (in demo order)")
    use_videos: bool = option(True, flag="--no-videos", help="store images as image files, not videos")
    overwrite: bool = option(False, help="replace an existing OUT/lerobot")

    def __post_init__(self):
        validate_fields(self)


def _demo_index(name: str) -> int:
    prefix, _, number = name.partition("_")
    if prefix != "demo" or not number.isdigit():
        raise ValueError(f"Unexpected group data/{name}: RoboMimic demos are named demo_<i>.")
    return int(number)


def read_env_args(f) -> dict:
    """``data.attrs["env_args"]`` as a dict, with a clear error when it is missing."""
    if "data" not in f:
        raise ValueError("Not a RoboMimic dataset: no 'data' group.")
    raw = f["data"].attrs.get("env_args")
    if raw is None:
        raise ValueError("Not a RoboMimic dataset: data.attrs['env_args'] is missing.")
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(raw)


def task_of(env_args: dict) -> str:
    """Our task name (``lift``, ``can``, ...) for RoboMimic's env_name."""
    env_name = env_args.get("env_name")
    if env_name not in TASK_BY_ROBOSUITE_ENV:
        raise ValueError(
            f"RoboMimic env_name {env_name!r} has no STEP task. Known: {', '.join(sorted(TASK_BY_ROBOSUITE_ENV))}"
        )
    return TASK_BY_ROBOSUITE_ENV[env_name].lower()


def demo_names(f, filter_key: str | None = None) -> list[str]:
    if filter_key is None:
        names = list(f["data"].keys())
    else:
        if "mask" not in f or filter_key not in f["mask"]:
            known = list(f["mask"].keys()) if "mask" in f else []
            raise ValueError(f"Filter key {filter_key!r} is not in this file's mask group (has: {known}).")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["mask"][filter_key][()]]
    return sorted(names, key=_demo_index)


@contextmanager
def _reading(path: Path):
    """Errors while reading the input as one line naming the file (h5py's OSError: not HDF5, truncated)."""
    try:
        yield
    except OSError as err:
        raise ValueError(f"{path} cannot be read as HDF5 ({err}): it is not a RoboMimic hdf5 file, or it is "
                         f"truncated or damaged; download or copy it again.") from None
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _check_demo(demo) -> None:
    for part in ("actions", "obs"):
        if part not in demo:
            raise ValueError(f"{demo.name} has no '{part}'; this is not a complete RoboMimic demo.")


def _episode(demo, num_robots: int, obs_type: str, cameras: tuple[str, ...]) -> dict:
    _check_demo(demo)
    obs = demo["obs"]
    actions = np.asarray(demo["actions"], dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != ARM_ACTION_DIM * num_robots:
        raise ValueError(f"{demo.name}/actions has shape {actions.shape}; expected (T, {ARM_ACTION_DIM * num_robots}).")
    keys = [f"robot{i}_{key}" for i in range(num_robots) for key in PROPRIO_KEYS]
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"{demo.name}/obs lacks {missing}.")
    episode = {
        STATE_KEY: np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in keys], axis=1),
        ACTION_KEY: actions,
    }
    if wants_state(obs_type):
        if "object" not in obs:
            raise ValueError(f"{demo.name}/obs lacks 'object' (the object state).")
        episode[ENV_STATE_KEY] = np.asarray(obs["object"], dtype=np.float32)
    if wants_pixels(obs_type):
        for cam in cameras:
            episode[IMAGE_PREFIX + cam] = np.asarray(obs[f"{cam}_image"], dtype=np.uint8)
    for key, value in episode.items():
        if len(value) != len(actions):
            raise ValueError(f"{demo.name}: {key} has {len(value)} steps but actions has {len(actions)}.")
    return episode


def _cameras(obs_group, task: str, obs_type: str) -> tuple[str, ...]:
    if not wants_pixels(obs_type):
        return ()
    present = [k[: -len("_image")] for k in obs_group.keys() if k.endswith("_image")]
    if not present:
        raise ValueError(f"obs_type {obs_type!r} needs images, but this is a low-dim dataset (no *_image keys).")
    # Cameras in the env's order first, then any others the file has.
    default = [c for c in ROBOMIMIC_TASKS[_task_key(task)].cameras if c in present]
    return tuple(default + sorted(c for c in present if c not in default))


def _task_key(task: str) -> str:
    return next(name for name in ROBOMIMIC_TASKS if name.lower() == task)


def import_robomimic(cfg: RoboMimicImportConfig, progress: bool = True) -> dict:
    """Write the demos of a RoboMimic hdf5 as a LeRobotDataset in ``cfg.out/lerobot``; return a report.

    The dataset is written beside ``OUT/lerobot`` and swapped in only when every demo was read and the result
    reads back whole: a bad input (wrong path, not HDF5, a broken demo) leaves an existing import untouched,
    even with ``overwrite``, and never leaves a partial dataset where a reader would load it.
    """
    import h5py

    check_obs_type(cfg.obs_type)
    path = Path(cfg.hdf5)
    if not path.is_file():
        raise FileNotFoundError(f"No RoboMimic dataset at {path}")
    root = Path(cfg.out) / LEROBOT_SUBDIR
    with folder_lock(cfg.out, "import-robomimic"):
        if root.exists() and not cfg.overwrite:
            raise FileExistsError(f"{root} already exists; remove it or pass overwrite.")
        with _reading(path):
            f = h5py.File(path, "r")
        try:
            with _reading(path):
                env_args = read_env_args(f)
                task = task_of(env_args)
                num_robots = ROBOMIMIC_TASKS[_task_key(task)].num_robots
                names = demo_names(f, cfg.filter_key)[: cfg.max_episodes]
                if not names:
                    raise ValueError("no demos to import.")
                first_demo = f["data"][names[0]]
                _check_demo(first_demo)
                cameras = _cameras(first_demo["obs"], task, cfg.obs_type)
                first = _episode(first_demo, num_robots, cfg.obs_type, cameras)
            # The feature spec from the data's own shapes, in the env's layout (no simulator needed to import).
            obs_space = build_observation_space(
                cfg.obs_type,
                agent_pos=spaces.Box(-np.inf, np.inf, shape=first[STATE_KEY].shape[1:], dtype=np.float32),
                environment_state=(
                    spaces.Box(-np.inf, np.inf, shape=first[ENV_STATE_KEY].shape[1:], dtype=np.float32)
                    if ENV_STATE_KEY in first else None
                ),
                cameras={cam: first[IMAGE_PREFIX + cam].shape[1:3] for cam in cameras},
            )
            action_space = spaces.Box(-1.0, 1.0, shape=first[ACTION_KEY].shape[1:], dtype=np.float32)
            features = lerobot_features(obs_space, action_space, use_videos=cfg.use_videos)
            frames = 0

            def episodes():
                nonlocal frames
                for name in names:
                    with _reading(path):
                        episode = _episode(f["data"][name], num_robots, cfg.obs_type, cameras)
                    frames += len(episode[ACTION_KEY])
                    yield episode

            spec = get_task(task)
            replace_dataset(root, spec.fps, features, episodes(), task_text=f"{task} robomimic {path.stem}",
                            robot_type="panda", progress=progress, expected_episodes=len(names))
        finally:
            f.close()
        report = {
            "source": str(path),
            "task": task,
            "env_id": spec.env_id,
            "env_name": env_args["env_name"],
            "obs_type": cfg.obs_type,
            "cameras": list(cameras),
            "episodes": len(names),
            "frames": frames,
            "dataset_root": str(root),
        }
        report_path = Path(cfg.out) / "import_report.json"
        atomic_write(report_path, lambda p: p.write_text(json.dumps(report, indent=2)))
    return report

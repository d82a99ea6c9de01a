"""``step record``: demonstrations on the SO-101 (real arm or twin) to a LeRobotDataset.

The actions come from a LeRobot SO-101 leader arm (``--teleop-port``) or from any agent spec
(``--agent expert`` on the twin). Every command goes through the env's safety guard, and the arm is
released (torque off, port closed) on every exit path, Ctrl-C included.

  step record --task so101-pickplace-sim --agent expert --episodes 20 --out data/so101_pp_sim
  step record --task so101-pickplace --port /dev/ttyACM0 --camera 0 \\
      --teleop-port /dev/ttyACM1 --episodes 20 --out data/so101_pp_real

On the real arm each episode ends at the horizon or at ``--episode-seconds``; the operator then keeps
or discards it and resets the scene. Ctrl-C during an episode ends the recording: the episodes kept so
far (and the interrupted one) are written, and the arm is released.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agents.config_files import add_config_arguments, config_from_args, option, validate_fields
from hardware import DEFAULT_LEADER_ID, DEFAULT_ROBOT_ID
from step_envs.contract import OBS_TYPES
from step_envs.dataset import LEROBOT_SUBDIR, frame_from_obs, lerobot_features, write_dataset
from step_envs.registry import get_task, make_env
from step_envs.seeds import DEMO_SEEDS


@dataclass(kw_only=True)
class RecordConfig:
    task: str = option("so101-pickplace-sim", help="so101-pickplace(-sim) or so101-stackcube(-sim)")
    out: str = option(help="output folder (the dataset goes to OUT/lerobot)")
    episodes: int = option(20, min=1, help="episodes to keep")
    agent: str = option("expert", help="agent spec when no --teleop-port is given")
    obs_type: str = option("pixels", choices=OBS_TYPES)  # the real arm has no object state
    seed_start: int = DEMO_SEEDS.start  # the twin's demonstrations use the demonstration seeds (step_envs/seeds.py)
    episode_seconds: float | None = option(None, help="cap each episode below the task's horizon")
    keep_failures: bool = option(False, help="twin: keep unsuccessful episodes too")
    # real arm (see hardware/so101_env.py)
    port: str | None = option(None, help="follower arm serial port (real ids)")
    camera: str | None = option(None, help="top camera: OpenCV index or /dev/video path (real ids)")
    robot_id: str = option(DEFAULT_ROBOT_ID, help="LeRobot calibration id of the follower")
    calibration_dir: str | None = None
    # leader arm (LeRobot SO101Leader, agents/leader_arm.py)
    teleop_port: str | None = option(None, help="leader arm serial port: teleoperate")
    teleop_id: str = option(DEFAULT_LEADER_ID, help="LeRobot calibration id of the leader")
    teleop_calibration_dir: str | None = None

    def __post_init__(self):
        validate_fields(self)


def add_arguments(parser) -> None:
    add_config_arguments(parser, RecordConfig)


def run(args) -> int:
    report = record(config_from_args(RecordConfig, args))
    print(json.dumps(report, indent=2))
    return 0


def _env_kwargs(cfg: RecordConfig, real: bool) -> dict:
    if not real:
        return {}
    kwargs = {"port": cfg.port, "camera": cfg.camera, "robot_id": cfg.robot_id}
    if cfg.calibration_dir:
        kwargs["calibration_dir"] = cfg.calibration_dir
    if sys.stdin.isatty():
        kwargs["reset_fn"] = lambda env: input("Reset the scene, then press Enter to start the episode... ")
    return kwargs


def record(cfg: RecordConfig, progress: bool = True) -> dict:
    from agents.factory import make_agent

    spec = get_task(cfg.task)
    if not spec.name.startswith("so101-"):
        raise ValueError(f"`step record` drives the SO-101; got task {cfg.task!r} (use `step collect` elsewhere).")
    root = Path(cfg.out) / LEROBOT_SUBDIR
    if root.exists():
        raise FileExistsError(f"{root} already exists; choose another --out or remove it.")
    env = make_env(spec.name, obs_type=cfg.obs_type, **_env_kwargs(cfg, spec.real_hardware))
    agent = None
    episodes: list[dict] = []
    summaries: list[dict] = []
    try:
        if cfg.teleop_port:
            agent = make_agent("leader", env, port=cfg.teleop_port, robot_id=cfg.teleop_id,
                               calibration_dir=cfg.teleop_calibration_dir)
        else:
            agent = make_agent(cfg.agent, env, task=spec.name, seed=cfg.seed_start)
        max_steps = spec.max_episode_steps
        if cfg.episode_seconds is not None:
            max_steps = min(max_steps, max(1, int(cfg.episode_seconds * spec.fps)))
        seed = cfg.seed_start
        while len(episodes) < cfg.episodes:
            episode, summary = _record_episode(env, agent, seed, max_steps, spec.real_hardware)
            seed += 1
            keep = summary["success"] or cfg.keep_failures or spec.real_hardware
            if spec.real_hardware and sys.stdin.isatty():
                keep = input(f"Episode {seed - 1}: keep it? [Y/n] ").strip().lower() not in ("n", "no")
            summary["kept"] = bool(keep and summary["length"] > 0)
            summaries.append(summary)
            if summary["kept"]:
                episodes.append(episode)
            if progress:
                print(f"episode seed={summary['seed']} steps={summary['length']} success={summary['success']} "
                      f"kept={summary['kept']} ({len(episodes)}/{cfg.episodes})", flush=True)
            if summary.get("stopped"):
                break
            if not spec.real_hardware and len(summaries) >= 20 * cfg.episodes:
                raise RuntimeError(f"Only {len(episodes)} good episodes after {len(summaries)} tries.")
        features = lerobot_features(env.observation_space, env.action_space)
    finally:
        if hasattr(agent, "close"):  # the leader arm: port closed
            agent.close()
        env.close()  # torque off, port closed
    if not episodes:
        raise RuntimeError("No episode was kept; nothing written.")
    write_dataset(root, spec.fps, features, episodes, task_text=spec.name, robot_type="so101_follower",
                  progress=progress)
    report = {
        "task": spec.name,
        "episodes_in_dataset": len(episodes),
        "episodes_tried": len(summaries),
        "success_rate": float(np.mean([s["success"] for s in summaries])),
        "frames": int(sum(len(e["action"]) for e in episodes)),
        "dataset_root": str(root),
        "config": asdict(cfg),
    }
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "record_report.json").write_text(json.dumps(report, indent=2))
    return report


def _record_episode(env, agent, seed: int, max_steps: int, real: bool) -> tuple[dict, dict]:
    """One episode through the rollout loop; its frames come from the loop's step hook."""
    from step_envs.rollout import rollout

    frames: list[dict] = []
    success, stopped = False, False
    t0 = time.perf_counter()
    try:
        (result,) = rollout(env, agent, [seed], progress=False, max_steps=max_steps,
                            step_hook=lambda obs, action: frames.append(frame_from_obs(obs, action)))
        success = result.success
    except KeyboardInterrupt:
        if not real or not frames:
            raise
        stopped = True  # Ctrl-C on the real arm: end this episode and the recording, keep what we have
    episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]} if frames else {}
    summary = {"seed": seed, "success": success, "length": len(frames), "stopped": stopped,
               "seconds": time.perf_counter() - t0}
    return episode, summary

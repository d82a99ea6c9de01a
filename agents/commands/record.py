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

from step_envs.dataset import LEROBOT_SUBDIR, frame_from_obs, lerobot_features, write_dataset
from step_envs.registry import get_task, make_env


@dataclass
class RecordConfig:
    task: str = "so101-pickplace-sim"
    out: str = "data/so101"
    episodes: int = 20
    agent: str = "expert"  # used when no leader arm is given
    obs_type: str = "pixels"  # the real arm has no object state
    seed_start: int = 100_000
    episode_seconds: float | None = None  # cap below the task's horizon
    keep_failures: bool = False  # twin: keep episodes that did not succeed
    # real arm (see hardware/so101_env.py)
    port: str | None = None
    camera: str | None = None
    robot_id: str = "step_so101"
    calibration_dir: str | None = None
    # leader arm (LeRobot SO101Leader)
    teleop_port: str | None = None
    teleop_id: str = "step_so101_leader"
    teleop_calibration_dir: str | None = None


def add_arguments(parser) -> None:
    d = RecordConfig()
    parser.add_argument("--task", default=d.task, help="so101-pickplace(-sim) or so101-stackcube(-sim)")
    parser.add_argument("--out", required=True, help="output folder (the dataset goes to OUT/lerobot)")
    parser.add_argument("--episodes", type=int, default=d.episodes, help="episodes to keep")
    parser.add_argument("--agent", default=d.agent, help="agent spec when no --teleop-port is given")
    parser.add_argument("--obs-type", default=d.obs_type, choices=["state", "pixels", "pixels_state"])
    parser.add_argument("--seed-start", type=int, default=d.seed_start)
    parser.add_argument("--episode-seconds", type=float, default=None)
    parser.add_argument("--keep-failures", action="store_true", help="twin: keep unsuccessful episodes too")
    parser.add_argument("--port", default=None, help="follower arm serial port (real ids)")
    parser.add_argument("--camera", default=None, help="top camera: OpenCV index or /dev/video path (real ids)")
    parser.add_argument("--robot-id", default=d.robot_id, help="LeRobot calibration id of the follower")
    parser.add_argument("--calibration-dir", default=None)
    parser.add_argument("--teleop-port", default=None, help="leader arm serial port: teleoperate")
    parser.add_argument("--teleop-id", default=d.teleop_id, help="LeRobot calibration id of the leader")
    parser.add_argument("--teleop-calibration-dir", default=None)


def run(args) -> int:
    cfg = RecordConfig(**{k: getattr(args, k) for k in RecordConfig.__dataclass_fields__})
    report = record(cfg)
    print(json.dumps(report, indent=2))
    return 0


class LeaderArm:
    """A LeRobot SO-101 leader arm as an agent: ``act`` returns its joint positions (LeRobot units)."""

    def __init__(self, port: str, robot_id: str, calibration_dir: str | None, motor_keys):
        from lerobot.teleoperators.so_leader import SO101Leader, SO101LeaderConfig

        from hardware.so101_env import ArmNotFoundError

        if port.startswith("/dev/") and not Path(port).exists():
            raise ArmNotFoundError(f"No serial port {port!r} for the leader arm; find it with `lerobot-find-port`.")
        config = SO101LeaderConfig(port=port, id=robot_id,
                                   calibration_dir=Path(calibration_dir) if calibration_dir else None)
        self.leader = SO101Leader(config)
        if not self.leader.calibration_fpath.is_file():
            raise RuntimeError(f"No leader calibration {self.leader.calibration_fpath}: run lerobot-calibrate "
                               f"--teleop.type=so101_leader --teleop.port={port} --teleop.id={robot_id}")
        self.motor_keys = tuple(motor_keys)
        try:
            self.leader.connect(calibrate=False)
        except ConnectionError as err:
            raise ArmNotFoundError(f"The leader arm on {port!r} did not answer: {err}") from err

    def reset(self) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        positions = self.leader.get_action()
        return np.array([positions[k] for k in self.motor_keys], dtype=np.float32)

    def close(self) -> None:
        if self.leader.is_connected:
            self.leader.disconnect()


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
    from hardware.so101_twin import MOTOR_KEYS

    spec = get_task(cfg.task)
    if not spec.name.startswith("so101-"):
        raise ValueError(f"`step record` drives the SO-101; got task {cfg.task!r} (use `step collect` elsewhere).")
    if cfg.episodes < 1:
        raise ValueError("--episodes must be at least 1")
    root = Path(cfg.out) / LEROBOT_SUBDIR
    if root.exists():
        raise FileExistsError(f"{root} already exists; choose another --out or remove it.")
    env = make_env(spec.name, obs_type=cfg.obs_type, **_env_kwargs(cfg, spec.real_hardware))
    teleop = None
    episodes: list[dict] = []
    summaries: list[dict] = []
    try:
        if cfg.teleop_port:
            teleop = LeaderArm(cfg.teleop_port, cfg.teleop_id, cfg.teleop_calibration_dir, MOTOR_KEYS)
            agent = teleop
        else:
            from agents.factory import make_agent

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
        if teleop is not None:
            teleop.close()
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
    obs, info = env.reset(seed=seed)
    agent.reset()
    frames, success, stopped = [], False, False
    t0 = time.perf_counter()
    try:
        for _ in range(max_steps):
            action = np.asarray(agent.act(obs), dtype=np.float32)
            frames.append(frame_from_obs(obs, action))
            obs, _, terminated, truncated, info = env.step(action)
            success |= bool(info["is_success"])
            if terminated or truncated:
                break
    except KeyboardInterrupt:
        if not real or not frames:
            raise
        stopped = True  # Ctrl-C on the real arm: end this episode and the recording, keep what we have
    episode = {key: np.stack([f[key] for f in frames]) for key in frames[0]} if frames else {}
    summary = {"seed": seed, "success": success, "length": len(frames), "stopped": stopped,
               "seconds": time.perf_counter() - t0}
    return episode, summary

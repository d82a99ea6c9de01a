"""One Gymnasium env for the SO-ARM101, on the real arm (LeRobot ``SO101Follower``) or its MuJoCo twin.

Ids (registered in ``step_envs.registry``): ``step/SO101-PickPlace-v0``, ``step/SO101-StackCube-v0``
(real arm) and ``step/SO101-PickPlace-Sim-v0``, ``step/SO101-StackCube-Sim-v0`` (twin). Going from
the twin to the arm is a change of id plus the arm's ``port`` and ``camera`` keyword arguments.

Observation (the STEP contract, LeRobot names):
  ``agent_pos``          (6,) float32 joint positions in LeRobot units: shoulder_pan, shoulder_lift,
                         elbow_flex, wrist_flex, wrist_roll in degrees, gripper in 0..100
  ``environment_state``  (14,) float32, twin only: object position + quaternion (wxyz), then the
                         target's (the plate for PickPlace, the bottom cube for StackCube)
  ``pixels``             {"top": HxWx3 uint8} top-down camera, ``image_size`` (default 96x96; real
                         frames are resized to it with area interpolation)
The real arm has no object state, so ``obs_type="state"`` and ``"pixels_state"`` are refused on real
ids with a clear error: use ``obs_type="pixels"`` (camera + joint positions), as in the paper.

Action: (6,) float32 absolute joint goals in the same units, bounded by the MJCF joint ranges. Every
action goes through ``hardware.safety.SafetyGuard`` (limits, max move per step, NaN refusal, deadline,
release on exit).

Timing: 30 Hz control (LeRobot's recording rate and the paper's observation rate), 450 steps
(15 s) per episode. The twin advances exactly 1/30 s of simulated time per step, whatever the agent's
latency; the real arm is paced on the wall clock.

Twin servo model (keywords of the ``-Sim`` ids): ``dead_band_deg`` (goal changes smaller than this
are ignored, default 1) and ``servo``: ``"mjcf"`` (default, the MJCF's servo the demonstrations were
recorded with) or ``"lerobot"`` (LeRobot's P=16 STS3215 with gearbox stiction: a goal within about
1-2 degrees of the present position does not move a joint at rest), or a dict of its fields, e.g.
``{"preset": "lerobot", "static_friction": 0.3}``; see ``hardware.so101_twin``.

Success: twin, from object poses (object resting on the plate / on the other cube, released).
Real arm: ``info["is_success"]`` is False unless a ``success_fn(obs) -> bool`` is given (e.g. an
operator key press); ``terminated`` follows it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from hardware import DEFAULT_ROBOT_ID
from hardware.safety import SafetyConfig, SafetyGuard, safety_config
from hardware.so101_twin import HOME_DEG, MOTOR_KEYS, TASK_NAMES, TOP_CAMERA, SO101Twin, TwinConfig, servo_settings
from step_envs.contract import build_observation_space, check_obs_type, validate_action, wants_pixels, wants_state

FPS = 30
IMAGE_SIZE = (96, 96)
ROBOTS = ("twin", "real")
ENV_STATE_DIM = 14


class ArmNotFoundError(RuntimeError):
    """The arm's serial port is missing or does not answer (unplugged, powered off, wrong port)."""


class CalibrationMissingError(RuntimeError):
    """No LeRobot calibration for this arm, or it does not match the motors."""


def make_real_robot(
    port: str,
    camera: int | str | None,
    robot_id: str = DEFAULT_ROBOT_ID,
    calibration_dir: str | Path | None = None,
    camera_size: tuple[int, int] = (480, 640),
    camera_fps: int = FPS,
):
    """A LeRobot ``SO101Follower`` with an OpenCV camera named "top"; checks the port and calibration."""
    from lerobot.cameras.opencv import OpenCVCameraConfig
    from lerobot.robots.so_follower import SO101Follower, SO101FollowerConfig

    if not port:
        raise ValueError("The real SO-101 needs its serial port: port='/dev/ttyACM0' (find it with `lerobot-find-port`).")
    if str(port).startswith("/dev/") and not Path(port).exists():
        raise ArmNotFoundError(
            f"No serial port {port!r}: is the SO-101 plugged in and powered? "
            "Find its port with `lerobot-find-port`, then pass port=..."
        )
    cameras = {}
    if camera is not None:
        index_or_path = int(camera) if str(camera).isdigit() else Path(str(camera))
        height, width = camera_size
        cameras[TOP_CAMERA] = OpenCVCameraConfig(index_or_path=index_or_path, fps=camera_fps, width=width, height=height)
    config = SO101FollowerConfig(
        port=str(port),
        id=robot_id,
        calibration_dir=Path(calibration_dir) if calibration_dir is not None else None,
        cameras=cameras,
        disable_torque_on_disconnect=True,  # torque released on every disconnect
        use_degrees=True,
    )
    robot = SO101Follower(config)
    if not robot.calibration_fpath.is_file():
        raise CalibrationMissingError(
            f"No calibration file {robot.calibration_fpath}. Calibrate once with LeRobot: "
            f"lerobot-calibrate --robot.type=so101_follower --robot.port={port} --robot.id={robot_id}"
        )
    return robot


def connect_real_robot(robot) -> None:
    """Connect without LeRobot's interactive calibration prompt; clear errors for the usual failures."""
    try:
        robot.connect(calibrate=False)
    except ConnectionError as err:
        raise ArmNotFoundError(
            f"The SO-101 on {robot.config.port!r} did not answer ({err}). Check the USB cable and the "
            "arm's power supply, and the port with `lerobot-find-port`."
        ) from err
    if not robot.is_calibrated:
        raise CalibrationMissingError(
            f"The motors' calibration differs from {robot.calibration_fpath}. Recalibrate with "
            f"lerobot-calibrate --robot.type=so101_follower --robot.port={robot.config.port} --robot.id={robot.id}"
        )


class SO101Env(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        task: str = "pickplace",
        robot: str = "twin",
        obs_type: str = "state",
        render_mode: str | None = "rgb_array",
        image_size: tuple[int, int] = IMAGE_SIZE,
        fps: int = FPS,
        safety: SafetyConfig | dict | None = None,
        # twin only
        dead_band_deg: float | None = None,
        servo: str | dict | None = None,
        # real arm only
        port: str | None = None,
        camera: int | str | None = None,
        robot_id: str = DEFAULT_ROBOT_ID,
        calibration_dir: str | None = None,
        camera_size: tuple[int, int] = (480, 640),
        success_fn: Callable[[dict], bool] | None = None,
        home_on_reset: bool = True,
        reset_fn: Callable[["SO101Env"], None] | None = None,
    ):
        self.obs_type = check_obs_type(obs_type)
        if task not in TASK_NAMES:
            raise ValueError(f"Unknown SO-101 task {task!r}; known: {', '.join(TASK_NAMES)}.")
        if robot not in ROBOTS:
            raise ValueError(f"robot must be one of {ROBOTS}, got {robot!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}.")
        self.task, self.robot_kind, self.render_mode = task, robot, render_mode
        self.fps, self.dt = int(fps), 1.0 / fps
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.success_fn, self.home_on_reset, self.reset_fn = success_fn, home_on_reset, reset_fn
        self.metadata = dict(self.metadata, render_fps=self.fps)

        twin_cfg = TwinConfig(task=task, cameras={TOP_CAMERA: self.image_size})
        if dead_band_deg is not None:
            twin_cfg = replace(twin_cfg, dead_band_deg=float(dead_band_deg))
        if servo is not None:
            twin_cfg = replace(twin_cfg, **servo_settings(servo))
        # The twin also supplies the joint limits of both robots (one action space for sim and real).
        limits_model = SO101Twin(twin_cfg)
        low, high = limits_model.joint_limits_deg()
        self.action_space = spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        pos_bound = np.array([360.0] * 5 + [110.0], dtype=np.float32)
        self.observation_space = build_observation_space(
            obs_type,
            agent_pos=spaces.Box(-pos_bound, pos_bound, dtype=np.float32),
            environment_state=spaces.Box(-10.0, 10.0, shape=(ENV_STATE_DIM,), dtype=np.float32),
            cameras={TOP_CAMERA: self.image_size},
        )

        if robot == "twin":
            self.twin: SO101Twin | None = limits_model
            self.robot = limits_model
            guard_cfg = safety_config(safety)  # no deadline: simulated time stands still while the agent thinks
        else:
            if wants_state(obs_type):
                raise ValueError(
                    f"obs_type={obs_type!r} needs object state, which the real arm does not have. "
                    "Use obs_type='pixels' (top camera + joint positions) on real SO-101 ids."
                )
            if wants_pixels(obs_type) and camera is None:
                raise ValueError("obs_type='pixels' on the real arm needs camera=<OpenCV index or /dev/video path>.")
            self.twin = None
            self.robot = make_real_robot(port, camera, robot_id, calibration_dir, camera_size, fps)
            guard_cfg = safety_config(safety, deadline_s=0.5)  # the real arm keeps moving while an agent thinks
        self.guard = SafetyGuard(self.robot, guard_cfg, MOTOR_KEYS, low, high)
        self.guard.connect(None if self.twin is not None else lambda: connect_real_robot(self.robot))
        self._present = HOME_DEG.copy()
        self._last_frame: np.ndarray | None = None
        self._last_send = None
        self._success = False

    # ----------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.guard.disarm_deadline()
        if self.twin is not None:
            self.twin.reset_scene(self.np_random)
        else:
            if self.reset_fn is not None:
                self.reset_fn(self)  # e.g. wait for the operator to place the objects
            if self.home_on_reset:
                self.move_to(HOME_DEG)
        self._last_send = None
        obs = self._observe()
        self._success = False
        info = self._info(obs, deadline_missed=False)
        self.guard.arm_deadline(self.hold_action())
        return obs, info

    def step(self, action):
        action = validate_action(action, self.action_space)
        missed = self.guard.disarm_deadline()
        if missed and not self.guard.config.execute_late_actions:
            action = self.hold_action()  # the watchdog already held the arm; the late action is stale
        sent = self.guard.send(action, self._present)
        self._wait_one_period()
        obs = self._observe()
        info = self._info(obs, deadline_missed=missed)
        info["sent_action"] = sent.astype(np.float32)
        reward = 1.0 if info["is_success"] else 0.0
        self.guard.arm_deadline(self.hold_action())
        return obs, reward, bool(info["is_success"]), False, info

    def hold_action(self) -> np.ndarray:
        """Goals equal to the present joint positions: the arm stays where it is."""
        return np.clip(self._present, self.action_space.low, self.action_space.high).astype(np.float32)

    def render(self):
        if self.render_mode is None:
            return None
        if self.twin is not None:
            return self.twin.render("front")
        if self._last_frame is None:
            return np.zeros((*self.image_size, 3), dtype=np.uint8)
        return self._last_frame

    def close(self):
        self.guard.release()

    def __del__(self):
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.release()

    # ----------------------------------------------------------------------------- helpers
    def move_to(self, goal_deg: np.ndarray, tolerance: float = 2.0, timeout_s: float = 10.0) -> bool:
        """Drive the arm to ``goal_deg`` through the guard (max move per step applies); True on arrival."""
        self._observe(cameras=False)
        for _ in range(int(timeout_s * self.fps)):
            if np.max(np.abs(self._present - goal_deg)) <= tolerance:
                return True
            self.guard.send(goal_deg, self._present)
            self._wait_one_period()
            self._observe(cameras=False)
        return bool(np.max(np.abs(self._present - goal_deg)) <= tolerance)

    def _wait_one_period(self) -> None:
        if self.twin is not None:
            self.twin.advance(self.dt)
            return
        # Real arm: keep a steady control rate measured from the previous command.
        now = time.perf_counter()
        if self._last_send is not None:
            remaining = self._last_send + self.dt - now
            if remaining > 0:
                time.sleep(remaining)
        self._last_send = time.perf_counter()

    def _observe(self, cameras: bool | None = None) -> dict:
        want_pixels = wants_pixels(self.obs_type) and (cameras is None or cameras)
        if self.twin is not None:
            raw = self.twin.get_observation(cameras=want_pixels)  # rendering only when images are wanted
        else:
            raw = self.robot.get_observation()
        self._present = np.array([raw[k] for k in MOTOR_KEYS], dtype=np.float64)
        if not np.all(np.isfinite(self._present)):
            raise RuntimeError(f"The arm reported non-finite joint positions: {self._present.tolist()}")
        obs = {"agent_pos": self._present.astype(np.float32)}
        if wants_state(self.obs_type) and self.twin is not None:
            obs["environment_state"] = self.twin.object_state()
        if want_pixels:
            frame = np.asarray(raw[TOP_CAMERA], dtype=np.uint8)
            if self.twin is None:
                self._last_frame = frame
            obs["pixels"] = {TOP_CAMERA: _resize(frame, self.image_size)}
        return obs

    def _info(self, obs: dict, deadline_missed: bool) -> dict:
        if self.twin is not None:
            success = self.twin.is_success()
        else:
            success = bool(self.success_fn(obs)) if self.success_fn is not None else False
        return {"is_success": bool(success), "deadline_missed": bool(deadline_missed)}


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if frame.shape[:2] == tuple(size):
        return frame
    import cv2

    height, width = size
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)

"""``step/Lift-v0``, ``step/Can-v0``, ``step/Square-v0``, ``step/Transport-v0``, ``step/ToolHang-v0``:
the RoboMimic tasks on robosuite 1.5.1 behind the STEP observation contract; ``step/Square-Abs-v0``,
``step/Transport-Abs-v0``, ``step/ToolHang-Abs-v0``: the same tasks under position control (``control="absolute"``).

Simulator: robosuite's Lift, PickPlaceCan, NutAssemblySquare, TwoArmTransport (two Pandas, opposed) and
ToolHang with Panda arms, the BASIC composite controller with an OSC_POSE arm part (robosuite's
``default_panda.json``: delta end-effector pose in the robot base frame), 20 Hz control, as in RoboMimic.

State layout (RoboMimic's low-dim keys):
  ``agent_pos``          (9 per robot) robot<i>_eef_pos (3), robot<i>_eef_quat (4, xyzw), robot<i>_gripper_qpos (2);
                         Transport concatenates robot0 then robot1 (18)
  ``environment_state``  robosuite's ``object-state`` (Lift 10, Can 14, Square 14, ...)
Image variants: ``pixels`` = RoboMimic's cameras for the task, 84x84x3 uint8, upright:
  Lift/Can/Square ``agentview`` + ``robot0_eye_in_hand``; ToolHang ``sideview`` + ``robot0_eye_in_hand``;
  Transport ``shouldercamera0``, ``shouldercamera1``, ``robot0_eye_in_hand``, ``robot1_eye_in_hand``.
Action, ``control="delta"`` (RoboMimic's, the default): (7 per arm) float32 in [-1, 1]: dx, dy, dz (x 0.05 m),
axis-angle rotation (x 0.5 rad), gripper (-1 open, +1 close; the Panda gripper integrates the sign, so 0 keeps
the finger command as it is).
Action, ``control="absolute"`` (Diffusion Policy's position control, its ``abs_action``): (10 per arm) the
grip site's target position in the robot base frame (3, metres), its target orientation in the base frame as
the first two columns of the rotation matrix (6: continuous, unlike axis-angle), gripper as above. The same OSC
controller tracks it; ``delta_to_absolute`` turns a delta action into the absolute one the delta controller
would have set, so the delta experts make absolute demonstrations that replay the same motion.
Success: robosuite's ``_check_success()``; the episode terminates on success; reward = robosuite's sparse
reward (1.0 on success).
"""

from __future__ import annotations

import os

# Off-screen rendering on the CPU: EGL (Mesa llvmpipe). OSMesa is not installed on these machines.
os.environ.setdefault("MUJOCO_GL", "egl")

from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

from step_envs.contract import (  # noqa: E402
    build_observation_space,
    check_obs_type,
    validate_action,
    wants_pixels,
    wants_state,
)

IMAGE_SIZE = 84  # RoboMimic's image datasets
VIDEO_SIZE = 256
FPS = 20
ARM_ACTION_DIM = 7  # 6 OSC_POSE deltas + 1 gripper
ABS_ARM_ACTION_DIM = 10  # position 3 + rotation 6 (two matrix columns) + gripper 1
CONTROLS = ("delta", "absolute")
ABS_POSITION_LIMIT = 1.5  # metres from the robot base: beyond the Panda's reach (0.855 m), so never binding
PROPRIO_KEYS = ("eef_pos", "eef_quat", "gripper_qpos")  # RoboMimic's low-dim robot keys, in this order
PROPRIO_DIM = 9


@dataclass(frozen=True)
class RoboMimicTask:
    robosuite_env: str  # robosuite environment class name (also RoboMimic's env_name)
    num_robots: int
    cameras: tuple[str, ...]  # RoboMimic's image-dataset cameras for this task
    render_camera: str  # camera of render() (videos)
    env_kwargs: dict = field(default_factory=dict)  # extra robosuite kwargs


ROBOMIMIC_TASKS: dict[str, RoboMimicTask] = {
    "Lift": RoboMimicTask("Lift", 1, ("agentview", "robot0_eye_in_hand"), "agentview"),
    "Can": RoboMimicTask("PickPlaceCan", 1, ("agentview", "robot0_eye_in_hand"), "agentview"),
    "Square": RoboMimicTask("NutAssemblySquare", 1, ("agentview", "robot0_eye_in_hand"), "agentview"),
    "Transport": RoboMimicTask(
        "TwoArmTransport", 2,
        ("shouldercamera0", "shouldercamera1", "robot0_eye_in_hand", "robot1_eye_in_hand"), "frontview",
        env_kwargs={"env_configuration": "opposed"},  # RoboMimic's "single-arm-opposed"
    ),
    "ToolHang": RoboMimicTask("ToolHang", 1, ("sideview", "robot0_eye_in_hand"), "sideview"),
}

# robosuite env name (as stored in RoboMimic's env_args) -> our task name
TASK_BY_ROBOSUITE_ENV = {task.robosuite_env: name for name, task in ROBOMIMIC_TASKS.items()}


MODEL_SEED = 0  # NumPy seed while robosuite builds the model (see make_robosuite_env)


@contextmanager
def numpy_global_seed(seed: int):
    """Seed NumPy's global RNG inside the block and restore its previous state afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def make_robosuite_env(task: RoboMimicTask, control: str = "delta"):
    """The robosuite env with RoboMimic's settings; images are rendered by the adapter, not robosuite.

    robosuite draws some model properties (e.g. Lift's cube size) from NumPy's global RNG when it builds the
    model. We keep one model per env (hard_reset=False), so it is built under a fixed seed: every instance
    gets the same model and a seed names the same episode in every process.
    """
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(robot="Panda")  # BASIC + OSC_POSE arm, delta, base frame
    for part in controller["body_parts"].values():
        if part.get("type") == "OSC_POSE":
            part["input_type"] = control  # the goal in the base frame either way
    with numpy_global_seed(MODEL_SEED):
        return robosuite.make(
            task.robosuite_env,
            robots=["Panda"] * task.num_robots,
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=False,
            use_camera_obs=False,
            use_object_obs=True,
            reward_shaping=False,
            control_freq=FPS,
            ignore_done=True,  # the TimeLimit wrapper owns the horizon
            hard_reset=False,  # keep one MjModel (our renderers hold it); reset re-samples the placements
            **task.env_kwargs,
        )


def rotation_from_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The rotation matrix nearest two (not quite orthonormal) predicted columns: Gram-Schmidt, as in Zhou et
    al.'s 6-D rotation representation. A degenerate pair (zero or parallel) is a clear error, not a NaN pose."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def unit(v: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(v)
        if norm < 1e-6:
            raise ValueError(f"Absolute action's rotation columns {x.tolist()}, {y.tolist()} do not span a plane.")
        return v / norm

    first = unit(x)
    second = unit(y - (first @ y) * first)
    return np.stack([first, second, np.cross(first, second)], axis=1)


class RoboMimicEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        task: str = "Lift",
        obs_type: str = "state",
        render_mode: str | None = "rgb_array",
        image_size: int = IMAGE_SIZE,
        video_size: int = VIDEO_SIZE,
        cameras: tuple[str, ...] | None = None,
        fast_render: bool = True,
        control: str = "delta",
    ):
        if task not in ROBOMIMIC_TASKS:
            raise ValueError(f"Unknown RoboMimic task {task!r}. Known: {', '.join(ROBOMIMIC_TASKS)}")
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        self.control = control
        self.obs_type = check_obs_type(obs_type)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if image_size < 8 or video_size < 8:
            raise ValueError(f"image_size and video_size must be at least 8, got {image_size}, {video_size}")
        self.task = ROBOMIMIC_TASKS[task]
        self.task_name = task
        self.render_mode = render_mode
        self.image_size = image_size
        self.video_size = video_size
        self.cameras = tuple(cameras) if cameras is not None else self.task.cameras
        # Floor/table reflections and shadows double llvmpipe's render time; fast_render turns them off
        # (RoboMimic's own images have reflections; the scene content is the same).
        self.fast_render = fast_render
        self.sim_env = make_robosuite_env(self.task, control)
        model = self.sim_env.sim.model
        known = {model.camera_id2name(i) for i in range(model.ncam)}
        for cam in (*self.cameras, self.task.render_camera):
            if cam not in known:
                raise ValueError(f"Camera {cam!r} is not in {self.task.robosuite_env}; cameras: {sorted(known)}")
        self._renderers: dict[int, object] = {}
        self._raw = self.sim_env.observation_spec()  # observables of the current state: fixes the sizes
        object_dim = self._raw["object-state"].shape[0]
        n = self.task.num_robots
        # Positions, unit quaternions and finger joints: unbounded Boxes, the contract only fixes shapes.
        self.observation_space = build_observation_space(
            obs_type,
            agent_pos=spaces.Box(-np.inf, np.inf, shape=(PROPRIO_DIM * n,), dtype=np.float32),
            environment_state=spaces.Box(-np.inf, np.inf, shape=(object_dim,), dtype=np.float32),
            cameras={cam: (image_size, image_size) for cam in self.cameras},
        )
        if control == "delta":
            self.action_space = spaces.Box(-1.0, 1.0, shape=(ARM_ACTION_DIM * n,), dtype=np.float32)
        else:
            arm_high = np.array([ABS_POSITION_LIMIT] * 3 + [1.0] * 7, dtype=np.float32)
            self.action_space = spaces.Box(-np.tile(arm_high, n), np.tile(arm_high, n), dtype=np.float32)

    # ------------------------------------------------------------------ observations
    def _observation(self) -> dict:
        raw = self._raw
        parts = [raw[f"robot{i}_{key}"] for i in range(self.task.num_robots) for key in PROPRIO_KEYS]
        obs = {"agent_pos": np.concatenate(parts).astype(np.float32)}
        if wants_state(self.obs_type):
            obs["environment_state"] = np.asarray(raw["object-state"], dtype=np.float32)
        if wants_pixels(self.obs_type):
            obs["pixels"] = {cam: self._render_camera(cam, self.image_size) for cam in self.cameras}
        return obs

    def _render_camera(self, camera: str, size: int) -> np.ndarray:
        import mujoco

        renderer = self._renderers.get(size)
        if renderer is None:
            # One renderer per size: robosuite's own context rebuilds itself whenever the size changes.
            try:
                renderer = mujoco.Renderer(self.sim_env.sim.model._model, size, size)
            except Exception as err:  # mujoco picks its GL backend when it is first imported
                raise RuntimeError(
                    f"Off-screen rendering failed ({err}). Set MUJOCO_GL=egl before anything imports mujoco."
                ) from err
            self._renderers[size] = renderer
        option = mujoco.MjvOption()
        option.geomgroup[0] = 0  # robosuite hides collision geoms (group 0) and shows visual ones
        renderer.update_scene(self.sim_env.sim.data._data, camera=camera, scene_option=option)
        if self.fast_render:
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        return renderer.render()  # mujoco.Renderer returns the image upright, uint8 HxWx3

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # robosuite draws placements and joint noise from NumPy's global RNG: seed it from our np_random
        # for the reset only, then restore it, so equal seeds give equal scenes and nothing else is touched.
        with numpy_global_seed(int(self.np_random.integers(2**31 - 1))):
            self._raw = self.sim_env.reset()
        return self._observation(), {"is_success": bool(self.sim_env._check_success())}

    def step(self, action):
        action = validate_action(action, self.action_space)
        if self.control == "absolute":
            action = self._robosuite_absolute(action)
        self._raw, reward, _, _ = self.sim_env.step(action.astype(np.float64))
        success = bool(self.sim_env._check_success())
        return self._observation(), float(reward), success, False, {"is_success": success}

    def hold_action(self) -> np.ndarray:
        """Zero end-effector motion (absolute control: the current pose as the goal); gripper 0 leaves the Panda's
        finger command where it is."""
        delta = np.zeros(ARM_ACTION_DIM * self.task.num_robots, dtype=np.float32)
        return delta if self.control == "delta" else self.delta_to_absolute(delta)

    # ------------------------------------------------------------------ absolute (position) control
    def _arm_controllers(self) -> list:
        """Each arm's OSC controller with its state and base frame brought up to the current simulator state
        (what robosuite does before it reads an action)."""
        controllers = []
        for robot in self.sim_env.robots:
            robot.composite_controller.update_state()
            controller = robot.part_controllers["right"]
            controller.update(force=True)
            controllers.append(controller)
        return controllers

    def delta_to_absolute(self, delta_action) -> np.ndarray:
        """The absolute action (this env's ``control="absolute"`` layout) of the goal that robosuite's delta
        controller sets for ``delta_action`` (7 per arm) in the current state."""
        delta = np.asarray(delta_action, dtype=np.float64).reshape(self.task.num_robots, ARM_ACTION_DIM)
        arms = []
        for controller, arm in zip(self._arm_controllers(), delta):
            # robosuite's own steps of set_goal for a delta: clip and scale, then the goal from the current pose.
            scaled = controller.scale_action(arm[:6])
            pos = controller.compute_goal_pos(scaled[:3])
            rot = controller.compute_goal_ori(scaled[3:6])
            arms.append(np.concatenate([pos, rot[:, 0], rot[:, 1], arm[6:7]]))
        return np.concatenate(arms).astype(np.float32)

    def _robosuite_absolute(self, action: np.ndarray) -> np.ndarray:
        """Our absolute layout (rotation as two matrix columns) -> robosuite's (axis-angle), per arm."""
        arms = []
        for arm in np.asarray(action, dtype=np.float64).reshape(self.task.num_robots, ABS_ARM_ACTION_DIM):
            rot = rotation_from_columns(arm[3:6], arm[6:9])
            arms.append(np.concatenate([arm[:3], Rotation.from_matrix(rot).as_rotvec(), arm[9:10]]))
        return np.concatenate(arms)

    def render(self):
        if self.render_mode is None:
            return None
        return self._render_camera(self.task.render_camera, self.video_size)

    def close(self):
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        if getattr(self, "sim_env", None) is not None:
            self.sim_env.close()
            self.sim_env = None

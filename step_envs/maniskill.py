"""``step/StackCube-v0``: ManiSkill3's StackCube-v1 behind the STEP observation contract, on the CPU.

Simulator: ManiSkill 3.0.1 / SAPIEN 3.0.3, PhysX on the CPU (``sim_backend="physx_cpu"``), one env, the Panda
(without the wrist camera: only the base camera is used) and the ``pd_ee_delta_pose`` controller, as in the RNR-DP
setup the paper's Table 4 follows; 20 Hz control. Reward: ManiSkill's sparse reward (1.0 on success).

Horizon: 200 steps. ManiSkill registers StackCube-v1 with 50 steps, a budget for RL policies; its published
motion-planning demonstrations take 110-160 steps, and an imitation policy needs room to be slower than its teacher
(our scripted expert takes 57 on average).

State layout:
  ``agent_pos``          (16) Panda qpos (7 arm joints + 2 fingers, rad / m), then the TCP pose in the world frame
                         (position 3, quaternion wxyz 4). The arm acts in end-effector space, so the TCP pose is the
                         proprioception that matters; the joints disambiguate the arm's configuration and carry the
                         finger opening. Velocities are left out (as in the RoboMimic ids; the policy sees two frames).
  ``environment_state``  (23) ManiSkill's own task state for StackCube: cube A pose (7: position, wxyz), cube B pose
                         (7), tcp->A (3), tcp->B (3), A->B (3). The goal is "A on top of B", so B's pose is the goal.
Image variants: ``pixels`` = ``{"base_camera": 128x128x3 uint8}`` (ManiSkill's sensor camera for the task).
Action: (7) float32 in [-1, 1]: dx, dy, dz (x 0.1 m) in the robot base frame (axes of the world frame); a rotation
(XYZ Euler angles, norm clipped to 1, x -0.1 rad: ManiSkill 3.0.1 scales by ``rot_lower``), applied in the base frame;
gripper: an absolute finger target, -1 closed (-0.01 m) .. +1 open (0.04 m).
Success: ManiSkill's ``evaluate()["success"]`` (A on B within 5 mm, A static, A released); the episode terminates on
success.

Vulkan: SAPIEN needs a Vulkan device even for state-only simulation. ``bash scripts/fetch_lavapipe.sh`` (part of
``scripts/setup.sh``) unpacks Mesa 25's lavapipe (software Vulkan) into ``.vendor/lavapipe``; this module points
``VK_ICD_FILENAMES`` at it unless the variable (or ``VK_DRIVER_FILES``) is already set. Nothing is downloaded at run
time: StackCube's cubes are primitives and the Panda's meshes ship inside the mani_skill wheel.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from step_envs.contract import (
    build_observation_space,
    check_obs_type,
    validate_action,
    wants_pixels,
    wants_state,
)

FPS = 20  # ManiSkill's control frequency for StackCube
IMAGE_SIZE = 128  # ManiSkill's base camera
VIDEO_SIZE = 256
CAMERAS = ("base_camera",)
AGENT_POS_DIM = 16
ENVIRONMENT_STATE_DIM = 23
GRIPPER_RANGE = (-0.01, 0.04)  # Panda finger targets at gripper action -1 and +1 (ManiSkill's Panda config)
LAVAPIPE_ICD = Path(__file__).resolve().parents[1] / ".vendor" / "lavapipe" / "lvp_icd.json"
VULKAN_HELP = (
    "ManiSkill (SAPIEN) needs a Vulkan device, even for state-only simulation. On a machine without a GPU run "
    "`bash scripts/fetch_lavapipe.sh` (part of scripts/setup.sh): it unpacks Mesa 25's lavapipe (software Vulkan) into "
    f"{LAVAPIPE_ICD.parent}, which this module uses when VK_ICD_FILENAMES is unset. Or set VK_ICD_FILENAMES to the ICD "
    "json of a Vulkan driver that SAPIEN accepts (Debian 12's own mesa-vulkan-drivers 22.3 is rejected: it lacks "
    "descriptorBindingPartiallyBound)."
)


def use_vendored_lavapipe() -> str | None:
    """Point the Vulkan loader at ``.vendor/lavapipe`` unless a driver is already chosen; returns the ICD in use."""
    chosen = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    if chosen:
        return chosen
    if LAVAPIPE_ICD.is_file():
        os.environ["VK_ICD_FILENAMES"] = str(LAVAPIPE_ICD)
        return str(LAVAPIPE_ICD)
    return None


use_vendored_lavapipe()  # before SAPIEN creates its Vulkan instance (the first env)
# ManiSkill imports mujoco (through pytorch_kinematics), which picks its GL backend on import: keep the project's
# off-screen EGL (as step_envs/robomimic.py and hardware/so101_twin.py do) for MuJoCo envs made later in this process.
os.environ.setdefault("MUJOCO_GL", "egl")


def unavailable_reason() -> str | None:
    """Why step/StackCube-v0 cannot run here (ManiSkill not installed, no Vulkan driver found), or None."""
    import importlib.util

    if importlib.util.find_spec("mani_skill") is None:
        return "ManiSkill3 is not installed: pip install -e '.[maniskill]'"
    system_icds = [p for d in ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d") for p in Path(d).glob("*.json")]
    if use_vendored_lavapipe() is None and not system_icds:
        return "no Vulkan driver: run `bash scripts/fetch_lavapipe.sh` (Mesa lavapipe into .vendor/lavapipe)"
    return None


def import_maniskill():
    """Import ManiSkill (registers its envs); a clear ImportError naming the extra when it is missing."""
    try:
        with warnings.catch_warnings():
            # sapien falls back to its bundled Vulkan loader when the system has none: that is expected here.
            warnings.filterwarnings("ignore", message="Failed to find system libvulkan")
            import mani_skill.envs  # noqa: F401
    except ImportError as err:
        raise ImportError(f"step/StackCube-v0 needs ManiSkill3: pip install -e '.[maniskill]' ({err})") from err


def _numpy(x) -> np.ndarray:
    """A ManiSkill tensor of batch 1 as a float32 NumPy array without the batch axis."""
    return np.asarray(x.detach().cpu().numpy()[0], dtype=np.float32)


class ManiSkillStackCubeEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}

    def __init__(
        self,
        obs_type: str = "state",
        render_mode: str | None = "rgb_array",
        image_size: int = IMAGE_SIZE,
        video_size: int = VIDEO_SIZE,
    ):
        self.obs_type = check_obs_type(obs_type)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if image_size < 8 or video_size < 8:
            raise ValueError(f"image_size and video_size must be at least 8, got {image_size}, {video_size}")
        self.render_mode = render_mode
        self.image_size = image_size
        self.video_size = video_size
        use_vendored_lavapipe()
        import_maniskill()
        try:
            self.ms_env = gym.make(
                "StackCube-v1",
                num_envs=1,
                obs_mode="rgb" if wants_pixels(obs_type) else "none",  # state is read from the scene directly
                control_mode="pd_ee_delta_pose",
                reward_mode="sparse",
                robot_uids="panda",
                sim_backend="physx_cpu",
                render_backend="cpu",
                render_mode="rgb_array" if render_mode else None,
                sensor_configs=dict(width=image_size, height=image_size),
                human_render_camera_configs=dict(width=video_size, height=video_size),
                disable_env_checker=True,
            )
        except RuntimeError as err:
            text = str(err).lower()
            if any(word in text for word in ("vk::", "vulkan", "rendering device", "physical device")):
                raise RuntimeError(f"{VULKAN_HELP} (SAPIEN said: {err}; VK_ICD_FILENAMES="
                                   f"{os.environ.get('VK_ICD_FILENAMES')})") from err
            raise
        self.sim = self.ms_env.unwrapped  # ManiSkill's BaseEnv: our TimeLimit owns the horizon, not ManiSkill's
        self.observation_space = build_observation_space(
            obs_type,
            agent_pos=spaces.Box(-np.inf, np.inf, shape=(AGENT_POS_DIM,), dtype=np.float32),
            environment_state=spaces.Box(-np.inf, np.inf, shape=(ENVIRONMENT_STATE_DIM,), dtype=np.float32),
            cameras={cam: (image_size, image_size) for cam in CAMERAS},
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(7,), dtype=np.float32)

    # ------------------------------------------------------------------ observations
    def agent_pos(self) -> np.ndarray:
        agent = self.sim.agent
        return np.concatenate([_numpy(agent.robot.get_qpos()), _numpy(agent.tcp.pose.raw_pose)])

    def environment_state(self) -> np.ndarray:
        sim = self.sim
        a, b, tcp = sim.cubeA.pose, sim.cubeB.pose, sim.agent.tcp.pose
        return np.concatenate([_numpy(a.raw_pose), _numpy(b.raw_pose), _numpy(a.p - tcp.p), _numpy(b.p - tcp.p),
                               _numpy(b.p - a.p)])

    def _observation(self, raw) -> dict:
        obs = {"agent_pos": self.agent_pos()}
        if wants_state(self.obs_type):
            obs["environment_state"] = self.environment_state()
        if wants_pixels(self.obs_type):
            sensors = raw["sensor_data"]
            obs["pixels"] = {cam: np.ascontiguousarray(sensors[cam]["rgb"][0].cpu().numpy(), dtype=np.uint8)
                             for cam in CAMERAS}
        return obs

    def evaluate(self) -> dict:
        return {key: bool(value[0]) for key, value in self.sim.evaluate().items()}

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # ManiSkill draws the cube placements and the arm's joint noise from its episode RNG: seed it from ours on
        # every reset, so equal seeds give equal scenes and an unseeded reset continues our sequence.
        raw, _ = self.sim.reset(seed=int(self.np_random.integers(2**31 - 1)))
        return self._observation(raw), {"is_success": self.evaluate()["success"]}

    def step(self, action):
        action = validate_action(action, self.action_space)
        raw, reward, terminated, _, info = self.sim.step(action[None])
        success = bool(info["success"][0])
        return self._observation(raw), float(reward[0]), success, False, {"is_success": success}

    def hold_action(self) -> np.ndarray:
        """Zero end-effector motion and the fingers' current opening as their target."""
        low, high = GRIPPER_RANGE
        finger = float(self.sim.agent.robot.get_qpos()[0, -1])
        gripper = np.clip(2 * (finger - low) / (high - low) - 1, -1.0, 1.0)
        return np.array([0, 0, 0, 0, 0, 0, gripper], dtype=np.float32)

    def render(self):
        if self.render_mode is None:
            return None
        frame = self.sim.render()
        return np.ascontiguousarray(frame[0].cpu().numpy(), dtype=np.uint8)

    def close(self):
        if getattr(self, "ms_env", None) is not None:
            self.ms_env.close()
            self.ms_env = None

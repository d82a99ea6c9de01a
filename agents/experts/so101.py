"""Scripted experts for the SO-101 twin: PickNPlace (cube onto plate) and StackCube (cube onto cube).

The expert reads the twin's true object poses (so it cannot run on the real arm, which has no object
state), plans a few Cartesian waypoints for the grasp point between the fingertip pads, moves the
commanded point toward each at a bounded speed and turns every commanded pose into joint goals with
damped-least-squares inverse kinematics on MuJoCo's Jacobians. Actions are absolute joint goals in
LeRobot units, exactly what a policy trained on the resulting dataset must output.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from hardware.so101_twin import JOINT_NAMES, SO101Twin

ARM_JOINTS = JOINT_NAMES[:5]
_GRASP_JAW_RAD = 0.46  # jaw angle at which the two pads are parallel (see the MJCF comment)


@dataclass(frozen=True)
class ExpertConfig:
    speed: float = 0.15  # m/s of the commanded grasp point
    yaw_speed_deg: float = 120.0  # deg/s of the commanded jaw direction
    hover: float = 0.045  # m above the object before descending
    carry_height: float = 0.06  # m, grasp point height while carrying (a pointing-down SO-101 reaches ~0.08)
    open_gripper: float = 60.0  # LeRobot gripper units (0 closed .. 100 open)
    closed_gripper: float = 10.0  # a little tighter than a 3 cm cube: squeezes without crushing
    close_steps: int = 12  # control steps to wait for the jaws to close / open
    drop: float = 0.006  # m above its resting height at which a cube is released
    settle_steps: int = 8  # control steps to let the arm catch up above the target before placing
    ik_iterations: int = 60
    ik_damping: float = 0.02
    orientation_weight: float = 0.05  # metres per radian: where both cannot be met, position wins


class SO101IK:
    """Damped least squares IK for a point between the pads, gripper pointing down, jaws at a yaw."""

    def __init__(self, twin: SO101Twin, cfg: ExpertConfig):
        self.twin = twin
        self.cfg = cfg
        self.model = twin.model
        self.data = mujoco.MjData(self.model)  # private copy: IK never disturbs the simulation
        self.qpos_adr = np.array([self.model.joint(n).qposadr[0] for n in ARM_JOINTS])
        self.dof_adr = np.array([self.model.joint(n).dofadr[0] for n in ARM_JOINTS])
        self.range = np.array([self.model.joint(n).range for n in ARM_JOINTS])
        self.site = self.model.site("gripperframe").id
        self.body = self.model.body("gripper").id
        self.point_offset = self._grasp_point_offset()

    def _grasp_point_offset(self) -> np.ndarray:
        """Midpoint of the two pads at the parallel-jaw angle, in the gripper body's frame."""
        self.data.qpos[self.model.joint("gripper").qposadr[0]] = _GRASP_JAW_RAD
        mujoco.mj_kinematics(self.model, self.data)
        pads = [self.data.geom_xpos[self.model.geom(n).id] for n in ("fixed_jaw_pad", "moving_jaw_pad")]
        mid = np.mean(pads, axis=0)
        rot = self.data.xmat[self.body].reshape(3, 3)
        return rot.T @ (mid - self.data.xpos[self.body])

    def _point(self) -> np.ndarray:
        return self.data.xpos[self.body] + self.data.xmat[self.body].reshape(3, 3) @ self.point_offset

    @staticmethod
    def target_rotation(yaw: float) -> np.ndarray:
        """Site frame: x (approach) straight down, z (jaw closing axis) horizontal at ``yaw``."""
        x = np.array([0.0, 0.0, -1.0])
        z = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        y = np.cross(z, x)
        return np.stack([x, y, z], axis=1)

    def forward(self, q_arm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.data.qpos[self.qpos_adr] = q_arm
        mujoco.mj_kinematics(self.model, self.data)
        return self._point(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def solve(self, q_seed: np.ndarray, pos: np.ndarray, yaw: float) -> tuple[np.ndarray, float]:
        """Joint radians (5,) reaching ``pos`` with the jaws at ``yaw``; also the final position error."""
        cfg = self.cfg
        target_rot = self.target_rotation(yaw)
        q = np.clip(np.array(q_seed, dtype=np.float64), self.range[:, 0], self.range[:, 1])
        jacp = np.zeros((3, self.model.nv))
        jacr = np.zeros((3, self.model.nv))
        quat = np.zeros(4)
        rot_err = np.zeros(3)
        for _ in range(cfg.ik_iterations):
            point, rot = self.forward(q)
            pos_err = pos - point
            mujoco.mju_mat2Quat(quat, (target_rot @ rot.T).reshape(-1))
            mujoco.mju_quat2Vel(rot_err, quat, 1.0)
            err = np.concatenate([pos_err, cfg.orientation_weight * rot_err])
            if np.linalg.norm(pos_err) < 2e-4 and np.linalg.norm(rot_err) < 2e-3:
                break
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jac(self.model, self.data, jacp, jacr, point, self.body)
            jac = np.vstack([jacp[:, self.dof_adr], cfg.orientation_weight * jacr[:, self.dof_adr]])
            step = jac.T @ np.linalg.solve(jac @ jac.T + cfg.ik_damping**2 * np.eye(6), err)
            q = np.clip(q + step, self.range[:, 0], self.range[:, 1])
        point, _ = self.forward(q)
        return q, float(np.linalg.norm(pos - point))


def _yaw_of(quat: np.ndarray) -> float:
    """Yaw of a body about the world z axis (objects stay upright on the table)."""
    w, x, y, z = quat
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def _closest_grip_yaw(face_yaw: float, reference: float) -> float:
    """Of the four jaw directions that close on a cube's faces, the one nearest ``reference``."""
    candidates = face_yaw + np.pi / 2 * np.arange(-4, 5)
    return float(candidates[np.argmin(np.abs(candidates - reference))])


class SO101Expert:
    """Waypoint expert on the twin. ``act`` returns (6,) float32 absolute joint goals (LeRobot units)."""

    def __init__(self, env, cfg: ExpertConfig | None = None, seed: int = 0):
        self.env = env  # the unwrapped SO101Env (twin)
        self.twin: SO101Twin = env.twin
        if self.twin is None:
            raise ValueError("The SO-101 expert needs the MuJoCo twin (object poses); the real arm has none.")
        self.cfg = cfg or ExpertConfig()
        self.ik = SO101IK(self.twin, self.cfg)
        self.dt = 1.0 / env.fps
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self.wait = 0
        self.cmd_pos: np.ndarray | None = None
        self.cmd_yaw = 0.0
        self.q_arm: np.ndarray | None = None
        self.gripper = self.cfg.open_gripper
        self.goal: tuple[np.ndarray, float, float, int] | None = None

    # Phases: each returns (position, jaw yaw, gripper, steps to wait once there), from the true state.
    def _plan(self, phase: int):
        cfg, twin = self.cfg, self.twin
        obj, obj_quat = twin.body_pose("object")
        target, target_quat = twin.body_pose("target")
        half = twin.config.cube_half
        # Height of the held cube's centre when it is let go: resting on the plate / the other cube,
        # plus a small drop so the cube never presses on the target while the jaws open.
        if twin.config.task == "pickplace":
            release_z = target[2] + 0.004 + half + cfg.drop
            place_yaw = self.cmd_yaw  # a plate is round: keep the jaws as they are
        else:
            release_z = target[2] + 2 * half + cfg.drop
            place_yaw = _closest_grip_yaw(_yaw_of(target_quat), self.cmd_yaw)
        grip_yaw = _closest_grip_yaw(_yaw_of(obj_quat), np.arctan2(obj[1], obj[0]) + np.pi / 2)
        # Once the cube is in the hand it is rarely at the grasp point (the moving jaw pushes it toward
        # the fixed one): aim the cube itself at the target. Measured from the arm's actual pose after it
        # has settled above the target (phase 4 waits), so neither servo lag nor IK residual is in it.
        if phase >= 5:
            point, _ = self.ik.forward(self.twin.data.qpos[self.ik.qpos_adr])
            in_hand = obj - point
        else:
            in_hand = np.zeros(3)
        place = np.array([target[0], target[1], release_z]) - in_hand
        grasp_z = max(obj[2], half * 0.8)
        plans = [
            (np.array([obj[0], obj[1], grasp_z + cfg.hover]), grip_yaw, cfg.open_gripper, 0),
            (np.array([obj[0], obj[1], grasp_z]), grip_yaw, cfg.open_gripper, 0),
            (None, None, cfg.closed_gripper, cfg.close_steps),  # close on the cube where we are
            (np.array([obj[0], obj[1], cfg.carry_height]), None, cfg.closed_gripper, 0),
            (np.array([target[0], target[1], cfg.carry_height]), place_yaw, cfg.closed_gripper, cfg.settle_steps),
            (place, place_yaw, cfg.closed_gripper, cfg.settle_steps),
            (None, None, cfg.open_gripper, cfg.close_steps),
            (place + [0.0, 0.0, cfg.hover], None, cfg.open_gripper, 0),
        ]
        if phase >= len(plans):
            return None
        pos, yaw, gripper, wait = plans[phase]
        return (self.cmd_pos.copy() if pos is None else pos, self.cmd_yaw if yaw is None else yaw, gripper, wait)

    def act(self, obs=None) -> np.ndarray:
        if self.cmd_pos is None:  # first call of the episode: start from where the arm is
            self.q_arm = self.twin.data.qpos[self.ik.qpos_adr].copy()
            point, rot = self.ik.forward(self.q_arm)
            self.cmd_pos = point
            self.cmd_yaw = float(np.arctan2(rot[1, 2], rot[0, 2]))
            self.gripper = self.twin.joint_positions()[-1]
        if self.goal is None:
            self.goal = self._plan(self.phase)
        if self.goal is not None:
            pos, yaw, gripper, wait = self.goal
            delta = pos - self.cmd_pos
            max_step = self.cfg.speed * self.dt
            self.cmd_pos = self.cmd_pos + delta * min(1.0, max_step / max(np.linalg.norm(delta), 1e-9))
            dyaw = np.clip(yaw - self.cmd_yaw, -np.deg2rad(self.cfg.yaw_speed_deg) * self.dt,
                           np.deg2rad(self.cfg.yaw_speed_deg) * self.dt)
            self.cmd_yaw += dyaw
            self.gripper = gripper
            arrived = np.linalg.norm(pos - self.cmd_pos) < 1e-6 and abs(yaw - self.cmd_yaw) < 1e-6
            if arrived:
                self.wait += 1
                if self.wait > wait:
                    self.phase += 1
                    self.wait = 0
                    self.goal = None
        self.q_arm, _ = self.ik.solve(self.q_arm, self.cmd_pos, self.cmd_yaw)
        rad = np.concatenate([self.q_arm, [0.0]])
        action = self.twin.rad_to_deg(rad)
        action[-1] = self.gripper
        low, high = self.env.action_space.low, self.env.action_space.high
        return np.clip(action, low, high).astype(np.float32)

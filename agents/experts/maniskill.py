"""Scripted expert for ManiSkill3 StackCube (``step/StackCube-v0``): a phase machine in ``pd_ee_delta_pose`` space.

It reads the true scene (cube poses, the TCP pose) and moves the TCP through the poses of ManiSkill's own
motion-planning solution (``mani_skill/examples/motionplanning/panda/solutions/stack_cube.py``): a top-down grasp at
cube A's centre with the fingers closing across a pair of A's faces, a lift, then A carried so that it sits on B's top
face (the TCP keeps its grasp offset), and the gripper opened. Phases: above A, descend, close, lift, above B, lower,
open, retreat. Each step turns the TCP's pose error into a clipped delta action (ManiSkill's controller adds the delta
to the measured TCP pose; position x 0.1 m, rotation XYZ Euler x -0.1 rad, both in the robot base frame, whose axes
are the world's); phases advance on reaching their waypoint or after a timeout.

Grasp yaw: A is symmetric under quarter turns, so the fingers can close along either face normal (mod pi). The
expert takes the one that turns the hand least, unless B is close enough that the opened fingers could touch it:
then the closing axis most nearly perpendicular to the A->B direction.

Far cubes: ManiSkill's controller solves IK for each delta and holds the arm still when the solve fails, which a
vertical hand meets at the table beyond about 0.75 m from the base (cubes reach 0.86 m). There the hand leans outward
by up to 25 degrees, turned about the closing axis (chosen across the radius), so the pads still meet A's faces flat.

Measured: seeds 0-49 all succeed (mean 57 steps), and the demonstration seeds 100000-100099 too.

Measure: ``step eval --task stackcube --agent expert --episodes 50``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from step_envs.maniskill import GRIPPER_RANGE

POS_SCALE = 0.1  # metres per unit of position action (ManiSkill's Panda pd_ee_delta_pose)
ROT_SCALE = -0.1  # radians per unit of rotation action: ManiSkill 3.0.1 multiplies by rot_lower (-0.1)
OPEN, CLOSE = 1.0, -1.0
APPROACH = np.array([0.0, 0.0, -1.0])  # the TCP's z axis points at the table


def gripper_action(width_per_finger: float) -> float:
    """Gripper action whose finger target is ``width_per_finger`` (m from the centre)."""
    low, high = GRIPPER_RANGE
    return float(np.clip(2 * (width_per_finger - low) / (high - low) - 1, -1.0, 1.0))


def wrap(angle: float, period: float) -> float:
    """Angle wrapped to [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


def grasp_rotation(closing_angle: float) -> np.ndarray:
    """TCP rotation pointing down with the fingers closing along (cos a, sin a, 0) (ManiSkill's build_grasp_pose)."""
    closing = np.array([np.cos(closing_angle), np.sin(closing_angle), 0.0])
    return np.stack([np.cross(closing, APPROACH), closing, APPROACH], axis=1)


@dataclass
class StackCubeExpertConfig:
    hover: float = 0.06  # TCP above cube A's centre before descending
    pregrasp_width: float = 0.03  # finger target while descending (m from the centre; a cube is 0.02)
    near_b: float = 0.1  # B closer than this (m, centre to centre): choose the closing axis away from B
    max_tilt_deg: float = 25.0  # lean of the hand for the farthest cubes (about the closing axis)
    tilt_from: float = 0.68  # m from the robot base (horizontal): start leaning the hand
    tilt_span: float = 0.1  # m over which the lean grows to its maximum
    close_steps: int = 8
    clearance: float = 0.03  # A's bottom above B's top while moving over it
    release_gap: float = 0.003  # A's bottom above B's top when the gripper opens
    open_steps: int = 6
    free_speed: float = 0.06  # m per step asked for in free motion
    carry_speed: float = 0.04  # m per step while holding A
    place_speed: float = 0.015  # m per step for the last centimetres down onto B
    pos_tolerance: float = 0.006
    rot_tolerance: float = 0.05  # rad
    phase_timeout: int = 40


class StackCubeExpert:
    phases = ("above", "descend", "close", "lift", "over", "lower", "open", "retreat")

    def __init__(self, env, config: StackCubeExpertConfig | None = None):
        self.env = env  # step_envs.maniskill.ManiSkillStackCubeEnv (unwrapped)
        self.config = config or StackCubeExpertConfig()
        self.reset()

    def reset(self) -> None:
        self.phase = self.phases[0]
        self.phase_steps = 0
        self.closing_angle: float | None = None
        self.grasp_r: np.ndarray | None = None
        self.base = self.env.sim.agent.robot.pose.raw_pose[0, :3].detach().cpu().numpy().astype(np.float64)

    def goto(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    # ------------------------------------------------------------------ scene
    @staticmethod
    def _pose(pose) -> tuple[np.ndarray, np.ndarray]:
        raw = pose.raw_pose[0].detach().cpu().numpy().astype(np.float64)
        return raw[:3], Rotation.from_quat(raw[3:], scalar_first=True).as_matrix()

    def _scene(self):
        sim = self.env.sim
        tcp_p, tcp_r = self._pose(sim.agent.tcp.pose)
        a_p, a_r = self._pose(sim.cubeA.pose)
        b_p, _ = self._pose(sim.cubeB.pose)
        return tcp_p, tcp_r, a_p, a_r, b_p

    def _radial(self, p: np.ndarray) -> np.ndarray:
        """Horizontal offset of a point from the robot base."""
        return (p - self.base)[:2]

    def _choose_closing(self, tcp_r: np.ndarray, a_p: np.ndarray, a_r: np.ndarray, b_p: np.ndarray) -> float:
        c = self.config
        current = float(np.arctan2(tcp_r[1, 1], tcp_r[0, 1]))  # the TCP's y axis is the closing axis
        face = float(np.arctan2(a_r[1, 0], a_r[0, 0]))  # A's x face normal; A's faces repeat every pi/2
        nearest = current + wrap(face - current, np.pi / 2)
        other = nearest - np.pi / 2 if nearest >= current else nearest + np.pi / 2  # the other face pair
        along = lambda angle, v: abs(np.cos(angle - np.arctan2(v[1], v[0])))  # 0: closing perpendicular to v
        if self._tilt(a_p, b_p) > 0:  # tilting about the closing axis leans the hand outward: close across the radius
            radial = self._radial(a_p)
            return nearest if along(nearest, radial) <= along(other, radial) else other
        to_b = b_p[:2] - a_p[:2]
        if np.linalg.norm(to_b) < c.near_b:  # the opened fingers must not touch B
            return nearest if along(nearest, to_b) <= along(other, to_b) else other
        return nearest

    def _tilt(self, a_p: np.ndarray, b_p: np.ndarray) -> float:
        """Lean of the hand (rad) for far cubes: a vertical hand cannot reach the table beyond ~0.75 m of the base."""
        c = self.config
        reach = max(np.linalg.norm(self._radial(a_p)), np.linalg.norm(self._radial(b_p)))
        return float(np.radians(c.max_tilt_deg) * np.clip((reach - c.tilt_from) / c.tilt_span, 0.0, 1.0))

    def _grasp_rotation(self, a_p: np.ndarray, b_p: np.ndarray) -> np.ndarray:
        """Down-pointing grasp, turned about the closing axis so that the fingers point away from the base."""
        rot = grasp_rotation(self.closing_angle)
        tilt = self._tilt(a_p, b_p)
        if tilt == 0:
            return rot
        radial = self._radial(a_p) / np.linalg.norm(self._radial(a_p))
        options = [Rotation.from_rotvec(rot[:, 1] * sign * tilt).as_matrix() @ rot for sign in (1, -1)]
        return max(options, key=lambda r: float(r[:2, 2] @ radial))  # approach axis leaning outward

    # ------------------------------------------------------------------ control
    def _action(self, tcp_p, tcp_r, target_p, target_r, gripper: float, speed: float) -> np.ndarray:
        delta = target_p - tcp_p
        dist = float(np.linalg.norm(delta))
        if dist > speed:
            delta *= speed / dist
        rot_err = Rotation.from_matrix(target_r @ tcp_r.T).as_euler("XYZ")  # ManiSkill: q_target = dq * q_tcp
        rot = rot_err / ROT_SCALE
        norm = float(np.linalg.norm(rot))
        if norm > 1:
            rot /= norm
        return np.concatenate([np.clip(delta / POS_SCALE, -1, 1), rot, [gripper]]).astype(np.float32)

    @staticmethod
    def _rot_error(r1: np.ndarray, r2: np.ndarray) -> float:
        return float(np.linalg.norm(Rotation.from_matrix(r1 @ r2.T).as_rotvec()))

    def act(self, obs) -> np.ndarray:
        action = self.step()
        self.phase_steps += 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def step(self) -> np.ndarray:
        c = self.config
        tcp_p, tcp_r, a_p, a_r, b_p = self._scene()
        if self.closing_angle is None:  # chosen once per episode, from the initial scene
            self.closing_angle = self._choose_closing(tcp_r, a_p, a_r, b_p)
            self.grasp_r = self._grasp_rotation(a_p, b_p)
        grasp_r = self.grasp_r
        timeout = self.phase_steps >= c.phase_timeout
        pre = gripper_action(c.pregrasp_width)
        stack_z = b_p[2] + 2 * 0.02  # A's centre when it rests on B (cubes of half size 0.02)

        if self.phase == "above":
            target = a_p + [0, 0, c.hover]
            if (np.linalg.norm(target - tcp_p) < 2 * c.pos_tolerance
                    and self._rot_error(grasp_r, tcp_r) < c.rot_tolerance) or timeout:
                self.goto("descend")
            return self._action(tcp_p, tcp_r, target, grasp_r, pre, c.free_speed)
        if self.phase == "descend":
            target = a_p.copy()
            if np.linalg.norm(target - tcp_p) < c.pos_tolerance or timeout:
                self.goto("close")
            return self._action(tcp_p, tcp_r, target, grasp_r, pre, c.carry_speed)
        if self.phase == "close":
            if self.phase_steps >= c.close_steps:
                self.goto("lift")
            return self._action(tcp_p, tcp_r, tcp_p, grasp_r, CLOSE, c.carry_speed)
        # Holding A: move the TCP by A's error, so the grasp offset (A against the TCP) is kept.
        if self.phase == "lift":
            target_a = np.array([a_p[0], a_p[1], stack_z + c.clearance])
            if abs(target_a[2] - a_p[2]) < 2 * c.pos_tolerance or timeout:
                self.goto("over")
            return self._action(tcp_p, tcp_r, tcp_p + target_a - a_p, grasp_r, CLOSE, c.carry_speed)
        if self.phase == "over":
            target_a = np.array([b_p[0], b_p[1], stack_z + c.clearance])
            if np.linalg.norm((target_a - a_p)[:2]) < c.pos_tolerance / 2 or timeout:
                self.goto("lower")
            return self._action(tcp_p, tcp_r, tcp_p + target_a - a_p, grasp_r, CLOSE, c.carry_speed)
        if self.phase == "lower":
            target_a = np.array([b_p[0], b_p[1], stack_z + c.release_gap])
            err = target_a - a_p
            if (abs(err[2]) < 0.002 and np.linalg.norm(err[:2]) < 0.004) or timeout:
                self.goto("open")
            speed = c.place_speed if err[2] > -0.03 else c.carry_speed
            return self._action(tcp_p, tcp_r, tcp_p + err, grasp_r, CLOSE, speed)
        if self.phase == "open":
            if self.phase_steps >= c.open_steps:
                self.goto("retreat")
            return self._action(tcp_p, tcp_r, tcp_p, grasp_r, OPEN, c.place_speed)
        return self._action(tcp_p, tcp_r, tcp_p + [0, 0, 0.05], grasp_r, OPEN, c.place_speed)

"""Scripted experts for the RoboMimic tasks: waypoint state machines in OSC_POSE delta space.

Each expert reads the true robosuite state (end-effector site, object bodies and sites), picks a target pose
for the gripper's grip site and a gripper command for its current phase, and turns the pose error into a
clipped delta action (position in units of the controller's 0.05 m, rotation in units of its 0.5 rad, in the
robot's base frame). Phases advance when the grip site reaches its waypoint or a phase times out.

Gripper orientation: the grip site's x axis is the fingers' closing axis and its z axis points out of the
hand. "Down" poses are Rz(yaw) @ DOWN, where DOWN points the hand at the table with the fingers closing along
world y (the Panda's pose at reset); yaw then sets the closing axis to (-sin yaw, cos yaw).

Lift, Can and Square are phase machines whose shared pattern is written once on ``PhaseExpert``: ``grasp`` (hover,
descend, close: the approach every expert opens with, ToolHang's frame and tool grasps included) and ``move_until``
(drive to a waypoint, advance when there, blocked or timed out). Transport runs one generator per arm (a waypoint sequence as
straight-line code) that synchronise at the handover. ToolHang is a phase machine that also plans: the frame's
yaw and the tool's grasp are chosen from IK solutions of the poses they lead to (``ArmKinematics``), and the
two large reorientations (back to the home posture after the frame, turning the tool) go through joint space.

Measure: ``step eval --task square --agent expert --episodes 50``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
OPEN, CLOSE = -1.0, 1.0


def rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def wrap(angle: float, period: float = 2 * np.pi) -> float:
    """Angle wrapped to [-period/2, period/2)."""
    return (angle + period / 2) % period - period / 2


def body_yaw(xmat: np.ndarray) -> float:
    """Yaw of a body whose z axis stays roughly vertical."""
    m = np.asarray(xmat).reshape(3, 3)
    return float(np.arctan2(m[1, 0], m[0, 0]))


@dataclass
class OSCGains:
    pos_gain: float = 20.0  # action per metre of position error (1.0 = 0.05 m per step); 5 cm saturates
    rot_gain: float = 4.0  # action per radian of orientation error (1.0 = 0.5 rad per step)
    max_pos_action: float = 1.0
    max_rot_action: float = 0.6  # slower turns keep a held object from slipping


class Arm:
    """One Panda arm of a robosuite env: where its grip site is, and the action that moves it to a pose."""

    def __init__(self, sim_env, index: int = 0, gains: OSCGains | None = None):
        self.sim_env = sim_env
        robot = sim_env.robots[index]
        self.site_id = robot.eef_site_id["right"]
        self.base_body = robot.robot_model.root_body
        self.gains = gains or OSCGains()

    @property
    def data(self):
        return self.sim_env.sim.data

    def pos(self) -> np.ndarray:
        return np.array(self.data.site_xpos[self.site_id])

    def rot(self) -> np.ndarray:
        return np.array(self.data.site_xmat[self.site_id]).reshape(3, 3)

    def yaw(self) -> float:
        """Yaw of a down pose, read back from the closing axis (site x axis)."""
        x_axis = self.rot()[:, 0]
        return float(np.arctan2(-x_axis[0], x_axis[1]))

    def action(self, target_pos: np.ndarray, target_rot: np.ndarray, gripper: float) -> np.ndarray:
        g = self.gains
        base_rot = np.array(self.data.get_body_xmat(self.base_body)).reshape(3, 3)
        # OSC_POSE deltas are expressed in the robot base frame: rotate world errors into it.
        pos_err = base_rot.T @ (np.asarray(target_pos) - self.pos())
        rot_err = base_rot.T @ Rotation.from_matrix(target_rot @ self.rot().T).as_rotvec()
        dpos = np.clip(g.pos_gain * pos_err, -g.max_pos_action, g.max_pos_action)
        drot = np.clip(g.rot_gain * rot_err, -g.max_rot_action, g.max_rot_action)
        return np.concatenate([dpos, drot, [gripper]]).astype(np.float32)


class PhaseExpert:
    """Shared bookkeeping: the current phase and the steps spent in it."""

    phases: tuple[str, ...] = ()

    def __init__(self, env):
        self.env = env  # the RoboMimicEnv (unwrapped)
        self.reset()

    @property
    def sim_env(self):
        return self.env.sim_env

    def reset(self) -> None:
        self.phase = self.phases[0]
        self.phase_steps = 0
        self._arms: list[Arm] | None = None
        self._last_pos: list[np.ndarray] | None = None
        self._speeds = [np.inf, np.inf]  # metres per step of each grip site, smoothed

    def goto(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def stalled(self, index: int = 0, min_steps: int = 10, speed: float = 5e-4) -> bool:
        """The hand has stopped short of its waypoint (blocked by the table, a wall or its reach)."""
        return self.phase_steps >= min_steps and self._speeds[index] < speed

    def arm(self, index: int = 0) -> Arm:
        # Built lazily: robosuite ids are only valid once the env has been reset.
        if self._arms is None:
            self._arms = [Arm(self.sim_env, i, self.gains) for i in range(len(self.sim_env.robots))]
        return self._arms[index]

    def act(self, obs) -> np.ndarray:
        positions = [self.arm(i).pos() for i in range(len(self.sim_env.robots))]
        if self._last_pos is not None:
            for i, (p, q) in enumerate(zip(positions, self._last_pos)):
                moved = float(np.linalg.norm(p - q))
                self._speeds[i] = moved if not np.isfinite(self._speeds[i]) else 0.7 * self._speeds[i] + 0.3 * moved
        self._last_pos = positions
        action = self.step()
        self.phase_steps += 1
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def step(self) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------ the pattern every RoboMimic expert repeats
    def move_until(self, target, rot, gripper: float, then: str, tolerance: float, stall: bool = True,
                   ready: bool = True) -> np.ndarray:
        """Drive the grip site to (target, rot); go to phase ``then`` once it is within ``tolerance`` (or has
        stalled short of it, with ``stall``) and ``ready`` holds, or when the phase times out."""
        arm = self.arm()
        arrived = reached(arm, target, tolerance) or (stall and self.stalled())
        if (ready and arrived) or self.phase_steps > self.config.phase_timeout:
            self.goto(then)
        return arm.action(target, rot, gripper)

    def grasp(self, point, rot, then: str, prefix: str = "", depth: float = 0.0, squared: bool = True,
              close_rot: np.ndarray | None = None) -> np.ndarray | None:
        """Approach and grasp from above, as three phases: ``{prefix}above`` (hover approach_height over
        ``point``), ``{prefix}descend`` (onto point + depth; on, or blocked, and ``squared``) and ``{prefix}close``
        (the fingers close in place for close_steps, the hand held at ``close_rot``, default down at its yaw),
        then phase ``then``. None in any other phase."""
        c, arm = self.config, self.arm()
        if self.phase == prefix + "above":
            target = point + np.array([0.0, 0.0, c.approach_height])
            return self.move_until(target, rot, OPEN, prefix + "descend", c.tolerance, stall=False)
        if self.phase == prefix + "descend":
            target = point + np.array([0.0, 0.0, depth])
            return self.move_until(target, rot, OPEN, prefix + "close", c.tolerance / 2, ready=squared)
        if self.phase == prefix + "close":
            if self.phase_steps >= c.close_steps:
                self.goto(then)
            return arm.action(arm.pos(), rot_z(arm.yaw()) @ DOWN if close_rot is None else close_rot, CLOSE)
        return None

    def body_pos(self, name: str) -> np.ndarray:
        return np.array(self.sim_env.sim.data.get_body_xpos(name))

    def body_xmat(self, name: str) -> np.ndarray:
        return np.array(self.sim_env.sim.data.get_body_xmat(name)).reshape(3, 3)

    def site_pos(self, name: str) -> np.ndarray:
        return np.array(self.sim_env.sim.data.get_site_xpos(name))


def reached(arm: Arm, target: np.ndarray, tolerance: float) -> bool:
    return bool(np.linalg.norm(arm.pos() - target) < tolerance)


# ---------------------------------------------------------------------------------------------------- Lift
@dataclass
class LiftExpertConfig:
    gains: OSCGains = field(default_factory=OSCGains)
    approach_height: float = 0.08  # above the cube centre before descending
    grasp_depth: float = 0.0  # grip site relative to the cube centre when closing
    tolerance: float = 0.01
    close_steps: int = 10  # steps with the gripper closing before lifting
    lift_height: float = 0.2
    phase_timeout: int = 120


class LiftExpert(PhaseExpert):
    phases = ("above", "descend", "close", "lift")

    def __init__(self, env, config: LiftExpertConfig | None = None):
        self.config = config or LiftExpertConfig()
        self.gains = self.config.gains
        super().__init__(env)

    def step(self) -> np.ndarray:
        c, arm = self.config, self.arm()
        cube = self.body_pos(self.sim_env.cube.root_body)
        # The cube is symmetric under quarter turns: turn the hand by the smallest angle that squares up.
        yaw = arm.yaw() + wrap(body_yaw(self.body_xmat(self.sim_env.cube.root_body)) - arm.yaw(), np.pi / 2)
        action = self.grasp(cube, rot_z(yaw) @ DOWN, "lift", depth=c.grasp_depth)
        if action is not None:
            return action
        target = cube + [0, 0, c.lift_height]
        return arm.action(target, rot_z(arm.yaw()) @ DOWN, CLOSE)


# ---------------------------------------------------------------------------------------------------- Can
@dataclass
class CanExpertConfig:
    gains: OSCGains = field(default_factory=OSCGains)
    approach_height: float = 0.1
    grasp_depth: float = 0.0  # grip site relative to the can centre when closing
    tolerance: float = 0.01
    close_steps: int = 10
    carry_height: float = 0.17  # of the hand above the bins' base: clears the walls, stays within reach
    release_height: float = 0.12  # of the hand above the bins' base when opening
    goal_margin: float = 0.06  # aim this far inside the goal quadrant's corner nearest the robot (reach)
    open_steps: int = 15
    phase_timeout: int = 150


class CanExpert(PhaseExpert):
    phases = ("above", "descend", "close", "lift", "carry", "lower", "open")

    def __init__(self, env, config: CanExpertConfig | None = None):
        self.config = config or CanExpertConfig()
        self.gains = self.config.gains
        super().__init__(env)

    def _can(self):
        """The can and where to drop it: inside its goal quadrant of bin 2 (as PickPlace.not_in_bin defines it)."""
        env = self.sim_env
        obj = next(o for o in env.objects if o.name == "Can")
        bin_id = env.object_to_id["can"]
        low = np.array(env.bin2_pos[:2], dtype=float)
        if bin_id in (0, 2):
            low[0] -= env.bin_size[0] / 2
        if bin_id < 2:
            low[1] -= env.bin_size[1] / 2
        high = low + np.array(env.bin_size[:2]) / 2
        # The far corners of bin 2 are at the edge of the Panda's reach: aim near the corner closest to the base.
        base = self.body_pos(self.arm().base_body)[:2]
        corner = np.where(np.abs(low - base) < np.abs(high - base), low, high)
        margin = np.minimum(self.config.goal_margin, (high - low) / 2)
        goal = corner + np.sign((low + high) / 2 - corner) * margin
        return obj, goal

    def step(self) -> np.ndarray:
        c, arm, env = self.config, self.arm(), self.sim_env
        obj, goal = self._can()
        can = self.body_pos(obj.root_body)
        down = rot_z(0.0) @ DOWN  # a cylinder: any yaw grasps it
        action = self.grasp(can, down, "lift", depth=c.grasp_depth, close_rot=down)
        if action is not None:
            return action
        # Carry the can, not the hand: aim so that the can (held off-centre) ends over the goal.
        held_offset = arm.pos() - can
        base_z = env.bin2_pos[2]
        above_goal = goal[:2] + held_offset[:2]
        if self.phase == "lift":
            target = np.array([arm.pos()[0], arm.pos()[1], base_z + c.carry_height])
            return self.move_until(target, down, CLOSE, "carry", 2 * c.tolerance)
        if self.phase == "carry":
            return self.move_until(np.array([*above_goal, base_z + c.carry_height]), down, CLOSE, "lower",
                                   2 * c.tolerance)
        if self.phase == "lower":
            return self.move_until(np.array([*above_goal, base_z + c.release_height]), down, CLOSE, "open",
                                   c.tolerance)
        target = np.array([arm.pos()[0], arm.pos()[1], base_z + c.carry_height])
        return arm.action(target if self.phase_steps > c.open_steps else arm.pos(), down, OPEN)


# ---------------------------------------------------------------------------------------------------- Square
@dataclass
class SquareExpertConfig:
    gains: OSCGains = field(default_factory=OSCGains)
    approach_height: float = 0.08  # above the handle before descending
    grasp_depth: float = -0.01  # grip site relative to the handle centre when closing (press onto it)
    tolerance: float = 0.01
    close_steps: int = 10
    carry_height: float = 0.2  # of the nut above the table top while moving
    drop_height: float = 0.16  # of the nut above the table top when released (peg top is at +0.13)
    align_tolerance: float = 0.003  # nut centre to peg axis, metres, before letting go
    align_yaw_tolerance: float = 0.05  # radians, nut square to the peg
    settle_steps: int = 5  # consecutive aligned, still steps before letting go
    still_speed: float = 1e-3  # metres per step of the hand counted as still
    rise_after: int = 10  # steps after opening before the hand backs off upwards
    hand_yaw_limit: float = 2.4  # |yaw| of the hand the wrist reaches (Panda joint 7 stops near -2.7)
    yaw_tolerance: float = 0.05  # hand squared to the handle before closing
    grasp_lost_distance: float = 0.075  # hand to nut centre (0.054 when held): beyond it, grasp again
    phase_timeout: int = 150


class SquareExpert(PhaseExpert):
    """Grasp the handle, hold the nut squarely over the peg, then let it drop (lowering while held jams)."""

    phases = ("above", "descend", "close", "lift", "align", "release")

    def __init__(self, env, config: SquareExpertConfig | None = None):
        self.config = config or SquareExpertConfig()
        self.gains = self.config.gains
        super().__init__(env)

    def reset(self) -> None:
        super().reset()
        self.aligned_steps = 0
        self.nut_goal_yaw = 0.0

    def choose_nut_yaw(self, nut_yaw: float, handle_offset: float, peg: np.ndarray) -> float:
        """The quarter-turn of the nut over the peg that puts the hand (on the handle) closest to the robot
        base: with the handle pointing away, the far peg is out of the Panda's reach."""
        base = self.body_pos(self.arm().base_body)[:2]
        best, best_distance = nut_yaw, np.inf
        for k in range(4):
            yaw = k * np.pi / 2
            if abs(self.arm().yaw() + wrap(yaw - nut_yaw)) > self.config.hand_yaw_limit:
                continue
            hand = peg[:2] + handle_offset * np.array([np.cos(yaw), np.sin(yaw)])
            if np.linalg.norm(hand - base) < best_distance:
                best, best_distance = yaw, float(np.linalg.norm(hand - base))
        return best

    def step(self) -> np.ndarray:
        c, arm, env = self.config, self.arm(), self.sim_env
        nut_body = env.nuts[env.nut_to_id["square"]].root_body
        nut = self.body_pos(nut_body)
        nut_yaw = body_yaw(self.body_xmat(nut_body))
        handle = self.site_pos("SquareNut_handle_site")
        peg = np.array(env.sim.data.body_xpos[env.peg1_body_id])
        table_z = env.table_offset[2]
        # The handle runs along the nut's x axis: close the fingers across it (closing axis = nut y axis).
        grasp_yaw = arm.yaw() + wrap(nut_yaw - arm.yaw(), np.pi)
        squared = abs(wrap(grasp_yaw - arm.yaw())) < c.yaw_tolerance
        action = self.grasp(handle, rot_z(grasp_yaw) @ DOWN, "lift", depth=c.grasp_depth, squared=squared)
        if action is not None:
            if self.phase == "lift":  # the fingers have just closed: choose where the nut goes
                self.nut_goal_yaw = self.choose_nut_yaw(nut_yaw, float(np.linalg.norm((handle - nut)[:2])), peg)
            return action
        # Held: the nut turns with the hand. Square it to the peg (quarter-turn symmetric) by turning the hand.
        yaw_error = wrap(self.nut_goal_yaw - nut_yaw)
        hold_rot = rot_z(arm.yaw() + yaw_error) @ DOWN
        hand_minus_nut = arm.pos() - nut
        if self.phase in ("lift", "align") and np.linalg.norm(hand_minus_nut) > c.grasp_lost_distance:
            self.goto("above")  # the nut slipped or was never held: open and grasp again
            return arm.action(arm.pos() + [0, 0, 0.05], rot_z(arm.yaw()) @ DOWN, OPEN)
        if self.phase == "lift":
            target = np.array([arm.pos()[0], arm.pos()[1], table_z + c.carry_height + hand_minus_nut[2]])
            return self.move_until(target, hold_rot, CLOSE, "align", 2 * c.tolerance, stall=False)
        if self.phase == "align":
            height = c.carry_height if np.linalg.norm(nut[:2] - peg[:2]) > 0.02 else c.drop_height
            target = np.array([*(peg[:2] + hand_minus_nut[:2]), table_z + height + hand_minus_nut[2]])
            aligned = np.linalg.norm(nut[:2] - peg[:2]) < c.align_tolerance and abs(yaw_error) < c.align_yaw_tolerance
            aligned = aligned and abs(nut[2] - (table_z + c.drop_height)) < 0.01 and self._speeds[0] < c.still_speed
            self.aligned_steps = self.aligned_steps + 1 if aligned else 0
            if self.aligned_steps >= c.settle_steps or self.phase_steps > c.phase_timeout:
                self.goto("release")
                self.release_pos = arm.pos()
            return arm.action(target, hold_rot, CLOSE)
        # Open where the hand is (moving while opening knocks the nut off the axis), then back off upwards.
        target = self.release_pos + ([0, 0, 0.1] if self.phase_steps > c.rise_after else 0.0)
        return arm.action(target, rot_z(arm.yaw()) @ DOWN, OPEN)


# ---------------------------------------------------------------------------------------------------- Transport
@dataclass
class TransportExpertConfig:
    gains: OSCGains = field(default_factory=OSCGains)
    tolerance: float = 0.015
    approach_height: float = 0.08
    carry_z: float = 1.12  # world height of the hand while carrying (clears bins and the lid)
    close_steps: int = 10
    open_steps: int = 10
    lid_drop_xy: tuple[float, float] = (-0.2, -0.45)  # free spot on robot0's table for the lid
    lid_release_z: float = 1.02
    # The hammer (49 g, its centre of mass 5.3 cm from the handle's centre towards the head) turns about the
    # fingers' closing axis when held far from that centre: each hand holds the handle as near to it as the other
    # hand allows.
    grasp_gap: float = 0.10  # between the two hands along the handle at the handover (hands leaning apart)
    handle_reach: float = 0.085  # |grasp| from the handle's centre: its ends are at 0.1, the head beyond one
    hold_distance: float = 0.03  # grip site to the handle's axis while holding it
    min_grip_width: float = 0.01  # finger opening while holding the 3 cm handle (0.03; empty and closed: 0)
    lift_speed: float = 0.3  # position action while lifting the hammer: a jerk swings it in the grasp
    attempts: int = 3  # grasps per arm before giving up
    # Handover: the two grasp points either side of the gap between the tables. robot1's hand leans towards
    # robot0 so that its wrist stays back: upright, it reaches there at full stretch (the elbow on its stop),
    # where the OSC cannot pull the hand back. robot0 stays upright: leaning would tilt the handle it holds.
    handover_x: float = 0.0
    handover_z: float = 1.04  # about the grip-site height of longest reach (wrist centre near shoulder height)
    handover_tilt: float = 0.5  # radians from vertical, robot1's hand towards robot0
    approach_speed: float = 0.4  # position action of robot1's last approach (no overshoot into the stretch)
    robot1_wait_y: float = 0.3  # robot1 waits here (arm bent, out of robot0's way) for the handover
    # robot1 carries the hammer (which may hang from its grasp) with its lowest point above the bins' rims
    # (0.96) and lets go with it this high, over the target bin.
    clear_z: float = 1.0
    release_low_z: float = 0.88
    trash_release_z: float = 1.0  # hand height when letting go of the trash over its bin
    bin_margin: float = 0.08  # the hammer's centre of mass this far inside the target bin's walls to let go
    move_timeout: int = 120


class TransportExpert:
    """Two scripted arms: robot0 takes the lid off the start bin and hands the hammer over; robot1 first moves
    the trash cube to the trash bin, then takes the hammer and drops it into the target bin.

    Each arm runs a generator that yields its 7-d action per step (straight-line code for a waypoint
    sequence); the two synchronise through flags at the handover. A grasp is checked (fingers apart and
    around the handle) before anything relies on it; a hammer dropped on an arm's own table is picked up again.
    """

    def __init__(self, env, config: TransportExpertConfig | None = None):
        self.env = env
        self.config = config or TransportExpertConfig()
        self.reset()

    @property
    def sim_env(self):
        return self.env.sim_env

    def reset(self) -> None:
        self._arms: list[Arm] | None = None
        self.flags: set[str] = set()
        self.log: list[tuple[str, int]] = []  # (event, episode step): where episodes go wrong
        self.t = 0
        self._scripts = None

    def arm(self, i: int) -> Arm:
        if self._arms is None:
            self._arms = [Arm(self.sim_env, k, self.config.gains) for k in range(2)]
        return self._arms[i]

    def act(self, obs) -> np.ndarray:
        if self._scripts is None:
            self._scripts = [self._robot0(), self._robot1()]
            self._last = [np.zeros(7, np.float32), np.zeros(7, np.float32)]
        self.t += 1
        actions = []
        for i, script in enumerate(self._scripts):
            try:
                self._last[i] = next(script)
            except StopIteration:  # script done: stay put, keep the gripper command
                self._last[i] = np.concatenate([np.zeros(6), self._last[i][6:]]).astype(np.float32)
            actions.append(self._last[i])
        return np.clip(np.concatenate(actions), -1.0, 1.0).astype(np.float32)

    def event(self, name: str) -> None:
        self.flags.add(name)
        self.log.append((name, self.t))

    # ---------------------------------------------------------------- primitives (generators)
    def _hand_rot(self, i, yaw, tilt=0.0):
        """The hand down at ``yaw``, leaning ``tilt`` radians towards the other arm (robot0 +y, robot1 -y): a turn
        about world x, i.e. about the closing axis when the fingers close across a handle that runs along y."""
        toward = 1.0 if i == 0 else -1.0
        return Rotation.from_rotvec([toward * tilt, 0.0, 0.0]).as_matrix() @ rot_z(yaw) @ DOWN

    def _move(self, i, target_fn, yaw, gripper, tolerance=None, timeout=None, tilt=0.0, speed=1.0):
        """Drive arm i to target_fn() (re-evaluated every step) with the hand at (yaw, tilt)."""
        c, arm = self.config, self.arm(i)
        tolerance = tolerance or c.tolerance
        last, still = arm.pos(), 0
        for _ in range(timeout or c.move_timeout):
            target = np.asarray(target_fn())
            if np.linalg.norm(arm.pos() - target) < tolerance:
                return
            still = still + 1 if np.linalg.norm(arm.pos() - last) < 5e-4 else 0
            if still >= 8:  # blocked (table, bin floor, reach): stop here
                return
            last = arm.pos()
            action = arm.action(target, self._hand_rot(i, yaw, tilt), gripper)
            action[:3] = np.clip(action[:3], -speed, speed)
            yield action

    def _wait(self, i, steps, yaw, gripper, until=None, tilt=0.0):
        arm = self.arm(i)
        hold = arm.pos()
        count = 0
        while (until is None and count < steps) or (until is not None and until not in self.flags):
            count += 1
            yield arm.action(hold, self._hand_rot(i, yaw, tilt), gripper)

    def _square_yaw(self, i, direction_yaw, period):
        """The yaw congruent to direction_yaw (mod period) closest to the arm's current yaw."""
        current = self.arm(i).yaw()
        return current + wrap(direction_yaw - current, period)

    def _body(self, name):
        return np.array(self.sim_env.sim.data.get_body_xpos(name))

    # ---------------------------------------------------------------- the hammer
    def _hammer(self):
        """Handle centre, the handle's axis turned to point at robot1 (+y), and where the centre of mass is
        along that axis (the head makes it heavy on one side)."""
        model = self.sim_env.sim.model
        xmat = np.array(self.sim_env.sim.data.get_body_xmat("payload_root")).reshape(3, 3)
        sign = 1.0 if xmat[1, 2] >= 0 else -1.0
        com = float(model.body_ipos[model.body_name2id("payload_root")][2])  # along the body's z (the handle)
        return self._body("payload_root"), sign * xmat[:, 2], sign * com

    def _handle_point(self, s: float) -> np.ndarray:
        centre, axis, _ = self._hammer()
        return centre + s * axis

    def _along_handle(self, i) -> float:
        """Where arm i's grip site is along the handle (signed, from its centre, towards robot1)."""
        centre, axis, _ = self._hammer()
        return float((self.arm(i).pos() - centre) @ axis)

    def _holding(self, i) -> bool:
        """Arm i has the handle between its fingers: fingers stopped apart, grip site on the handle."""
        centre, axis, _ = self._hammer()
        rel = self.arm(i).pos() - centre
        s = float(np.clip(rel @ axis, -0.1, 0.1))
        robot = self.sim_env.robots[i]
        fingers = self.sim_env.sim.data.qpos[robot._ref_gripper_joint_pos_indexes["right"]]
        return bool(np.linalg.norm(rel - s * axis) < self.config.hold_distance
                    and fingers[0] - fingers[1] > self.config.min_grip_width)

    def _handover_grasps(self) -> tuple[float, float]:
        """Where robot0 and robot1 hold the handle at the handover: grasp_gap apart, straddling the centre of
        mass as evenly as the handle allows."""
        c = self.config
        _, _, com = self._hammer()
        s0 = float(np.clip(com - c.grasp_gap / 2, -c.handle_reach, c.handle_reach - c.grasp_gap))
        return s0, s0 + c.grasp_gap

    def _lowest(self) -> float:
        """Height of the hammer's lowest end (it may hang steeply from one hand)."""
        centre, axis, _ = self._hammer()
        return float(min((centre + e * axis)[2] for e in (-0.13, 0.13)))

    # ---------------------------------------------------------------- shared steps
    def _pick(self, i, s_fn):
        """Take the handle at s_fn() from above (hand down, fingers across it) and lift it slowly to the carry
        height. Returns the hand's yaw; opens again if the hammer did not come up with the hand."""
        c, arm = self.config, self.arm(i)
        _, axis, _ = self._hammer()
        yaw = self._square_yaw(i, np.arctan2(axis[1], axis[0]), np.pi)
        grasp = lambda: self._handle_point(s_fn())  # noqa: E731
        yield from self._move(i, lambda: [*grasp()[:2], c.carry_z], yaw, OPEN)  # above the bin's rim first
        yield from self._move(i, lambda: grasp() - [0, 0, 0.005], yaw, OPEN, tolerance=0.006)
        yield from self._wait(i, c.close_steps, yaw, CLOSE)
        yield from self._move(i, lambda: [*arm.pos()[:2], c.carry_z], yaw, CLOSE, speed=c.lift_speed)
        if not self._holding(i):
            self.event(f"robot{i}_missed_hammer")
            yield from self._wait(i, c.open_steps, yaw, OPEN)
        return yaw

    def _reachable(self, i) -> bool:
        """The hammer lies on arm i's own table (a drop between the tables is lost)."""
        centre, _, _ = self._hammer()
        return bool(centre[2] > 0.75 and (centre[1] < -0.15 if i == 0 else centre[1] > 0.15))

    # ---------------------------------------------------------------- the two arms
    def _robot0(self):
        c, arm = self.config, self.arm(0)
        yield from self._remove_lid()
        for _ in range(c.attempts):
            if not self._reachable(0):
                return  # fell between the tables (or onto robot1's side): nothing robot0 can do
            yaw = yield from self._pick(0, lambda: self._handover_grasps()[0])
            if not self._holding(0):
                continue
            yaw = yield from self._to_handover(yaw)
            if self._holding(0):
                break
            self.event("robot0_dropped_hammer")
            yield from self._wait(0, c.open_steps, yaw, OPEN)
        else:
            return  # out of attempts
        self.event("hammer_at_handover")
        yield from self._wait(0, 0, yaw, CLOSE, until="robot1_holds_hammer")
        yield from self._wait(0, c.open_steps, yaw, OPEN)
        # Straight up first (sideways the open fingers would drag the handle), then away.
        out = arm.pos() + [0, 0, 0.1]
        yield from self._move(0, lambda: out, yaw, OPEN)
        yield from self._move(0, lambda: out + [0, -0.1, 0.05], yaw, OPEN)
        self.event("robot0_clear")

    def _remove_lid(self):
        c, arm = self.config, self.arm(0)
        up = np.array([0.0, 0.0, c.approach_height])
        # the lid's handle runs along the lid's y axis, so close the fingers along its x axis
        lid = "transport_start_bin_lid_root"
        handle = lambda: np.array(self.sim_env.transport.lid_handle_pos)  # noqa: E731
        lid_x = np.array(self.sim_env.sim.data.get_body_xmat(lid)).reshape(3, 3)[:, 0]
        yaw = self._square_yaw(0, np.arctan2(lid_x[1], lid_x[0]) - np.pi / 2, np.pi)
        yield from self._move(0, lambda: handle() + up, yaw, OPEN)
        yield from self._move(0, lambda: handle() - [0, 0, 0.005], yaw, OPEN, tolerance=0.006)
        yield from self._wait(0, c.close_steps, yaw, CLOSE)
        yield from self._move(0, lambda: [arm.pos()[0], arm.pos()[1], c.carry_z], yaw, CLOSE)
        yield from self._move(0, lambda: [*c.lid_drop_xy, c.carry_z], yaw, CLOSE)
        yield from self._move(0, lambda: [*c.lid_drop_xy, c.lid_release_z], yaw, CLOSE)
        yield from self._wait(0, c.open_steps, yaw, OPEN)
        yield from self._move(0, lambda: [*c.lid_drop_xy, c.carry_z], yaw, OPEN)

    def _to_handover(self, yaw):
        """robot0 carries the hammer over the gap between the tables, its handle level and along y, the two
        grasp points symmetric about the gap. Returns the hand's yaw."""
        c, arm = self.config, self.arm(0)
        _, axis, _ = self._hammer()
        yaw = yaw + wrap(np.pi / 2 - np.arctan2(axis[1], axis[0]))  # handle along +y
        s0, s1 = self._handover_grasps()
        middle = np.array([c.handover_x, 0.0, c.handover_z])

        def hand_target(dz=0.0):
            # the hand where the midpoint between the two grasps lands on the handover point
            return middle + [0, 0, dz] + (arm.pos() - self._handle_point((s0 + s1) / 2))

        yield from self._move(0, lambda: hand_target(c.carry_z - c.handover_z), yaw, CLOSE)
        yield from self._move(0, hand_target, yaw, CLOSE, tolerance=0.008)
        yield from self._wait(0, 10, yaw, CLOSE)  # let the hammer settle
        return yaw

    def _robot1(self):
        c, arm = self.config, self.arm(1)
        yield from self._trash()
        yaw = arm.yaw()
        yield from self._move(1, lambda: [c.handover_x, c.robot1_wait_y, c.carry_z], yaw, OPEN)
        yield from self._wait(1, 0, yaw, OPEN, until="hammer_at_handover")
        yaw = yield from self._take_over()
        if "robot1_holds_hammer" not in self.flags:
            return
        yield from self._wait(1, 0, yaw, CLOSE, until="robot0_clear", tilt=c.handover_tilt)
        for _ in range(c.attempts):
            if self._holding(1):
                yield from self._drop_in_target_bin(yaw)
            if self.sim_env.transport.payload_in_target_bin or not self._reachable(1):
                return
            self.event("robot1_regrasps")  # dropped on robot1's table: pick it up by its centre of mass
            yaw = yield from self._pick(1, lambda: float(np.clip(self._hammer()[2], -c.handle_reach, c.handle_reach)))

    def _trash(self):
        """The trash cube (square the fingers to its faces) into the trash bin."""
        c, arm = self.config, self.arm(1)
        transport = self.sim_env.transport
        trash = lambda: np.array(transport.trash_pos)  # noqa: E731
        trash_yaw = body_yaw(self.sim_env.sim.data.get_body_xmat("trash_main"))
        yaw = self._square_yaw(1, trash_yaw, np.pi / 2)
        yield from self._move(1, lambda: [*trash()[:2], c.carry_z], yaw, OPEN)  # above the bin's rim first
        yield from self._move(1, lambda: trash() - [0, 0, 0.005], yaw, OPEN, tolerance=0.006)
        yield from self._wait(1, c.close_steps, yaw, CLOSE)
        yield from self._move(1, lambda: [arm.pos()[0], arm.pos()[1], c.carry_z], yaw, CLOSE)
        bin_xy = np.array(transport.trash_bin_pos[:2])
        yield from self._move(1, lambda: [*bin_xy, c.carry_z], yaw, CLOSE)
        yield from self._move(1, lambda: [*bin_xy, c.trash_release_z], yaw, CLOSE)
        yield from self._wait(1, c.open_steps, yaw, OPEN)
        yield from self._move(1, lambda: [*bin_xy, c.carry_z], yaw, OPEN)

    def _take_over(self):
        """robot1 takes the handle on its side of robot0's hand, leaning towards robot0, and only reports the
        hammer as held once its fingers have stopped on the handle (robot0 keeps holding until then)."""
        c = self.config
        _, axis, _ = self._hammer()
        yaw = self._square_yaw(1, np.arctan2(axis[1], axis[0]), np.pi)
        pointing = self._hand_rot(1, yaw, c.handover_tilt)[:, 2]
        grasp = lambda: self._handle_point(  # noqa: E731
            min(self._along_handle(0) + c.grasp_gap, c.handle_reach))
        for _ in range(c.attempts):
            # from behind the grasp point along the fingers, then in
            yield from self._move(1, lambda: grasp() - c.approach_height * pointing, yaw, OPEN, tilt=c.handover_tilt)
            yield from self._move(1, grasp, yaw, OPEN, tolerance=0.006, tilt=c.handover_tilt, speed=c.approach_speed)
            yield from self._wait(1, c.close_steps, yaw, CLOSE, tilt=c.handover_tilt)
            if self._holding(1):
                self.event("robot1_holds_hammer")
                return yaw
            self.event("robot1_missed_handover")
            yield from self._wait(1, c.open_steps, yaw, OPEN, tilt=c.handover_tilt)
            yield from self._move(1, lambda: grasp() - c.approach_height * pointing, yaw, OPEN, tilt=c.handover_tilt)
        return yaw

    def _drop_in_target_bin(self, yaw):
        """Back towards robot1's base (upright again), up until the hammer clears the rims, over the target bin
        with its centre of mass, down, and let go once it is inside the walls."""
        c, arm = self.config, self.arm(1)
        transport = self.sim_env.transport

        def com_xy():
            centre, axis, com = self._hammer()
            return (centre + com * axis)[:2]

        def carry_z():
            return max(c.carry_z, arm.pos()[2] + c.clear_z - self._lowest())

        def over_bin(z_fn):
            goal = np.array(transport.target_bin_pos[:2])
            return np.array([*(goal + arm.pos()[:2] - com_xy()), z_fn()])

        # Straight back first at the same height: near full reach, lifting runs the elbow onto its stop.
        retreat = np.array([arm.pos()[0], c.robot1_wait_y, arm.pos()[2]])
        yield from self._move(1, lambda: retreat, yaw, CLOSE)
        yield from self._move(1, lambda: [*arm.pos()[:2], carry_z()], yaw, CLOSE)
        yield from self._move(1, lambda: over_bin(carry_z), yaw, CLOSE)
        yield from self._move(1, lambda: over_bin(lambda: arm.pos()[2] + c.release_low_z - self._lowest()),
                              yaw, CLOSE)
        if not self._holding(1):
            self.event("robot1_dropped_hammer")
            return
        inside = np.abs(com_xy() - transport.target_bin_pos[:2]) < np.array(transport.bin_size[:2]) / 2 - c.bin_margin
        if not inside.all():
            self.event("robot1_off_bin")
        yield from self._wait(1, c.open_steps, yaw, OPEN)
        yield from self._move(1, lambda: [*arm.pos()[:2], c.carry_z], yaw, OPEN)


# ---------------------------------------------------------------------------------------------------- ToolHang
def turned(start: np.ndarray, end: np.ndarray, angle: float) -> np.ndarray:
    """The rotation ``angle`` radians from start towards end along the shortest path (end once within reach)."""
    rotvec = Rotation.from_matrix(end @ start.T).as_rotvec()
    total = float(np.linalg.norm(rotvec))
    if total <= angle:
        return end
    return Rotation.from_rotvec(rotvec * (angle / total)).as_matrix() @ start


def held_pose(arm: Arm, point: np.ndarray, rot: np.ndarray, want_point: np.ndarray, want_rot: np.ndarray):
    """Hand pose that puts a rigidly held object's (point, rot) at (want_point, want_rot)."""
    hand_in_object = rot.T @ (arm.pos() - point)
    return want_point + want_rot @ hand_in_object, want_rot @ rot.T @ arm.rot()


class ArmKinematics:
    """Forward and inverse kinematics of one Panda on a scratch copy of the sim's state (the sim is untouched).

    Used where the straight end-effector path between two poses would fold the arm into its joint limits: the
    expert then moves along a line in joint space (its targets are the poses of the configurations on it), and
    picks grasps whose later poses have an IK solution clear of the limits.
    """

    def __init__(self, sim_env, index: int = 0):
        import mujoco

        self._mujoco = mujoco
        robot = sim_env.robots[index]
        self.model = sim_env.sim.model._model
        self.live = sim_env.sim.data._data
        self.data = mujoco.MjData(self.model)
        self.qpos_ids = np.array(robot._ref_joint_pos_indexes)
        self.dof_ids = np.array(robot._ref_joint_vel_indexes)
        self.low, self.high = self.model.jnt_range[robot._ref_joint_indexes].T
        self.site = robot.eef_site_id["right"]
        self.home = np.array(robot.init_qpos, dtype=float)  # the posture the OSC's null space pulls towards

    def q(self) -> np.ndarray:
        return np.array(self.live.qpos[self.qpos_ids])

    def margin(self, q: np.ndarray) -> float:
        """Smallest distance of any joint to its limit, radians."""
        return float(np.min(np.minimum(q - self.low, self.high - q)))

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.data.qpos[:] = self.live.qpos
        self.data.qpos[self.qpos_ids] = q
        self._mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def ik(self, pos, rot, q0: np.ndarray | None = None, iters: int = 150):
        """Damped least squares from q0 (default: the current configuration), pulled towards the home posture in
        the null space and clamped to the joint limits. Returns (q, reached)."""
        mj, m, d = self._mujoco, self.model, self.data
        q = self.q() if q0 is None else np.array(q0, dtype=float)
        jac_pos, jac_rot = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iters):
            p, r = self.fk(q)
            mj.mj_comPos(m, d)
            err = np.concatenate([pos - p, Rotation.from_matrix(rot @ r.T).as_rotvec()])
            if np.linalg.norm(err[:3]) < 2e-3 and np.linalg.norm(err[3:]) < 0.02:
                return q, True
            mj.mj_jacSite(m, d, jac_pos, jac_rot, self.site)
            jac = np.vstack([jac_pos, jac_rot])[:, self.dof_ids]
            dq = jac.T @ np.linalg.solve(jac @ jac.T + 1e-3 * np.eye(6), err)
            dq += (np.eye(len(q)) - np.linalg.pinv(jac) @ jac) @ (0.1 * (self.home - q))
            q = np.clip(q + np.clip(dq, -0.2, 0.2), self.low, self.high)
        return q, False


@dataclass
class ToolHangExpertConfig:
    gains: OSCGains = field(default_factory=lambda: OSCGains(max_rot_action=0.3))
    approach_height: float = 0.06
    tolerance: float = 0.01
    close_steps: int = 15
    open_steps: int = 10
    turn_rate: float = 0.05  # radians per step of a held object's target orientation
    turn_tolerance: float = 0.05  # radians, held object to its target orientation before moving on
    # The frame: grasped by its grip lying down, turned upright (its tip 18.5 cm below the grip) above the lift
    # height, then its tip lowered into the stand's mount (1 cm walls, 7.5 mm bar: 1.2 mm play each side).
    frame_lift_z: float = 1.22  # hand height while turning the frame: the tip clears the stand's walls
    # Yaw of the upright frame, chosen from the IK margins of the frame's and the tool's poses (joint limits):
    # 90 degrees puts the hook's free end at -y, so the hand holding the tool on the hook points left along it,
    # half a metre in front of the base. 0 (free end towards the robot) stands the frame as reliably, but its
    # threading pose (hand pointing forward, 30 cm from the base) folds the elbow into its stop; -90 degrees
    # runs the wrist (joint 5) into its stop while turning the frame.
    frame_yaw: float = np.pi / 2
    turn_offset: tuple[float, float] = (0.0, -0.1)  # hand xy relative to the mount while turning the frame
    hover_height: float = 0.03  # tip above the mount's walls before lowering
    # metres per step the tip's target goes down while inserting. 14 mm pushes through more wedges under execution
    # noise (data/toolhang-abs-dart was collected with it) but costs threading later: 0.82 against 0.94 on seeds
    # 0-49 under delta control (step eval --task toolhang --agent expert --episodes 50).
    insert_step: float = 0.008
    # A tip that wedges near the bottom of the hole stops descending, and rising 12 mm to try again did not free it
    # (tried): let go there. Measured as descent over a window, since execution noise keeps the hand moving.
    jam_window: int = 8  # steps over which the tip must descend jam_drop to count as moving
    jam_drop: float = 0.0015
    settle_height: float = 0.03  # a jam this close above the release height lets go
    insert_depth: float = 0.012  # tip above the base's top surface when letting go (success needs < 0.017)
    align_tolerance: float = 0.0015  # tip to the mount's axis before lowering
    # The tool: grasped by its grip, turned so its hole's axis runs along the hook with the hole on top, and
    # pitched 45 degrees (hole leaning towards the post) so the hook's upright end passes through the hole.
    tool_lift_z: float = 1.15
    tool_stage_back: float = 0.12  # hand this far back from the hook's free end while turning the tool
    thread_pitch: float = np.pi / 4
    hole_tolerance: float = 0.002  # hole centre to a threading waypoint
    # Threading waypoints of the hole centre: (along the hook from its free end, above the hook's axis), metres.
    thread_path: tuple[tuple[float, float], ...] = (
        (-0.06, 0.03), (-0.025, 0.00975), (0.004, 0.00975), (0.004, 0.0), (0.025, 0.0))
    waypoint_timeout: int = 40  # steps at a threading waypoint before moving on to the next
    rest_drop: float = 0.004  # lower the hole this far below the hook's axis before letting go
    back_off: float = 0.08  # hand retreats along its pointing axis after letting go
    clear_height: float = 0.12  # the hand rises this far above the released frame before unwinding
    unwind_step: float = 0.15  # radians per joint per step of the unwinding target
    unwind_tolerance: float = 0.3  # radians, the shoulder and elbow joints (0-3) to the home posture to end it
    joint_step: float = 0.06  # radians per step (largest joint) along a joint-space move's line
    phase_timeout: int = 150


class ToolHangExpert(PhaseExpert):
    """Stand the frame in the stand's mount, then thread the tool's hole onto the frame's hook and let go.

    Held objects are steered through the grasp: the hand target is the pose that puts the object where it
    should be (``held_pose``), so grasp offsets and slip are corrected every step. The frame stands with its
    hook's free end at -y (``frame_yaw``); after it the arm unwinds to its home posture through joint space,
    takes the tool at the yaw whose later poses keep furthest from the joint limits (``plan_tool``), turns it
    through joint space, and threads its hole onto the hook along waypoints.
    """

    phases = ("frame_above", "frame_descend", "frame_close", "frame_lift", "frame_turn",
              "frame_over", "frame_insert", "frame_release", "frame_back", "frame_up",
              "tool_unwind", "tool_above", "tool_descend", "tool_close", "tool_lift", "tool_turn", "tool_thread",
              "tool_unpitch", "tool_rest", "tool_release", "tool_back")

    def __init__(self, env, config: ToolHangExpertConfig | None = None):
        self.config = config or ToolHangExpertConfig()
        self.gains = self.config.gains
        super().__init__(env)

    def reset(self) -> None:
        super().reset()
        self.turn_start = None  # held object's orientation when the current turn began
        self.waypoint = 0
        self.hold_pos = None
        self.log: list[tuple[str, int]] = []  # (phase entered, episode step): where episodes stall
        self.t = 0
        self._kinematics: ArmKinematics | None = None  # built lazily, like the arms
        self.tool_yaw: float | None = None  # the hand's yaw grasping the tool, chosen once (plan_tool)
        self.q_turned = None  # configuration holding the tool turned for threading (set when the turn begins)
        self.path_start = None  # configuration where the current joint-space move began
        self.tip_heights: list[float] = []  # the frame tip's height at each step of frame_insert (jams)

    def goto(self, phase: str) -> None:
        super().goto(phase)
        self.turn_start = None
        self.tip_heights = []
        self.log.append((phase, self.t))

    def act(self, obs) -> np.ndarray:
        self.t += 1
        return super().act(obs)

    # ---------------------------------------------------------------- scene
    def frame(self):
        """Frame tip (the end that goes into the mount) and orientation (z: along the post, x: along the hook
        away from its free end)."""
        return self.site_pos("frame_tip_site"), self.body_xmat(self.sim_env.frame.root_body)

    def mount(self) -> tuple[np.ndarray, float]:
        """Centre of the mount's hole (xy, top z) and the base's top surface height."""
        walls = [np.array(self.sim_env.sim.data.get_geom_xpos(f"stand_wall{i}")) for i in range(4)]
        sizes = self.sim_env.sim.model.geom_size
        top = walls[0][2] + sizes[self.sim_env.sim.model.geom_name2id("stand_wall0")][2]
        base = self.sim_env.sim.data.get_geom_xpos("stand_base")
        base_top = base[2] + sizes[self.sim_env.sim.model.geom_name2id("stand_base")][2]
        return np.array([*np.mean(walls, axis=0)[:2], top]), float(base_top)

    def tool(self):
        return self.site_pos("tool_hole1_center"), self.body_xmat(self.sim_env.tool.root_body)

    def hook(self):
        """Free end of the hook (on its axis) and the unit direction from there towards the post."""
        free_end = self.site_pos("frame_hang_site")
        along = self.site_pos("frame_intersection_site") - free_end
        return free_end, along / np.linalg.norm(along)

    def tool_goal_rot(self, pitch: float) -> np.ndarray:
        """Tool orientation for threading: hole axis (tool z) against the hook direction, handle (tool x) down
        from the hole, leaning back by ``pitch`` so the hole's top leads towards the post."""
        _, d = self.hook()
        d = np.array([d[0], d[1], 0.0]) / np.linalg.norm(d[:2])
        up = np.array([0.0, 0.0, 1.0])
        x = -np.cos(pitch) * up - np.sin(pitch) * d
        z = -np.cos(pitch) * d + np.sin(pitch) * up
        return np.column_stack([x, np.cross(z, x), z])

    def turn(self, rot: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """Target orientation of a held object turning at the configured rate from where the turn began."""
        if self.turn_start is None:
            self.turn_start = rot
        return turned(self.turn_start, goal, self.config.turn_rate * self.phase_steps)

    # ---------------------------------------------------------------- phases
    def step(self) -> np.ndarray:
        if self.phase.startswith("frame"):
            return self.frame_step()
        if self.phase == "tool_unwind":
            return self.unwind_step()
        return self.tool_step()

    def frame_step(self) -> np.ndarray:
        c, arm = self.config, self.arm()
        tip, rot = self.frame()
        grip = np.array(self.sim_env.sim.data.get_geom_xpos("frame_grip_frame"))
        timed_out = self.phase_steps > c.phase_timeout
        if self.phase in ("frame_above", "frame_descend", "frame_close"):
            # The frame lies on its side: close the fingers across the grip, along the hook (frame x).
            x = rot[:, 0]
            yaw = self.grasp_yaw(np.arctan2(-x[0], x[1]), rot_z(c.frame_yaw) @ rot.T)
            return self.grasp(grip, rot_z(yaw) @ DOWN, "frame_lift", prefix="frame_", close_rot=arm.rot())
        mount, base_top = self.mount()
        goal = rot_z(c.frame_yaw)
        if self.phase == "frame_lift":
            # Up and over the mount, still lying flat: the turn happens where the arm is least stretched.
            target = np.array([*(mount[:2] + c.turn_offset), c.frame_lift_z])
            if reached(arm, target, 2 * c.tolerance) or self.stalled() or timed_out:
                self.goto("frame_turn")
                self.hold_pos = target
            return arm.action(target, arm.rot(), CLOSE)
        if self.phase == "frame_turn":
            # Upright (post vertical, tip down) and at the goal yaw, turning about the grip.
            _, hand_rot = held_pose(arm, tip, rot, tip, self.turn(rot, goal))
            if self.rot_error(rot, goal) < c.turn_tolerance or timed_out:
                self.goto("frame_over")
            return arm.action(self.hold_pos, hand_rot, CLOSE)
        if self.phase == "frame_over":
            want = mount + [0, 0, c.hover_height]
            hand, hand_rot = held_pose(arm, tip, rot, want, goal)
            if np.linalg.norm(tip - want) < c.align_tolerance * 2 or timed_out:
                self.goto("frame_insert")
            return arm.action(hand, hand_rot, CLOSE)
        if self.phase == "frame_insert":
            depth = base_top + c.insert_depth
            want = np.array([*mount[:2], max(depth, tip[2] - c.insert_step)])
            hand, hand_rot = held_pose(arm, tip, rot, want, goal)
            self.tip_heights.append(float(tip[2]))
            jammed = len(self.tip_heights) > c.jam_window and \
                self.tip_heights[-1 - c.jam_window] - tip[2] < c.jam_drop
            low = tip[2] < depth + c.settle_height
            if tip[2] < depth + 0.003 or (jammed and low) or timed_out:
                self.goto("frame_release")
                self.hold_pos = arm.pos()
            return arm.action(hand, hand_rot, CLOSE)
        if self.phase == "frame_release":
            if self.phase_steps >= c.open_steps:
                self.goto("frame_back")
                self.hold_pos = arm.pos() - c.back_off * arm.rot()[:, 2]
            return arm.action(self.hold_pos, arm.rot(), OPEN)
        # frame_back: straight out along the fingers, then up clear of the frame, then back to the home posture
        if reached(arm, self.hold_pos, 2 * c.tolerance) or self.stalled() or timed_out:
            if self.phase == "frame_back":
                self.goto("frame_up")
                self.hold_pos = arm.pos() + [0, 0, c.clear_height]
            else:
                self.goto("tool_unwind")
        return arm.action(self.hold_pos, arm.rot(), OPEN)

    def unwind_step(self) -> np.ndarray:
        """Back to the home posture through joint space: from the frame's pose (the hand pointing back) the straight
        end-effector path to the tool folds the arm into its limits. Each target is the pose of the configuration
        a step from the current one towards home; the OSC's null space pulls towards the same posture."""
        c, kin = self.config, self.kinematics()
        q = kin.q()
        # The wrist joints (4-6) are left to the next phases: waiting for them parks the hand low beside the frame,
        # where the path to the tool runs into it.
        if np.max(np.abs(kin.home - q)[:4]) < c.unwind_tolerance or self.phase_steps > c.phase_timeout:
            self.goto("tool_above")
        pos, rot = kin.fk(q + np.clip(kin.home - q, -c.unwind_step, c.unwind_step))
        return self.arm().action(pos, rot, OPEN)

    def kinematics(self) -> ArmKinematics:
        if self._kinematics is None:
            self._kinematics = ArmKinematics(self.sim_env)
        return self._kinematics

    def joint_target(self, q_goal: np.ndarray) -> np.ndarray:
        """The configuration on the straight joint-space line from where the phase began to q_goal, joint_step
        radians (largest joint) per step along it; q_goal once there."""
        if self.phase_steps == 0 or self.path_start is None:
            self.path_start = self.kinematics().q()
        span = max(float(np.max(np.abs(q_goal - self.path_start))), 1e-6)
        done = min(1.0, (self.phase_steps + 1) * self.config.joint_step / span)
        return self.path_start + done * (q_goal - self.path_start)

    def joint_action(self, q_goal: np.ndarray, gripper: float) -> np.ndarray:
        """Towards q_goal through joint space: the target is the pose of joint_target's configuration. The OSC
        tracks poses and leaves the elbow to its null space, so the path is planned from the phase's start (not
        from the current configuration, which would let the hand drift with the elbow)."""
        pos, rot = self.kinematics().fk(self.joint_target(q_goal))
        return self.arm().action(pos, rot, gripper)

    def joint_move_done(self, q_goal: np.ndarray) -> bool:
        """The joint-space line is run through and the hand has reached q_goal's pose."""
        if not np.allclose(self.joint_target(q_goal), q_goal):
            return False
        pos, rot = self.kinematics().fk(q_goal)
        return reached(self.arm(), pos, self.config.tolerance) and self.rot_error(self.arm().rot(), rot) < 0.1

    def grasp_yaw(self, yaw: float, turn: np.ndarray) -> float:
        """Of the two hand yaws that close the fingers along the same axis (yaw, yaw + pi), the one whose hand,
        after the held object's ``turn`` (a world-frame rotation), is closest to the unwound wrist pointing the
        same way: the other one runs the last wrist joints into their stops."""
        arm = self.arm()

        def wound(a: float) -> float:
            hand = turn @ rot_z(a) @ DOWN
            z = hand[:, 2]
            x = np.cross(z, [0.0, 0.0, 1.0])
            x = x / max(np.linalg.norm(x), 1e-6)
            return self.rot_error(hand, np.column_stack([x, np.cross(z, x), z]))

        best = min((yaw, yaw + np.pi), key=wound)
        return arm.yaw() + wrap(best - arm.yaw())

    def plan_tool(self) -> None:
        """Choose the tool grasp backwards from the poses it leads to. The tool lies flat: the fingers close across
        its grip (along tool y) with the hand at one of two yaws. For each, solve IK (in order, from the current
        configuration) for the hand above the tool, on it, lifted, turned at the staging point, at the start and
        end of the threading path and level on the hook; keep the yaw whose poses stay furthest from the joint
        limits."""
        c, arm, kin = self.config, self.arm(), self.kinematics()
        hole, rot = self.tool()
        centre = self.body_pos(self.sim_env.tool.root_body)
        free_end, d = self.hook()
        up = np.array([0.0, 0.0, 1.0])
        stage = np.array([*(free_end[:2] - c.tool_stage_back * d[:2]), c.tool_lift_z])
        y = rot[:, 1]
        best_margin = -np.inf
        for yaw in (np.arctan2(-y[0], y[1]), np.arctan2(-y[0], y[1]) + np.pi):
            yaw = arm.yaw() + wrap(yaw - arm.yaw())
            hand_rot = rot_z(yaw) @ DOWN
            hand_in_tool, grip_in_tool = rot.T @ hand_rot, rot.T @ (centre - hole)  # the grasp, in tool coordinates
            pitched = self.tool_goal_rot(c.thread_pitch)
            poses = [(centre + [0, 0, c.approach_height], hand_rot), (centre, hand_rot),
                     (centre + [0, 0, c.tool_lift_z - centre[2]], hand_rot), (stage, pitched @ hand_in_tool)]
            for pitch, (along, above) in ((c.thread_pitch, c.thread_path[0]), (c.thread_pitch, c.thread_path[-1]),
                                          (0.0, (c.thread_path[-1][0], 0.0))):
                tool_rot = self.tool_goal_rot(pitch)
                poses.append((free_end + along * d + above * up + tool_rot @ grip_in_tool, tool_rot @ hand_in_tool))
            q, margin = kin.q(), np.inf
            for pos, r in poses:
                q, ok = kin.ik(pos, r, q)
                margin = min(margin, kin.margin(q) if ok else -1.0)
            self.log.append((f"tool_yaw {yaw:.2f} margin {margin:.2f}", self.t))
            if margin > best_margin:
                best_margin = margin
                self.tool_yaw = yaw

    def rot_error(self, rot: np.ndarray, goal: np.ndarray) -> float:
        return float(np.linalg.norm(Rotation.from_matrix(goal @ rot.T).as_rotvec()))

    def tool_step(self) -> np.ndarray:
        c, arm = self.config, self.arm()
        hole, rot = self.tool()
        centre = self.body_pos(self.sim_env.tool.root_body)
        timed_out = self.phase_steps > c.phase_timeout
        if self.phase in ("tool_above", "tool_descend", "tool_close"):
            # Flat on the table: close the fingers across the handle (tool x), i.e. along tool y, at the yaw
            # plan_tool chose.
            if self.tool_yaw is None:
                self.plan_tool()
            return self.grasp(centre, rot_z(self.tool_yaw) @ DOWN, "tool_lift", prefix="tool_", close_rot=arm.rot())
        free_end, d = self.hook()
        if self.phase == "tool_lift":
            # Up, then (still flat, above the hook) back from the hook's free end: the hand turns to point along
            # the hook where that is an easy, forward reach.
            if arm.pos()[2] < c.tool_lift_z - 0.05:
                target = np.array([*arm.pos()[:2], c.tool_lift_z])
            else:
                target = np.array([*(free_end[:2] - c.tool_stage_back * d[:2]), c.tool_lift_z])
            if reached(arm, target, 2 * c.tolerance) or timed_out:
                self.goto("tool_turn")
                self.hold_pos = target
                # The hand's pose that turns the tool for threading, and the nearest configuration that reaches it:
                # turning through joint space keeps the wrist from flipping over on the way (the OSC's path).
                hand_rot = self.tool_goal_rot(c.thread_pitch) @ rot.T @ arm.rot()
                self.q_turned, _ = self.kinematics().ik(target, hand_rot)
            return arm.action(target, arm.rot(), CLOSE)
        up = np.array([0.0, 0.0, 1.0])
        if self.phase == "tool_turn":
            turned = self.rot_error(rot, self.tool_goal_rot(c.thread_pitch)) < c.turn_tolerance
            if turned or self.joint_move_done(self.q_turned) or timed_out:
                self.goto("tool_thread")
                self.waypoint = 0
            return self.joint_action(self.q_turned, CLOSE)
        if self.phase == "tool_thread":
            s, h = c.thread_path[self.waypoint]
            want = free_end + s * d + h * up
            hand, hand_rot = held_pose(arm, hole, rot, want, self.tool_goal_rot(c.thread_pitch))
            tolerance = c.tolerance if self.waypoint == 0 else c.hole_tolerance
            # A waypoint that the hole cannot reach exactly (pressed against the hook) is left after a short wait.
            if np.linalg.norm(hole - want) < tolerance or self.stalled(min_steps=30) or \
                    self.phase_steps > c.waypoint_timeout:
                self.waypoint += 1
                self.phase_steps = 0
                self.log.append((f"waypoint {self.waypoint}", self.t))
                if self.waypoint == len(c.thread_path):
                    self.goto("tool_unpitch")
            return arm.action(hand, hand_rot, CLOSE)
        s, _ = c.thread_path[-1]
        if self.phase == "tool_unpitch":
            want = free_end + s * d
            goal_rot = self.tool_goal_rot(0.0)
            goal = self.turn(rot, goal_rot)
            hand, hand_rot = held_pose(arm, hole, rot, want, goal)
            if self.rot_error(rot, goal_rot) < c.turn_tolerance or timed_out:
                self.goto("tool_rest")
            return arm.action(hand, hand_rot, CLOSE)
        if self.phase == "tool_rest":
            want = free_end + s * d - c.rest_drop * up
            hand, hand_rot = held_pose(arm, hole, rot, want, self.tool_goal_rot(0.0))
            if np.linalg.norm(hole - want) < c.hole_tolerance or self.stalled(min_steps=20) or timed_out:
                self.goto("tool_release")
                self.hold_pos = arm.pos()
            return arm.action(hand, hand_rot, CLOSE)
        if self.phase == "tool_release":
            if self.phase_steps >= c.open_steps:
                self.goto("tool_back")
                self.hold_pos = arm.pos() - c.back_off * arm.rot()[:, 2]
            return arm.action(self.hold_pos, arm.rot(), OPEN)
        return arm.action(self.hold_pos, arm.rot(), OPEN)


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert, "transport": TransportExpert,
           "toolhang": ToolHangExpert}


class AbsoluteActions:
    """A delta expert driving a ``control="absolute"`` env: each delta action becomes the absolute goal the delta
    controller would have set (``RoboMimicEnv.delta_to_absolute``), so the motion is the delta expert's."""

    def __init__(self, expert, env):
        self.expert, self.env = expert, env

    def reset(self) -> None:
        self.expert.reset()

    def act(self, obs) -> np.ndarray:
        return self.env.delta_to_absolute(self.expert.act(obs))


def make_robomimic_expert(task: str, env):
    """A scripted expert for one RoboMimicEnv (``env.unwrapped``), in the env's action layout."""
    if task not in EXPERTS:
        raise ValueError(f"No scripted RoboMimic expert for task {task!r}. Available: {', '.join(EXPERTS)}")
    expert = EXPERTS[task](env)
    return AbsoluteActions(expert, env) if getattr(env, "control", "delta") == "absolute" else expert

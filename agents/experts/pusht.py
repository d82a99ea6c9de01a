"""Scripted Push-T expert: plans single pushes by simulating them in an exact copy of the pymunk world.

The physics of gym-pusht is quasi-static: the space has damping 0, so the T only moves while the pusher
disc touches it, and contacts are frictionless, so a push acts along the contact normal. The expert
therefore thinks in *pushes*: a contact point on the T outline, the inward normal as push direction, a
push speed and a length. One decision cycle:

1. Plan: for every candidate contact point, teleport the disc (in a private copy of the world) to its
   pre-contact point and simulate a straight push; score every prefix of the push by the pose error of
   the T to the goal (mean distance of points of the T) plus a time cost, which picks the push length.
   The best few are verified with the retreat included, optionally with a lookahead over a second push.
2. Approach: drive the disc to the pre-contact point along a collision-free path around the T
   (visibility graph over the corners of the inflated T), then let it settle.
3. Push: re-simulate the chosen push from the exact live state (the disc never arrives exactly where
   planned), then execute the chosen number of push steps and back off along the contact normal.

Near the goal the expert switches to fine mode: denser contact points, slow short pushes, and the
objective becomes the coverage itself. An episode ends in the env as soon as coverage > 0.95, which the
planner exploits by preferring the earliest push prefix that crosses the threshold.
"""

from __future__ import annotations

import copy
import heapq
import types
from dataclasses import dataclass

import numpy as np
import pymunk
import shapely
import shapely.geometry as sg
from shapely import affinity

ARENA_SIZE = 512.0

# Outline of the T in its body frame (counter-clockwise), matching PushTEnv.add_tee with scale 30.
T_OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], dtype=float
)
T_POLYGON = sg.Polygon(T_OUTLINE)
DEFAULT_GOAL_POSE = (256.0, 256.0, np.pi / 4)  # PushTEnv.goal_pose


def _t_sample_points() -> tuple[np.ndarray, np.ndarray]:
    """Points spread over the T, with area weights, used to measure the pose error."""
    bar = [(x, y) for x in (-50, -30, -10, 10, 30, 50) for y in (7.5, 22.5)]
    stem = [(x, y) for x in (-7.5, 7.5) for y in (45, 75, 105)]
    points = np.array(bar + stem, dtype=float)
    # The bar (3600 px^2) and the stem (2700 px^2) get weights proportional to their areas.
    weights = np.array([3600 / len(bar)] * len(bar) + [2700 / len(stem)] * len(stem))
    return points, weights / weights.sum()


T_POINTS, T_POINT_WEIGHTS = _t_sample_points()


@dataclass
class PushTExpertConfig:
    # --- physics mirror of gym_pusht.envs.pusht.PushTEnv.step ---
    k_p: float = 100.0  # PD gains of the env's agent controller
    k_v: float = 20.0
    substeps: int = 10  # physics steps per env step
    dt: float = 0.01
    agent_radius: float = 15.0
    success_coverage: float = 0.95  # the env's success threshold (strict >)

    # --- candidate pushes ---
    contact_spacing_coarse: float = 12.0  # px between contact points along the outline, far from the goal
    contact_spacing_fine: float = 5.0  # px between contact points in fine mode
    contact_end_inset: float = 2.0  # keep contact points this far from the outline corners
    pre_contact_gap: float = 6.0  # px between disc and T at the pre-contact point
    push_speed_coarse: float = 10.0  # px per env step that the push target advances
    push_steps_coarse: int = 12  # max push steps simulated per candidate (coarse)
    push_speed_fine: float = 3.0
    push_steps_fine: int = 10
    fine_mode_error: float = 20.0  # mean point distance (px) below which fine mode is used
    time_cost: float = 0.05  # cost (px of pose error) per env step spent, to prefer short plans
    verify_top_k: int = 6  # candidates re-simulated with the retreat included
    lookahead_top_k: int = 4  # first pushes expanded by a second push (0 disables the lookahead)
    lookahead_discount: float = 1.0  # weight of the second push's gain in the lookahead score

    # --- scoring ---
    coverage_weight_fine: float = 100.0  # in fine mode, cost += weight * (1 - coverage)
    coverage_error_limit: float = 15.0  # px of pose error above which coverage is not computed (taken as 0)

    # --- approach and retreat ---
    path_clearance: float = 2.0  # extra clearance of the disc around the T that paths must keep
    waypoint_clearance: float = 9.0  # offset of the path waypoints from the T (larger than the above)
    waypoint_tolerance: float = 6.0  # px: intermediate waypoint reached
    arrive_tolerance: float = 1.5  # px: pre-contact point reached
    arrive_speed: float = 20.0  # px/s: the disc counts as settled below this speed
    max_settle_steps: int = 6  # give up waiting for the disc to settle after this many steps
    approach_speed_estimate: float = 25.0  # px per env step, to estimate the approach duration
    approach_overhead_steps: int = 5  # settle steps added to each approach estimate
    retreat_distance: float = 20.0  # px the disc backs off along the contact normal after a push
    retreat_steps: int = 2
    unreachable_penalty: float = 30.0  # px of cost added to pushes without a collision-free approach
    max_approach_steps: int = 40  # abandon an approach (and replan) after this many steps


@dataclass
class _Push:
    """A candidate push in world coordinates."""

    contact: np.ndarray  # point on the T outline
    normal: np.ndarray  # outward normal there; the push goes along -normal
    pre_contact: np.ndarray  # where the disc starts the push
    speed: float  # px per env step the push target advances
    steps: int = 0  # chosen push length in env steps
    approach_steps: float = 0.0  # estimated env steps to reach the pre-contact point
    cost: float = np.inf
    end_pose: np.ndarray | None = None

    def target(self, k: int) -> np.ndarray:
        """Action of push step k (1-based): the target slides from the pre-contact point along -normal."""
        return np.clip(self.pre_contact - self.normal * self.speed * k, 0.0, ARENA_SIZE)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _body_frame_contacts(spacing: float, inset: float, radius: float, gap: float) -> list[tuple]:
    """Contact points with outward normals on the T outline, in the body frame.

    Keeps only points whose pre-contact disc does not overlap another part of the T (e.g. the inner
    corners between bar and stem). Convex corners also get the bisector of their two normals.
    """
    contacts = []
    n = len(T_OUTLINE)
    for i in range(n):
        a, b = T_OUTLINE[i], T_OUTLINE[(i + 1) % n]
        edge = b - a
        length = np.linalg.norm(edge)
        normal = np.array([edge[1], -edge[0]]) / length  # outward for a counter-clockwise outline
        count = max(1, int(round((length - 2 * inset) / spacing)) + 1)
        for t in np.linspace(inset, length - inset, count):
            contacts.append((a + edge * t / length, normal))
    for i in range(n):
        prev_pt, pt, next_pt = T_OUTLINE[i - 1], T_OUTLINE[i], T_OUTLINE[(i + 1) % n]
        e1, e2 = pt - prev_pt, next_pt - pt
        if e1[0] * e2[1] - e1[1] * e2[0] <= 0:  # concave corner: no disc can touch it alone
            continue
        n1 = np.array([e1[1], -e1[0]]) / np.linalg.norm(e1)
        n2 = np.array([e2[1], -e2[0]]) / np.linalg.norm(e2)
        bisector = (n1 + n2) / np.linalg.norm(n1 + n2)
        contacts.append((pt.copy(), bisector))
    feasible = []
    for point, normal in contacts:
        center = point + normal * (radius + gap)
        if T_POLYGON.distance(sg.Point(center)) >= radius + gap - 0.5:
            feasible.append((point, normal))
    return feasible


def _ignore_contact(arbiter, space, data) -> None:
    return None


class _World:
    """A private copy of the live pymunk space that can be reset to a state and stepped like the env."""

    def __init__(self, sim, config: PushTExpertConfig):
        # The live space holds a collision handler bound to the env (it counts contacts). Map the env to a
        # stand-in and the callback to a no-op, so the deep copy neither drags the env (with its pygame
        # objects) along nor touches it, and rollouts skip the costly contact counting.
        memo = {id(sim): types.SimpleNamespace(n_contact_points=0)}
        handler = getattr(sim, "collision_handeler", None)  # (sic) attribute name in gym-pusht
        if handler is not None and getattr(handler, "_post_solve", None) is not None:
            memo[id(handler._post_solve)] = _ignore_contact
        self.space = copy.deepcopy(sim.space, memo=memo)
        self.agent = next(b for b in self.space.bodies if b.body_type == pymunk.Body.KINEMATIC)
        self.block = next(b for b in self.space.bodies if b.body_type == pymunk.Body.DYNAMIC)
        self.config = config
        # Copying restores position before center_of_gravity, which shifts the block: set the state again.
        self.set_state(
            np.array(sim.agent.position), np.array(sim.agent.velocity), self.block_state_of(sim.block)
        )

    @staticmethod
    def block_state_of(block) -> tuple:
        return (tuple(block.position), block.angle, tuple(block.velocity), block.angular_velocity)

    def set_state(self, agent_pos, agent_vel, block_state) -> None:
        position, angle, velocity, angular_velocity = block_state
        self.block.angle = angle
        self.block.position = position
        self.block.velocity = velocity
        self.block.angular_velocity = angular_velocity
        self.agent.position = tuple(agent_pos)
        self.agent.velocity = tuple(agent_vel)

    def step(self, action: np.ndarray) -> None:
        """One env step: the PD law of PushTEnv.step on the kinematic agent, then the physics substeps."""
        cfg = self.config
        agent, space = self.agent, self.space
        tx, ty = float(action[0]), float(action[1])
        k_p, k_v, dt = cfg.k_p, cfg.k_v, cfg.dt
        for _ in range(cfg.substeps):
            (px, py), (vx, vy) = agent.position, agent.velocity
            # Same arithmetic, in the same order, as PushTEnv.step, on plain floats for speed.
            ax, ay = k_p * (tx - px) + k_v * (0.0 - vx), k_p * (ty - py) + k_v * (0.0 - vy)
            agent.velocity = (vx + ax * dt, vy + ay * dt)
            space.step(dt)

    def block_pose(self) -> np.ndarray:
        return np.array([self.block.position.x, self.block.position.y, self.block.angle])


class PushTExpert:
    """Closed-loop push planner for gym-pusht's PushTEnv (the raw env, not a wrapper).

    `seed` is kept for API symmetry with stochastic experts: the planner itself uses no randomness, so
    its actions are a deterministic function of the sim state.
    """

    def __init__(self, sim, config: PushTExpertConfig | None = None, seed: int = 0):
        self.sim = sim
        self.config = config or PushTExpertConfig()
        self.seed = seed
        cfg = self.config
        self._contacts_coarse = _body_frame_contacts(
            cfg.contact_spacing_coarse, cfg.contact_end_inset, cfg.agent_radius, cfg.pre_contact_gap
        )
        self._contacts_fine = _body_frame_contacts(
            cfg.contact_spacing_fine, cfg.contact_end_inset, cfg.agent_radius, cfg.pre_contact_gap
        )
        self.reset()

    # ------------------------------------------------------------------ public API

    def reset(self) -> None:
        """Forget the current plan; call after sim.reset(seed=...)."""
        # goal_pose only exists once the sim has been reset; it is a constant of the env.
        goal = np.asarray(getattr(self.sim, "goal_pose", DEFAULT_GOAL_POSE), dtype=float)
        self._goal_pose = goal
        self._goal_points = T_POINTS @ _rotation(goal[2]).T + goal[:2]
        self._goal_polygon = self._t_polygon(goal)
        self._queue: list[np.ndarray] = []  # precomputed actions of the current phase
        self._phase = "plan"
        self._push: _Push | None = None
        self._waypoints: list[np.ndarray] = []
        self._phase_steps = 0
        self._settle_steps = 0

    def act(self, obs=None) -> np.ndarray:
        """Next absolute target of the pusher, float32 (2,) in [0, 512]^2. Reads the state from sim."""
        action = self._next_action()
        action = np.nan_to_num(np.asarray(action, dtype=float), nan=ARENA_SIZE / 2)
        return np.clip(action, 0.0, ARENA_SIZE).astype(np.float32)

    # ------------------------------------------------------------------ state machine

    def _next_action(self) -> np.ndarray:
        for _ in range(4):  # a phase may end without producing an action; bounded to stay safe
            if self._queue:
                return self._queue.pop(0)
            if self._phase == "plan":
                self._push = self._plan()
                if self._push is None:  # nothing useful to do: hold position
                    return np.array(self.sim.agent.position)
                path = self._approach_path(np.array(self.sim.agent.position), self._push.pre_contact)
                self._waypoints = path if path is not None else [self._push.pre_contact]
                self._phase, self._phase_steps, self._settle_steps = "approach", 0, 0
            if self._phase == "approach":
                action = self._approach_action()
                if action is not None:
                    return action
                self._phase = "push"
            if self._phase == "push":
                self._queue = self._push_actions()
                self._phase = "plan"
        return np.array(self.sim.agent.position)

    def _approach_action(self) -> np.ndarray | None:
        """Action that moves the disc along the waypoints; None once it rests at the pre-contact point."""
        cfg = self.config
        agent = np.array(self.sim.agent.position)
        self._phase_steps += 1
        if self._phase_steps > cfg.max_approach_steps:
            return None  # push from where we are; the push is re-simulated from the live state anyway
        while len(self._waypoints) > 1 and np.linalg.norm(agent - self._waypoints[0]) < cfg.waypoint_tolerance:
            self._waypoints.pop(0)
        if len(self._waypoints) > 1:
            return self._waypoints[0]
        final = self._waypoints[0]
        speed = np.linalg.norm(np.array(self.sim.agent.velocity))
        settled = np.linalg.norm(agent - final) < cfg.arrive_tolerance and speed < cfg.arrive_speed
        if settled:
            return None
        # Near the pre-contact point, wait a bounded number of steps for the disc to settle.
        if np.linalg.norm(agent - final) < cfg.waypoint_tolerance:
            self._settle_steps += 1
            if self._settle_steps > cfg.max_settle_steps:
                self._settle_steps = 0
                return None
        else:
            self._settle_steps = 0
        return final

    def _push_actions(self) -> list[np.ndarray]:
        """Re-simulate the planned push from the exact live state and return push + retreat actions."""
        push = self._push
        world = _World(self.sim, self.config)
        agent = self.sim.agent
        start = (np.array(agent.position), np.array(agent.velocity), _World.block_state_of(self.sim.block))
        # Allow a slightly longer push than planned: the disc rarely starts exactly at the pre-contact point.
        steps, _ = self._best_length(world, start, push, push.steps + 4, fine=self._is_fine(self._pose()))
        actions = [push.target(k) for k in range(1, steps + 1)]
        return actions + self._retreat_actions(world, start, push, steps)

    def _retreat_actions(self, world: _World, start, push: _Push, steps: int) -> list[np.ndarray]:
        """Back off along the contact normal, from where the disc ends the push (simulated)."""
        world.set_state(*start)
        for k in range(1, steps + 1):
            world.step(push.target(k))
        end = np.array(world.agent.position)
        back = np.clip(end + push.normal * self.config.retreat_distance, 0.0, ARENA_SIZE)
        return [back] * self.config.retreat_steps

    # ------------------------------------------------------------------ planning

    def _pose(self) -> np.ndarray:
        b = self.sim.block
        return np.array([b.position.x, b.position.y, b.angle])

    def _pose_error(self, poses: np.ndarray) -> np.ndarray:
        """Weighted mean distance between points of the T at `poses` (N, 3) and at the goal, in px."""
        poses = np.atleast_2d(poses)
        c, s = np.cos(poses[:, 2]), np.sin(poses[:, 2])
        px, py = T_POINTS[:, 0], T_POINTS[:, 1]
        x = c[:, None] * px - s[:, None] * py + poses[:, 0:1]
        y = s[:, None] * px + c[:, None] * py + poses[:, 1:2]
        dist = np.hypot(x - self._goal_points[:, 0], y - self._goal_points[:, 1])
        return dist @ T_POINT_WEIGHTS

    @staticmethod
    def _t_polygon(pose) -> sg.Polygon:
        rotated = affinity.rotate(T_POLYGON, pose[2], origin=(0, 0), use_radians=True)
        return affinity.translate(rotated, pose[0], pose[1])

    def _coverages(self, poses: np.ndarray) -> np.ndarray:
        """Same quantity as PushTEnv._get_coverage, for many poses: overlap with the goal T / goal area."""
        poses = np.atleast_2d(poses)
        c, s = np.cos(poses[:, 2]), np.sin(poses[:, 2])
        ox, oy = T_OUTLINE[:, 0], T_OUTLINE[:, 1]
        x = c[:, None] * ox - s[:, None] * oy + poses[:, 0:1]
        y = s[:, None] * ox + c[:, None] * oy + poses[:, 1:2]
        rings = np.stack([x, y], axis=-1)
        polygons = shapely.polygons(np.concatenate([rings, rings[:, :1]], axis=1))
        return shapely.area(shapely.intersection(polygons, self._goal_polygon)) / self._goal_polygon.area

    def _is_fine(self, pose) -> bool:
        return float(self._pose_error(pose)[0]) < self.config.fine_mode_error

    def _costs(self, poses: np.ndarray, fine: bool) -> tuple[np.ndarray, np.ndarray]:
        """Cost of each pose and whether it would end the episode with success."""
        error = self._pose_error(poses)
        success = np.zeros(len(poses), dtype=bool)
        cost = error.copy()
        # Coverage is only worth computing for poses close enough to the goal to matter.
        near = np.flatnonzero(error < self.config.coverage_error_limit)
        if len(near):
            coverage = self._coverages(poses[near])
            success[near] = coverage > self.config.success_coverage
            if fine:
                cost[near] += self.config.coverage_weight_fine * (1.0 - coverage)
        if fine:
            far = np.ones(len(poses), dtype=bool)
            far[near] = False
            cost[far] += self.config.coverage_weight_fine  # counted as no coverage
        return cost, success

    def _candidates(self, pose, fine: bool) -> list[_Push]:
        cfg = self.config
        rot = _rotation(pose[2])
        contacts = self._contacts_fine if fine else self._contacts_coarse
        speed = cfg.push_speed_fine if fine else cfg.push_speed_coarse
        margin = 1.0
        pushes = []
        for point_b, normal_b in contacts:
            contact = rot @ point_b + pose[:2]
            normal = rot @ normal_b
            pre_contact = contact + normal * (cfg.agent_radius + cfg.pre_contact_gap)
            if np.any(pre_contact < margin) or np.any(pre_contact > ARENA_SIZE - margin):
                continue  # the disc cannot get behind this contact point
            pushes.append(_Push(contact=contact, normal=normal, pre_contact=pre_contact, speed=speed))
        return pushes

    def _simulate_push(self, world: _World, start, push: _Push, steps: int) -> np.ndarray:
        """Block poses after each of `steps` push steps, starting from `start`."""
        world.set_state(*start)
        poses = np.empty((steps, 3))
        for k in range(steps):
            world.step(push.target(k + 1))
            poses[k] = world.block_pose()
        return poses

    def _best_length(self, world: _World, start, push: _Push, steps: int, fine: bool, offset: float = 0.0):
        """Best push length (steps, cost) for `push`; an early successful prefix wins outright."""
        poses = self._simulate_push(world, start, push, steps)
        cost, success = self._costs(poses, fine)
        cost = cost + self.config.time_cost * (offset + np.arange(1, steps + 1))
        if success.any():
            k = int(np.argmax(success))
            return k + 1, -1e6 + k  # success now: the sooner the better
        k = int(np.argmin(cost))
        return k + 1, float(cost[k])

    def _evaluate(self, world: _World, block_state, pose, fine: bool, agent_start=None) -> list[_Push]:
        """Simulate every candidate push from `block_state` and return them sorted by cost."""
        cfg = self.config
        steps = cfg.push_steps_fine if fine else cfg.push_steps_coarse
        pushes = self._candidates(pose, fine)
        if agent_start is not None:
            graph = self._visibility_graph(pose)
        for push in pushes:
            if agent_start is not None:
                path = self._approach_path(agent_start, push.pre_contact, graph)
                penalty = 0.0
                if path is None:  # no clean path: the disc would go straight, possibly brushing the T
                    path, penalty = [push.pre_contact], cfg.unreachable_penalty
                length = sum(np.linalg.norm(b - a) for a, b in zip([agent_start] + path[:-1], path))
                push.approach_steps = length / cfg.approach_speed_estimate + cfg.approach_overhead_steps
                push.approach_steps += penalty / cfg.time_cost
            start = (push.pre_contact, np.zeros(2), block_state)
            # The approach time enters the cost through the offset.
            push.steps, push.cost = self._best_length(world, start, push, steps, fine, offset=push.approach_steps)
        pushes.sort(key=lambda p: p.cost)
        return pushes

    def _outcome(self, world: _World, block_state, push: _Push) -> tuple:
        """Simulate push + retreat from the pre-contact point; returns the block state afterwards."""
        start = (push.pre_contact, np.zeros(2), block_state)
        actions = [push.target(k) for k in range(1, push.steps + 1)]
        world.set_state(*start)
        for a in actions:
            world.step(a)
        back = np.clip(np.array(world.agent.position) + push.normal * self.config.retreat_distance, 0, ARENA_SIZE)
        for _ in range(self.config.retreat_steps):
            world.step(back)
        return _World.block_state_of(world.block), world.block_pose()

    def _plan(self) -> _Push | None:
        """Choose the next push: simulate all candidates, verify the best few, rank them with lookahead."""
        cfg = self.config
        world = _World(self.sim, cfg)
        pose = self._pose()
        fine = self._is_fine(pose)
        block_state = _World.block_state_of(self.sim.block)
        agent = np.array(self.sim.agent.position)
        pushes = self._evaluate(world, block_state, pose, fine, agent_start=agent)
        if not pushes:
            return None
        # Verify the best few with the retreat included (the disc keeps moving a little after the push).
        verified = []
        for push in pushes[: cfg.verify_top_k]:
            state_after, pose_after = self._outcome(world, block_state, push)
            cost, success = self._costs(pose_after[None], fine)
            if success[0] or push.cost < -1e5:
                push.cost = -1e6 + push.approach_steps + push.steps
                return push
            push.cost = float(cost[0]) + cfg.time_cost * (push.approach_steps + push.steps + cfg.retreat_steps)
            push.end_pose = pose_after
            verified.append((push, state_after))
        verified.sort(key=lambda item: item[0].cost)
        if cfg.lookahead_top_k > 0:
            verified = self._lookahead(world, verified[: cfg.lookahead_top_k])
        return verified[0][0]

    def _lookahead(self, world: _World, verified: list) -> list:
        """Re-rank first pushes by the best cost reachable with one more push after them."""
        cfg = self.config
        ranked = []
        for push, state_after in verified:
            pose_after = push.end_pose
            fine = self._is_fine(pose_after)
            second = self._evaluate(world, state_after, pose_after, fine)
            best_second = second[0].cost if second else np.inf
            first_cost = push.cost
            if best_second < -1e5:
                score = -1e6 + push.approach_steps + push.steps
            else:
                # Two-step score: cost after the second push, but never worse than stopping after the first.
                score = min(first_cost, first_cost + cfg.lookahead_discount * (best_second - first_cost))
            ranked.append((score, push, state_after))
        ranked.sort(key=lambda item: item[0])
        return [(push, state) for _, push, state in ranked]

    # ------------------------------------------------------------------ approach path

    def _inflated_t(self, pose, clearance: float, join_style: str):
        distance = self.config.agent_radius + clearance
        return self._t_polygon(pose).buffer(distance, join_style=join_style, mitre_limit=3.0)

    def _visibility_graph(self, pose):
        """Corners of the inflated T and which of them see each other without crossing the T."""
        cfg = self.config
        # Round joins: exactly the region the disc centre must avoid (pre-contact points at corners lie just
        # outside it). Mitre joins for the waypoints: few corners, all clear of the obstacle.
        obstacle = self._inflated_t(pose, cfg.path_clearance, "round")
        waypoint_polygon = self._inflated_t(pose, cfg.waypoint_clearance, "mitre")
        corners = [np.array(p) for p in list(waypoint_polygon.exterior.coords)[:-1]]
        edges = {i: [] for i in range(len(corners))}
        for i in range(len(corners)):
            for j in range(i + 1, len(corners)):
                if not obstacle.intersects(sg.LineString([corners[i], corners[j]])):
                    d = float(np.linalg.norm(corners[i] - corners[j]))
                    edges[i].append((j, d))
                    edges[j].append((i, d))
        return obstacle, corners, edges

    def _approach_path(self, start: np.ndarray, goal: np.ndarray, graph=None) -> list[np.ndarray] | None:
        """Waypoints from the disc to the pre-contact point that keep the disc off the T (None: no path)."""
        cfg = self.config
        if graph is None:
            graph = self._visibility_graph(self._pose())
        obstacle, corners, edges = graph
        path_start = start
        prefix = []
        if obstacle.contains(sg.Point(start)):
            # The disc is touching the T (e.g. right after a push): first back straight away from the nearest
            # point of the T, far enough to be clear of every part of it.
            t_poly = self._t_polygon(self._pose())
            nearest = np.array(t_poly.exterior.interpolate(t_poly.exterior.project(sg.Point(start))).coords[0])
            away = start - nearest
            if np.linalg.norm(away) < 1e-6:
                away = start - np.array(t_poly.centroid.coords[0])
            away = away / (np.linalg.norm(away) + 1e-9)
            for distance in np.arange(cfg.agent_radius + cfg.waypoint_clearance, 4 * cfg.agent_radius, 5.0):
                path_start = np.clip(nearest + away * distance, 0, ARENA_SIZE)
                if not obstacle.contains(sg.Point(path_start)):
                    break
            prefix = [path_start]

        def visible(a, b) -> bool:
            return not obstacle.intersects(sg.LineString([a, b]))

        if visible(path_start, goal):
            return prefix + [goal]
        # Dijkstra over: 0..n-1 corners, n start, n+1 goal.
        n = len(corners)
        start_links = [
            (i, float(np.linalg.norm(c - path_start))) for i, c in enumerate(corners) if visible(path_start, c)
        ]
        goal_links = {i: float(np.linalg.norm(c - goal)) for i, c in enumerate(corners) if visible(c, goal)}
        dist = {n: 0.0}
        previous = {}
        heap = [(0.0, n)]
        while heap:
            d, node = heapq.heappop(heap)
            if d > dist.get(node, np.inf):
                continue
            if node == n + 1:
                break
            neighbours = start_links if node == n else list(edges[node])
            if node in goal_links:
                neighbours = neighbours + [(n + 1, goal_links[node])]
            for nxt, w in neighbours:
                nd = d + w
                if nd < dist.get(nxt, np.inf):
                    dist[nxt] = nd
                    previous[nxt] = node
                    heapq.heappush(heap, (nd, nxt))
        if n + 1 not in previous:
            return None
        path = []
        node = previous[n + 1]
        while node != n:
            path.append(corners[node])
            node = previous[node]
        return prefix + [np.clip(p, 0, ARENA_SIZE) for p in reversed(path)] + [goal]

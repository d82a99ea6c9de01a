"""Where a ToolHang policy's episodes get to: the step the frame first stands in its mount, the step the tool first
hangs on it, where the frame's tip is against the mount's hole at the end, and how close to the hole's axis the
tip came near the mount (the hole leaves 1.2 mm of play a side; a policy that lowers the frame off the axis rests
its tip on the mount's wall and stays there). For the tool phase: the step the tool first leaves the table, the
step its hole first comes within 3 cm of the hook's free end, the hole's closest approach to the hook (the segment
from its free end to the post) with the angle between the hole's axis and the hook there (the expert threads
with the tool pitched 45 degrees, then levels it), and whether the frame still stands at the end.

    python scripts/toolhang_progress.py --checkpoint checkpoints/toolhang-abs --agent ddim:8 \
        --seeds 950000,950001 [--horizon 1400] [--task toolhang-abs]

The horizon may exceed the task's 700 steps to see whether an episode is slow rather than stuck; seeds are
training-evaluation seeds (950000 on), never the bench's 0-49.
"""

import argparse

import gymnasium as gym
import numpy as np
import torch

import step_envs  # noqa: F401  (registers the step/* ids)
from agents import make_agent
from step_envs.registry import get_task


def seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment a-b."""
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * ab)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--agent", default="ddim:8")
    parser.add_argument("--seeds", required=True, type=seed_list, help="comma-separated episode seeds")
    parser.add_argument("--horizon", type=int, default=700)
    parser.add_argument("--task", default="toolhang-abs", choices=("toolhang", "toolhang-abs"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = gym.make(get_task(args.task).env_id, obs_type="state", render_mode=None, max_episode_steps=args.horizon)
    try:
        agent = make_agent(args.agent, env, task=args.task, checkpoint=args.checkpoint, seed=0)
    except (FileNotFoundError, ValueError) as err:  # a missing or mismatched checkpoint, an unknown agent spec
        parser.error(str(err))
    # The scripted expert's scene helpers (frame tip, mount), read only: it never acts here.
    probe = make_agent("expert", env, task=args.task).experts[0]
    probe = getattr(probe, "expert", probe)  # under position control the expert sits inside its converter
    sim = env.unwrapped.sim_env
    for seed in args.seeds:
        obs, _ = env.reset(seed=seed)
        agent.reset()
        frame_at = tool_at = lifted_at = near_hook_at = None
        closest = np.inf  # tip to the hole's axis while the tip is at most 3 cm above the wall tops (m)
        tool_rest_z = probe.tool()[0][2]  # the tool's hole lying on the table at reset
        hook_closest, hook_angle = np.inf, np.nan  # tool hole centre to the hook segment, and the axes' angle there
        step, done = 0, False
        while not done:
            obs, _, terminated, truncated, info = env.step(agent.act(obs))
            step += 1
            done = terminated or truncated
            if frame_at is None and sim._check_frame_assembled():
                frame_at = step
            if tool_at is None and sim._check_tool_on_frame():
                tool_at = step
            tip, rot = probe.frame()
            mount, _ = probe.mount()
            if tip[2] - mount[2] < 0.03:
                closest = min(closest, float(np.linalg.norm(tip[:2] - mount[:2])))
            hole, tool_rot = probe.tool()
            if lifted_at is None and hole[2] - tool_rest_z > 0.05:
                lifted_at = step
            free_end, along = probe.hook()
            post = probe.site_pos("frame_intersection_site")
            if lifted_at is not None:
                if near_hook_at is None and np.linalg.norm(hole - free_end) < 0.03:
                    near_hook_at = step
                distance = segment_distance(hole, free_end, post)
                if distance < hook_closest:
                    hook_closest = distance
                    hook_angle = np.degrees(np.arccos(min(1.0, abs(float(tool_rot[:, 2] @ along)))))
        approach = ("tool never off the table" if lifted_at is None else
                    f"tool off the table first at {lifted_at}, hole within 3 cm of the hook's free end first at "
                    f"{near_hook_at}, closest to the hook {hook_closest * 1000:.1f} mm (hole axis {hook_angle:.0f} deg "
                    f"off the hook there)")
        print(f"seed {seed}: success {bool(info.get('is_success'))} after {step} steps; frame in its mount first at "
              f"{frame_at}, tool on the frame first at {tool_at}; at the end the tip is "
              f"{np.linalg.norm(tip[:2] - mount[:2]) * 1000:.1f} mm off the hole's axis, "
              f"{(tip[2] - mount[2]) * 1000:.1f} mm above the wall tops, post tilted "
              f"{np.degrees(np.arccos(min(1.0, abs(rot[2, 2])))):.1f} deg; closest to the axis within 3 cm above the "
              f"walls: {closest * 1000:.1f} mm; {approach}; frame stands at the end: "
              f"{bool(sim._check_frame_assembled())}", flush=True)


if __name__ == "__main__":
    main()

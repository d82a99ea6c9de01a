"""Where a ToolHang policy's episodes get to: the step the frame first stands in its mount, the step the tool first
hangs on it, where the frame's tip is against the mount's hole at the end, and how close to the hole's axis the
tip came near the mount (the hole leaves 1.2 mm of play a side; a policy that lowers the frame off the axis rests
its tip on the mount's wall and stays there).

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
    agent = make_agent(args.agent, env, task=args.task, checkpoint=args.checkpoint, seed=0)
    # The scripted expert's scene helpers (frame tip, mount), read only: it never acts here.
    probe = make_agent("expert", env, task=args.task).experts[0]
    probe = getattr(probe, "expert", probe)  # under position control the expert sits inside its converter
    sim = env.unwrapped.sim_env
    for seed in args.seeds:
        obs, _ = env.reset(seed=seed)
        agent.reset()
        frame_at = tool_at = None
        closest = np.inf  # tip to the hole's axis while the tip is at most 3 cm above the wall tops (m)
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
        print(f"seed {seed}: success {bool(info.get('is_success'))} after {step} steps; frame in its mount first at "
              f"{frame_at}, tool on the frame first at {tool_at}; at the end the tip is "
              f"{np.linalg.norm(tip[:2] - mount[:2]) * 1000:.1f} mm off the hole's axis, "
              f"{(tip[2] - mount[2]) * 1000:.1f} mm above the wall tops, post tilted "
              f"{np.degrees(np.arccos(min(1.0, abs(rot[2, 2])))):.1f} deg; closest to the axis within 3 cm above the "
              f"walls: {closest * 1000:.1f} mm", flush=True)


if __name__ == "__main__":
    main()

"""``step eval --task pusht --agent expert --episodes 10 --video DIR``"""

from __future__ import annotations

import json
from pathlib import Path

from agents.config_files import check_minimums
from agents.factory import make_agent
from step_envs.registry import get_task, make_env
from step_envs.rollout import rollout, summarize


def add_arguments(parser) -> None:
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--agent", default="expert", help="method spec: expert, random, ddpm:100, ddim:4, step:2 ...")
    parser.add_argument("--checkpoint", default=None, help="policy checkpoint directory (trained agents)")
    parser.add_argument("--obs-type", default="state", choices=["state", "pixels", "pixels_state"])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed-start", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=1, help="batch this many envs (one agent call per step)")
    parser.add_argument("--video", default=None, help="folder for mp4 videos")
    parser.add_argument("--num-videos", type=int, default=2, help="videos of the first N episodes")
    parser.add_argument("--json", default=None, help="write per-episode results here")
    # Real arm (tasks so101-pickplace / so101-stackcube): only these change between twin and arm.
    parser.add_argument("--port", default=None, help="real arm: serial port of the follower, e.g. /dev/ttyACM0")
    parser.add_argument("--camera", default=None, help="real arm: OpenCV camera index or device path")
    parser.add_argument("--env-kwargs", default=None, help='extra env keyword arguments as JSON, e.g. \'{"robot_id": "arm1"}\'')


def parse_env_kwargs(text: str | None) -> dict:
    """The --env-kwargs option: a JSON object (or nothing)."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--env-kwargs is not valid JSON: {err}") from err
    if not isinstance(kwargs, dict):
        raise ValueError("--env-kwargs must be a JSON object")
    return kwargs


def env_kwargs_from_args(args) -> dict:
    """Keyword arguments for the env: --env-kwargs JSON plus --port/--camera when given."""
    kwargs = parse_env_kwargs(args.env_kwargs)
    if args.port is not None:
        kwargs["port"] = args.port
    if args.camera is not None:
        kwargs["camera"] = int(args.camera) if args.camera.isdigit() else args.camera
    return kwargs


def run(args) -> int:
    spec = get_task(args.task)
    check_minimums(args, episodes=1, num_envs=1, num_videos=0)
    num_envs = None if args.num_envs <= 1 else args.num_envs
    env = make_env(args.task, obs_type=args.obs_type, num_envs=num_envs, **env_kwargs_from_args(args))
    try:
        agent = make_agent(args.agent, env, task=spec.name, checkpoint=args.checkpoint)
        seeds = range(args.seed_start, args.seed_start + args.episodes)
        results = rollout(env, agent, seeds, video_dir=args.video, num_videos=args.num_videos if args.video else 0)
    finally:
        env.close()
    summary = summarize(results)
    summary.update(task=spec.name, agent=args.agent, seed_start=args.seed_start)
    print(f"{spec.name} {args.agent}: success {summary['success_rate']:.2f} "
          f"mean max reward {summary['mean_max_reward']:.3f} over {summary['episodes']} episodes")
    for r in results:
        if r.video:
            print(f"video: {r.video}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0

"""``step eval --task pusht --agent expert --episodes 10 --video DIR``

Any agent on seeded episodes through the one rollout loop; ``--agent expert`` measures a task's scripted expert
(success rate, mean max reward, failed seeds; ``--json`` keeps every episode's length and time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agents.config_files import add_config_arguments, config_from_args, option, validate_fields
from step_envs.contract import OBS_TYPES
from step_envs.seeds import EVAL_SEEDS


@dataclass
class EvalConfig:
    task: str = "pusht"
    agent: str = option("expert", help="method spec: expert, random, ddpm:100, ddim:4, step:2 ...")
    checkpoint: str | None = option(None, help="policy checkpoint directory (trained agents)")
    obs_type: str | None = option(None, choices=OBS_TYPES,
                                  help="default: the checkpoint's (an image policy gets camera frames), else state")
    episodes: int = option(10, min=1)
    seed_start: int = option(EVAL_SEEDS.start, min=0, help="first evaluation seed (step_envs/seeds.py)")
    num_envs: int = option(1, min=1, help="batch this many envs (one agent call per step)")
    video: str | None = option(None, help="folder for mp4 videos")
    num_videos: int = option(2, min=0, help="videos of the first N episodes")
    json: str | None = option(None, help="write per-episode results here")
    runtime: str = option("torch", choices=("torch", "onnx"), help="diffusion agents: eager torch or ONNX Runtime "
                                                                   "(graphs from <checkpoint>/onnx, `step export --onnx`)")
    # Real arm (tasks so101-pickplace / so101-stackcube): only these change between twin and arm.
    port: str | None = option(None, help="real arm: serial port of the follower, e.g. /dev/ttyACM0")
    camera: str | None = option(None, help="real arm: OpenCV camera index or device path")
    env_kwargs: dict = option(default_factory=dict,
                              help='extra env keyword arguments as JSON, e.g. \'{"robot_id": "arm1"}\'')

    def __post_init__(self):
        validate_fields(self)

    def make_env_kwargs(self) -> dict:
        """Keyword arguments for the env: --env-kwargs plus --port/--camera when given."""
        kwargs = dict(self.env_kwargs)
        if self.port is not None:
            kwargs["port"] = self.port
        if self.camera is not None:
            kwargs["camera"] = int(self.camera) if self.camera.isdigit() else self.camera
        return kwargs


def add_arguments(parser) -> None:
    add_config_arguments(parser, EvalConfig)


def run(args) -> int:
    from agents.checkpoint import checkpoint_obs_type
    from agents.factory import make_agent
    from step_envs.registry import get_task, make_env
    from step_envs.rollout import rollout, summarize

    cfg = config_from_args(EvalConfig, args)
    spec = get_task(cfg.task)
    num_envs = None if cfg.num_envs <= 1 else cfg.num_envs
    obs_type = cfg.obs_type or checkpoint_obs_type(cfg.checkpoint)
    env = make_env(cfg.task, obs_type=obs_type, num_envs=num_envs, **cfg.make_env_kwargs())
    try:
        extra = {"runtime": cfg.runtime} if cfg.runtime != "torch" else {}  # agents/onnx_runtime.py
        agent = make_agent(cfg.agent, env, task=spec.name, checkpoint=cfg.checkpoint, **extra)
        seeds = range(cfg.seed_start, cfg.seed_start + cfg.episodes)
        results = rollout(env, agent, seeds, video_dir=cfg.video, num_videos=cfg.num_videos if cfg.video else 0)
    finally:
        env.close()
    summary = summarize(results)
    summary.update(task=spec.name, agent=cfg.agent, seed_start=cfg.seed_start)
    print(f"{spec.name} {cfg.agent}: success {summary['success_rate']:.2f} "
          f"mean max reward {summary['mean_max_reward']:.3f} over {summary['episodes']} episodes")
    failed = [r.seed for r in results if not r.success]
    if failed:
        print(f"failed seeds: {', '.join(map(str, failed))}")
    for r in results:
        if r.video:
            print(f"video: {r.video}")
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(summary, indent=2))
    return 0

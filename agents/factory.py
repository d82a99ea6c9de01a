"""One factory for every agent: ``make_agent("ddim:4", env, checkpoint=...)``.

Method specs are ``name`` or ``name:steps``. Agents built here all share ``reset()`` / ``act(obs)``
and work on a single env or a gymnasium VectorEnv (one batched call for all envs).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym

# The default method list of every command that compares methods (`step bench`, `step latency`): the paper's
# Table 2 rows on one shared backbone.
DEFAULT_METHODS = ("ddpm:100", "ddim:4", "ddim:2", "dpmsolver:4", "dpmsolver:2", "step:4", "step:2", "step:1")


# Method specs are parsed here and nowhere else: ``parse_method`` (name, steps), ``split_method`` (the STEP
# ablation variants), ``split_warm_start`` (STEP's warm-start timestep, "step@30:2"), ``DEFAULT_STEPS`` (a spec
# without ``:steps``) and ``needs_predictor``.
DEFAULT_STEPS = {"ddpm": 100, "ddim": 4, "dpmsolver": 4, "step": 2}
# Where STEP's warm start comes from (the paper's Table 16 consistency ablation):
#   predictor: f(o_t, A_{t-1}), spatiotemporal (STEP);  spatial: f(o_t) only, the previous chunk is never
#   shown;  temporal: the previous chunk shifted by Ta, no predictor (first call of an episode: noise).
WARM_SOURCES = ("predictor", "spatial", "temporal")


def split_warm_start(name: str) -> tuple[str, int | None]:
    """"step@30" -> ("step", 30): STEP whose warm start enters the diffusion at timestep 30 (of the 100 training
    steps) instead of the first timestep of the K'-step DDIM schedule, its K' steps spread evenly from 30 down to
    x0 (``warm_timesteps``). Plain names -> (name, None)."""
    base, at, value = name.partition("@")
    if not at:
        return name, None
    if split_method(base)[0] != "step":
        raise ValueError(f"Method {name!r}: only STEP variants take a warm-start timestep '@t' (e.g. 'step@30:2').")
    if not value.isdigit():
        raise ValueError(f"Method {name!r}: the warm-start timestep after '@' must be an integer, e.g. 'step@30:2'.")
    return base, int(value)


def warm_timesteps(start: int, steps: int) -> list[int]:
    """The K' DDIM timesteps of a warm start that enters at ``start``: evenly spread, [40, 20] for (40, 2)."""
    if steps < 1 or start < steps:
        raise ValueError(f"A warm start at timestep {start} cannot hold {steps} distinct denoising steps "
                         f"(need start >= steps >= 1).")
    return [start * (steps - i) // steps for i in range(steps)]


def split_method(name: str) -> tuple[str, str]:
    """"step-spatial" -> ("step", "spatial"); plain names use the predictor warm start."""
    method, _, warm_source = name.partition("-")
    return method, warm_source or "predictor"


def needs_predictor(spec: str) -> bool:
    """Whether a method spec runs STEP's predictor (every STEP variant except step-temporal)."""
    method, warm_source = split_method(split_warm_start(parse_method(spec)[0])[0])
    return method == "step" and warm_source != "temporal"


def parse_method(spec: str) -> tuple[str, int | None]:
    name, _, steps = spec.strip().partition(":")
    if not name:
        raise ValueError(f"Empty method spec {spec!r}")
    if steps:
        if not steps.isdigit():
            raise ValueError(f"Method spec {spec!r}: steps must be a positive integer, e.g. 'ddim:4'.")
        if int(steps) == 0 and name.lower() not in ("step", "rtidp"):  # rtidp:0: the shifted chunk (agents/rtidp.py)
            raise ValueError(f"Method spec {spec!r}: only 'step:0' (the predictor's chunk, no denoising) may have "
                             "0 steps; others need a positive integer, e.g. 'ddim:4'.")
        return name.lower(), int(steps)
    return name.lower(), None


@dataclass(frozen=True)
class EnvSpaces:
    """What ``make_agent`` reads from an env, for callers that hold no env object (the LeRobot plugin,
    ``plugins/lerobot_policy_step``): one env's spaces and the batch width (None: unbatched observations)."""

    observation_space: gym.spaces.Dict
    action_space: gym.spaces.Box
    num_envs: int | None = None


def _single_spaces(env):
    if isinstance(env, EnvSpaces):
        return env.observation_space, env.action_space, env.num_envs
    if isinstance(env, gym.vector.VectorEnv):
        return env.single_observation_space, env.single_action_space, env.num_envs
    if hasattr(env, "num_envs") and hasattr(env, "step_async"):  # a stable-baselines3 VecEnv (agents/sb3.py)
        return env.observation_space, env.action_space, env.num_envs
    return env.observation_space, env.action_space, None


def make_agent(method: str, env, task: str | None = None, checkpoint: str | None = None, seed: int = 0, **kwargs):
    name, steps = parse_method(method)
    obs_space, action_space, batch = _single_spaces(env)
    if name == "expert":
        from agents.experts import make_expert

        if task is None:
            raise ValueError("The expert agent needs the task name.")
        return make_expert(task, env, seed=seed)
    if name == "random":
        from agents.simple import RandomAgent

        return RandomAgent(action_space, seed=seed, batch_size=batch)
    if name == "leader":  # teleoperation: kwargs port, robot_id, calibration_dir (agents/leader_arm.py)
        from agents.leader_arm import LeaderArm

        return LeaderArm(**kwargs)
    if split_warm_start(name)[0] in DIFFUSION_METHODS:
        return make_diffusion_agent(name, steps, env, task=task, checkpoint=checkpoint, seed=seed, **kwargs)
    from agents.peers import PEER_METHODS, make_peer_agent  # RTI-DP, Falcon, SDP, RNR-DP (issue 14)

    if name in PEER_METHODS:
        return make_peer_agent(name, steps, env, task=task, checkpoint=checkpoint, seed=seed, **kwargs)
    from agents.distill import DISTILLED_METHODS, make_distilled_agent  # Consistency Policy, OneDP (issue 15)

    if name in DISTILLED_METHODS:
        return make_distilled_agent(name, steps, env, task=task, checkpoint=checkpoint, seed=seed, **kwargs)
    raise ValueError(f"Unknown method {name!r}. Known: expert, random, leader, "
                     f"{', '.join(DIFFUSION_METHODS + PEER_METHODS + DISTILLED_METHODS)}.")


DIFFUSION_METHODS = ("ddpm", "ddim", "dpmsolver", "step", "step-spatial", "step-temporal")


def _env_task(env) -> str | None:
    spec = getattr(env, "spec", None)
    if spec is None or not getattr(spec, "id", None):
        return None
    from step_envs.registry import task_for_env_id

    try:
        return task_for_env_id(spec.id).name
    except ValueError:
        return None


def make_diffusion_agent(name: str, steps: int | None, env, task: str | None = None, checkpoint: str | None = None,
                         seed: int = 0, predictor: str | None = None, first_call: str = "predictor",
                         stall=None, backbone=None, predictor_model=None, trace_predictor: bool = True,
                         runtime: str = "torch", onnx_dir: str | None = None):
    """DDPM / DDIM / DPM-Solver++ / STEP on a trained backbone checkpoint.

    ``runtime="onnx"``: the same agent run through ONNX Runtime (``agents/onnx_runtime.py``); its graphs come
    from ``onnx_dir`` (default ``<checkpoint>/onnx``, written by ``step export --onnx``) or are exported on the fly.

    STEP's predictor: ``predictor=DIR``, else ``<checkpoint>/predictor``. ``stall``: a StallConfig or a
    dict of its fields. ``backbone`` / ``predictor_model``: already-loaded modules (tests, benchmarks).
    """
    from agents.checkpoint import features_from_spaces, find_predictor, load_policy, load_predictor
    from agents.diffusion_agents import AgentConfig, DiffusionAgent
    from agents.stall import StallConfig

    obs_space, action_space, batch = _single_spaces(env)
    # "step-spatial" / "step-temporal": STEP with the warm start of the consistency ablation (Table 16).
    wants_predictor = needs_predictor(name)
    name, warm_start_t = split_warm_start(name)  # "step@30": the warm start's timestep (split_warm_start)
    name, warm_source = split_method(name)
    steps = DEFAULT_STEPS[name] if steps is None else steps  # 0 is meaningful: step:0, the predictor alone
    if name == "ddpm" and steps != 100:
        raise ValueError("DDPM runs every training timestep: use 'ddpm' or 'ddpm:100'.")
    if backbone is None:
        if checkpoint is None:
            raise ValueError(f"Method {name!r} needs --checkpoint (a `step train-policy` output folder).")
        backbone, _ = load_policy(checkpoint, task=task or _env_task(env), features=features_from_spaces(obs_space, action_space))
    model = predictor_model
    if model is None and wants_predictor:
        path = predictor or (find_predictor(checkpoint) if checkpoint else None)
        if path is None:
            raise ValueError("STEP needs a predictor: pass predictor=DIR or train one into <checkpoint>/predictor.")
        model, _ = load_predictor(path, backbone)
    if isinstance(stall, dict):
        stall = StallConfig(**stall)
    cfg = AgentConfig(method=name, steps=steps, seed=seed, first_call=first_call,
                      warm_source=warm_source, warm_start_t=warm_start_t, stall=stall or StallConfig(),
                      trace_predictor=trace_predictor)
    if runtime == "onnx":
        from pathlib import Path

        from agents.onnx_runtime import OnnxDiffusionAgent

        if onnx_dir is None and checkpoint is not None:
            onnx_dir = Path(checkpoint) / "onnx"
        return OnnxDiffusionAgent(backbone, cfg, action_space, batch_size=batch, predictor=model, onnx_dir=onnx_dir,
                                  task=task or _env_task(env))
    if runtime != "torch":
        raise ValueError(f"Unknown runtime {runtime!r}: torch, onnx.")
    return DiffusionAgent(backbone, cfg, action_space, batch_size=batch, predictor=model)

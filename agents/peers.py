"""The peer baselines of the paper's action-reuse and streaming families behind ``make_agent``.

``rtidp[:k]`` (agents/rtidp.py), ``falcon:k`` (agents/falcon.py), ``sdp`` and ``rnrdp`` (agents/streaming.py).
RTI-DP and Falcon run on the task's DDPM-trained backbone; SDP and RNR-DP on its streaming backbone, a
checkpoint trained with per-position noise levels, found at ``<checkpoint>/streaming`` (or the checkpoint
itself when it is one). Every agent keeps ``reset()`` / ``act(obs)``, single env or VectorEnv, one network
call per denoising step for the whole batch, and reports its cost per replan (``nfe_per_replan``) and the
actions each replan executes (``actions_per_replan``).
"""

from __future__ import annotations

import copy

PEER_METHODS = ("rtidp", "falcon", "sdp", "rnrdp")
PEER_NAMES = {"rtidp": "RTI-DP", "falcon": "Falcon", "sdp": "SDP", "rnrdp": "RNR-DP"}
ZERO_STEP_METHODS = ("rtidp",)  # rtidp:0 executes the shifted chunk (tests); other peers need k >= 1
FIXED_SCHEDULE_METHODS = ("sdp", "rnrdp")  # their ladder is the method's: a spec names no step count


def streaming_backbone(method: str, checkpoint, task, features):
    """Load the streaming backbone that serves ``method`` for ``checkpoint`` (a clear error if there is none)."""
    from pathlib import Path

    from agents.checkpoint import load_policy, read_policy_config
    from agents.streaming import STREAM_FOLDER, check_streaming_config, find_streaming

    if checkpoint is None:
        raise ValueError(f"{method} needs --checkpoint (a task checkpoint with a {STREAM_FOLDER}/ backbone, or a "
                         "streaming backbone itself).")
    own = read_policy_config(checkpoint)
    path = Path(checkpoint) if own.get("per_position_timesteps") else find_streaming(checkpoint)
    if path is None:
        check_streaming_config(method, own, f"{checkpoint} (which has no {STREAM_FOLDER}/ folder)")
    check_streaming_config(method, read_policy_config(path), str(path))
    return load_policy(path, task=task, features=features)[0]


def timing_backbone(spec: str, backbone):
    """For latency only: a streaming spec on a chunk backbone is timed on a per-position copy of it (the same
    network plus the per-position timestep mixer: the same cost, untrained weights for the mixer)."""
    from agents.distill import copy_for_timing
    from agents.factory import parse_method
    from agents.per_position import enable_per_position, has_per_position

    backbone = copy_for_timing(parse_method(spec)[0], backbone)  # cp / onedp without their checkpoint (issue 15)
    if parse_method(spec)[0] in ("sdp", "rnrdp") and not has_per_position(backbone):
        backbone = copy.deepcopy(backbone)
        enable_per_position(backbone)
    return backbone


def make_peer_agent(name: str, steps: int | None, env, task: str | None = None, checkpoint: str | None = None,
                    seed: int = 0, backbone=None, predictor_model=None, predictor=None, falcon=None, rtidp=None,
                    runtime: str | None = None, **unused):
    from agents.checkpoint import features_from_spaces, load_policy
    from agents.factory import _env_task, _single_spaces

    if runtime not in (None, "torch", "eager"):
        raise ValueError(f"{name} runs on the eager torch runtime only, not {runtime!r}.")
    if unused:
        raise ValueError(f"{name}: unsupported option(s) {', '.join(sorted(unused))}.")
    obs_space, action_space, batch = _single_spaces(env)
    features = features_from_spaces(obs_space, action_space) if obs_space is not None else None
    task = task or _env_task(env)
    if name in FIXED_SCHEDULE_METHODS:
        from agents.per_position import has_per_position
        from agents.streaming import StreamingAgent

        if steps is not None:
            raise ValueError(f"{name} takes no step count: its schedule is the method's (see agents/streaming.py).")
        if backbone is None or not has_per_position(backbone):
            backbone = streaming_backbone(name, checkpoint, task, features)
        return StreamingAgent(backbone, action_space, name, batch_size=batch, seed=seed)
    if backbone is None:
        if checkpoint is None:
            raise ValueError(f"Method {name!r} needs --checkpoint (a `step train-policy` output folder).")
        backbone, _ = load_policy(checkpoint, task=task, features=features)
    if name == "rtidp":
        from agents.rtidp import DEFAULT_K, RTIDPAgent

        return RTIDPAgent(backbone, action_space, batch_size=batch, seed=seed, steps=DEFAULT_K if steps is None else steps,
                          rtidp=rtidp)
    if name == "falcon":
        from agents.falcon import FalconAgent

        if steps is None:
            raise ValueError("falcon needs its step count k, e.g. 'falcon:4'.")
        return FalconAgent(backbone, action_space, batch_size=batch, seed=seed, steps=steps, falcon=falcon)
    raise ValueError(f"Unknown peer method {name!r}: {', '.join(PEER_METHODS)}.")

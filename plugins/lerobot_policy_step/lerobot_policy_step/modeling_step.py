"""``StepPolicy``: this project's diffusion agents (STEP-k, DDIM-k, ...) behind LeRobot's ``PreTrainedPolicy``.

Nothing is re-implemented here: the policy loads the project checkpoint named by its config (``load_policy`` /
``load_predictor``) and builds the agent with ``agents.make_agent`` for the width of the batch it is given; the
agent keeps the observation history, the action-chunk cache, STEP's previous chunk and stall detector, and
normalises with the checkpoint's own statistics.

Observations: LeRobot's keys map onto this project's env observation (step_envs/contract.py):
  ``observation.state``              (B, state_dim)      -> ``agent_pos``
  ``observation.environment_state``  (B, env_state_dim)  -> ``environment_state``
  ``observation.images.<camera>``    (B, 3, H, W) [0, 1] -> ``pixels[<camera>]`` (B, H, W, 3) uint8
For Push-T, the state policy reads the pusher position and the 8 keypoints of the T: gym-pusht's
``environment_state_agent_pos`` observation, which LeRobot's pusht env gives with
``--env.obs_type=environment_state_agent_pos`` (its default, ``pixels_agent_pos``, has no keypoints).
A missing key, a wrong shape (e.g. a checkpoint for another task) or NaN/inf raises a ValueError naming the key.

``select_action`` returns one action per row (B, action_dim); ``predict_action_chunk`` replans on the given
observation and returns the n_action_steps actions to execute (B, n_action_steps, action_dim). Actions are in
the env's units and clipped to its bounds (``action_low`` / ``action_high``), as the agent does for its own envs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_IMAGES, OBS_STATE
from torch import Tensor

from lerobot_policy_step.configuration_step import StepConfig

# How to get the observation a task's policy reads out of LeRobot's env of that task (shown when it is missing).
ENV_HINTS = {
    "pusht": "with --env.type=pusht pass --env.obs_type=environment_state_agent_pos (the state policy reads the "
             "pusher position and the T's keypoints)",
}


def checkpoint_features(features) -> tuple[dict[str, PolicyFeature], dict[str, PolicyFeature]]:
    """LeRobot's (input_features, output_features) of a checkpoint's FeatureSpec (agents/backbone.py)."""
    inputs = {OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(features.state_dim,))}
    if features.env_state_dim:
        inputs[OBS_ENV_STATE] = PolicyFeature(type=FeatureType.ENV, shape=(features.env_state_dim,))
    for cam, (h, w, c) in features.cameras.items():
        inputs[f"{OBS_IMAGES}.{cam}"] = PolicyFeature(type=FeatureType.VISUAL, shape=(c, h, w))
    return inputs, {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(features.action_dim,))}


def _shapes(features: dict[str, PolicyFeature] | None) -> dict[str, tuple[int, ...]]:
    return {key: tuple(ft.shape) for key, ft in (features or {}).items()}


class StepPolicy(PreTrainedPolicy):
    config_class = StepConfig
    name = "step"

    def __init__(self, config: StepConfig, **kwargs):
        super().__init__(config)
        from agents.backbone import FeatureSpec
        from agents.checkpoint import find_predictor, load_policy, load_predictor, read_policy_config
        from agents.factory import needs_predictor

        root = Path(config.pretrained_path) if config.pretrained_path else Path.cwd()
        path = Path(config.checkpoint) if Path(config.checkpoint).is_absolute() else root / config.checkpoint
        saved = read_policy_config(path)  # FileNotFoundError / ValueError naming the folder
        if config.task is not None and saved["task"] != config.task:
            raise ValueError(f"{path} is a checkpoint for task {saved['task']!r}, but this policy's config says "
                             f"task {config.task!r}: re-export it with `step export --lerobot`.")
        self.task = saved["task"]
        self.checkpoint_path = path
        self.features = FeatureSpec(**saved["features"])
        inputs, outputs = checkpoint_features(self.features)
        # LeRobot fills these from the env (or dataset) when the config leaves them empty, and always sets the
        # output from it: either way they must be what the checkpoint was trained on.
        given_in, given_out = _shapes(config.input_features), _shapes(config.output_features)
        if (given_in and given_in != _shapes(inputs)) or (given_out and given_out != _shapes(outputs)):
            hint = ENV_HINTS.get(self.task)
            raise ValueError(f"Checkpoint {path} (task {self.task!r}) reads {_shapes(inputs)} and writes "
                             f"{_shapes(outputs)}, but LeRobot gives it {given_in} and expects {given_out}: is the "
                             f"env or dataset the checkpoint's task?" + (f" ({hint})" if hint else ""))
        if len(config.action_low) != self.features.action_dim:
            raise ValueError(f"action_low/action_high must have {self.features.action_dim} values (the checkpoint's "
                             f"action dim), got {len(config.action_low)}; re-export with `step export --lerobot`.")
        self.backbone, _ = load_policy(path, task=self.task)
        config.input_features, config.output_features = inputs, outputs
        config.task = self.task
        config.n_obs_steps = self.backbone.cfg.n_obs_steps
        self.predictor = None
        if needs_predictor(config.method):
            predictor_path = find_predictor(path)
            if predictor_path is None:
                raise ValueError(f"{config.method} needs STEP's predictor, and {path} has no predictor/; use a "
                                 f"solver (--policy.method=ddim:4) or train one with `step train-predictor`.")
            self.predictor, _ = load_predictor(predictor_path, self.backbone)
        self._agent = None
        self._fresh = True  # no observation since reset(): the batch width may change here only

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: StepConfig | None = None, **kwargs) -> StepPolicy:
        """A folder written by ``step export --lerobot`` (local only: nothing is downloaded)."""
        folder = Path(pretrained_name_or_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a STEP policy folder (no config.json); write one with "
                                    f"`step export --checkpoint CKPT --out DIR --lerobot`.")
        if config is None:
            config = StepConfig.from_pretrained(folder)
        if config.pretrained_path is None:
            config.pretrained_path = folder
        policy = cls(config)
        policy.to(config.device)
        policy.eval()
        return policy

    # ----- LeRobot's inference API -----
    def reset(self) -> None:
        if self._agent is not None:
            self._agent.reset()
        self._fresh = True

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        agent, obs, device = self._agent_for(batch)
        return torch.from_numpy(agent.act(obs)).to(device)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Tensor], **kwargs) -> Tensor:
        agent, obs, device = self._agent_for(batch)
        agent.cache = None  # replan on this observation, whatever is left of the previous chunk
        agent.act(obs)
        chunk = agent.cache.copy()  # (B, n_action_steps, A): the actions this plan executes, the first included
        agent.cache = None  # the next call replans too
        return torch.from_numpy(chunk).to(device)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict | None]:
        raise NotImplementedError("A STEP policy is trained with this project's `step train-policy` / "
                                  "`step train-predictor`, not through LeRobot.")

    def get_optim_params(self) -> dict:
        raise NotImplementedError("A STEP policy is trained with this project's `step train-policy` / "
                                  "`step train-predictor`, not through LeRobot.")

    # ----- observations and the agent -----
    def _agent_for(self, batch: dict[str, Tensor]):
        """(agent for this batch width, the batch as this project's env observation, the batch's device)."""
        obs, rows, device = self._env_observation(batch)
        moved = next(self.backbone.parameters()).device
        if moved.type != "cpu":  # a script's policy.to(device): the agent's samplers and cache live on the CPU
            raise ValueError(f"The STEP policy runs on the CPU, but it was moved to {moved}; run with the device "
                             f"set to cpu (e.g. --policy.device=cpu, lerobot-rollout --device=cpu).")
        if self._agent is None or self._agent.rows != rows:
            if not self._fresh:
                raise ValueError(f"The batch width changed from {self._agent.rows} to {rows} within an episode; "
                                 f"call reset() between episodes.")
            self._agent = self._make_agent(rows)
            self._agent.reset()  # a new episode, as LeRobot's reset() before it
        self._fresh = False
        return self._agent, obs, device

    def _make_agent(self, rows: int):
        from agents.factory import EnvSpaces, make_agent

        feats = self.features
        entries = {"agent_pos": spaces.Box(-np.inf, np.inf, shape=(feats.state_dim,), dtype=np.float32)}
        if feats.env_state_dim:
            entries["environment_state"] = spaces.Box(-np.inf, np.inf, shape=(feats.env_state_dim,), dtype=np.float32)
        if feats.cameras:
            entries["pixels"] = spaces.Dict({cam: spaces.Box(0, 255, shape=tuple(hwc), dtype=np.uint8)
                                             for cam, hwc in feats.cameras.items()})
        action_space = spaces.Box(np.asarray(self.config.action_low, np.float32),
                                  np.asarray(self.config.action_high, np.float32), dtype=np.float32)
        env = EnvSpaces(spaces.Dict(entries), action_space, num_envs=rows)
        return make_agent(self.config.method, env, task=self.task, checkpoint=str(self.checkpoint_path),
                          seed=self.config.seed, backbone=self.backbone, predictor_model=self.predictor,
                          runtime=self.config.runtime)

    def _env_observation(self, batch: dict[str, Tensor]) -> tuple[dict, int, torch.device]:
        """LeRobot's batch -> this project's env observation (numpy, batch dim first); clear errors on bad input."""
        if not isinstance(batch, dict):
            raise ValueError(f"The STEP policy takes a dict of observation tensors, got {type(batch).__name__}.")
        feats = self.features
        wanted = [(OBS_STATE, (feats.state_dim,))]
        if feats.env_state_dim:
            wanted.append((OBS_ENV_STATE, (feats.env_state_dim,)))
        wanted += [(f"{OBS_IMAGES}.{cam}", (c, h, w)) for cam, (h, w, c) in feats.cameras.items()]
        arrays, rows, device = {}, None, torch.device("cpu")
        for key, shape in wanted:
            if key not in batch:
                hint = ENV_HINTS.get(self.task, "rename the env's keys with --rename_map")
                have = sorted(k for k, v in batch.items() if isinstance(v, Tensor))
                raise ValueError(f"The STEP policy (task {self.task!r}) needs {key!r} {shape}, the observation has "
                                 f"{have}: {hint}.")
            value = batch[key]
            if not isinstance(value, Tensor) or value.ndim != 1 + len(shape) or tuple(value.shape[1:]) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{key!r} has shape {got}, the STEP policy (task {self.task!r}, {self.checkpoint_path}) "
                                 f"expects (batch, {', '.join(map(str, shape))}): is this the checkpoint's task and env?")
            if rows is not None and value.shape[0] != rows:
                raise ValueError(f"{key!r} has {value.shape[0]} rows, the other observations {rows}.")
            rows, device = value.shape[0], value.device
            value = value.detach().to("cpu", torch.float32)
            if not torch.isfinite(value).all():
                raise ValueError(f"{key!r} contains NaN or inf.")
            arrays[key] = value
        obs = {"agent_pos": arrays[OBS_STATE].numpy()}
        if feats.env_state_dim:
            obs["environment_state"] = arrays[OBS_ENV_STATE].numpy()
        if feats.cameras:
            # LeRobot's images are float in [0, 1], channels first; the agent takes the env's uint8 HWC frames.
            obs["pixels"] = {cam: (arrays[f"{OBS_IMAGES}.{cam}"] * 255).round().clamp(0, 255).to(torch.uint8)
                             .permute(0, 2, 3, 1).numpy() for cam in feats.cameras}
        return obs, rows, device

"""Post-hoc STEP for a LeRobot Diffusion Policy: import a ``lerobot-train`` checkpoint as this project's policy.

A LeRobot ``DiffusionPolicy`` pretrained folder (``config.json`` with ``"type": "diffusion"``,
``model.safetensors``, ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their normaliser
state files, as ``lerobot-train`` and ``save_pretrained`` write them) holds the same network our backbone is
built on (``lerobot.policies.diffusion.DiffusionModel``). Importing it:

* the weights are copied as they are (``diffusion.*`` -> ``model.*``), nothing is retrained;
* the normalisation comes from the LeRobot preprocessor's own stats and modes, written as the affine maps of
  our ``Normalizer`` (every LeRobot mode is affine per feature: MIN_MAX [min, max]; MEAN_STD
  [mean - (std + eps), mean + (std + eps)]; QUANTILES / QUANTILE10 [q01, q99] / [q10, q90]; IDENTITY
  [-1, 1], which is what LeRobot's default mapping gives ``observation.environment_state``);
* the result is an ordinary ``step-policy`` checkpoint (``load_policy`` / ``make_agent`` load it; it records
  where it came from), on which ``step train-predictor`` trains STEP's predictor.

Refused with a one-line error: a folder that is not a LeRobot policy, a policy of another type, a
prediction type other than epsilon (our samplers assume it), architecture settings our backbone does not
reproduce, and features that do not match the task's env.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from agents.backbone import Backbone, FeatureSpec, PolicyConfig
from step_envs.dataset import ACTION_KEY, ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY

# DiffusionConfig fields that shape the network or the noise schedule; each must come out of our translation
# unchanged, or the import is refused.
_MODEL_FIELDS = ("n_obs_steps", "horizon", "n_action_steps", "down_dims", "kernel_size", "n_groups",
                 "diffusion_step_embed_dim", "use_film_scale_modulation", "num_train_timesteps", "beta_schedule",
                 "beta_start", "beta_end", "prediction_type", "clip_sample", "clip_sample_range")
_IMAGE_FIELDS = ("vision_backbone", "crop_shape", "spatial_softmax_num_keypoints", "use_group_norm",
                 "use_separate_rgb_encoder_per_camera", "resize_shape", "crop_ratio")


def read_lerobot_config(src) -> dict:
    src = Path(src)
    path = src / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{src} is not a LeRobot pretrained policy folder (no config.json).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(data, dict) or "type" not in data:
        raise ValueError(f"{path} is not a LeRobot policy config (no 'type'); is {src} a `lerobot-train` "
                         f"pretrained_model folder?")
    if data["type"] != "diffusion":
        raise ValueError(f"{src} holds a LeRobot {data['type']!r} policy, not a DiffusionPolicy ('diffusion'); "
                         f"STEP accelerates diffusion policies only.")
    return data


def _normalizer_step(src: Path):
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    if not (src / "policy_preprocessor.json").exists():
        raise FileNotFoundError(f"{src} has no policy_preprocessor.json: the normalisation stats are missing "
                                f"(save the processors with the policy, as lerobot-train does).")
    pipeline = PolicyProcessorPipeline.from_pretrained(src, config_filename="policy_preprocessor.json",
                                                       local_files_only=True)
    for step in pipeline.steps:
        if isinstance(step, NormalizerProcessorStep):
            return step
    raise ValueError(f"{src}/policy_preprocessor.json has no normalizer step; cannot recover the policy's stats.")


def _affine(mode, stats: dict | None, eps: float, dim_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) with LeRobot's normalisation of this feature == 2 (x - lo) / (hi - lo) - 1."""
    from lerobot.configs.types import NormalizationMode

    def stat(name):
        return torch.as_tensor(stats[name], dtype=torch.float64).reshape(dim_shape)

    if mode is None or mode == NormalizationMode.IDENTITY or not stats:
        return -torch.ones(dim_shape, dtype=torch.float64), torch.ones(dim_shape, dtype=torch.float64)
    if mode == NormalizationMode.MIN_MAX:
        return stat("min"), stat("max")
    if mode == NormalizationMode.MEAN_STD:
        half = stat("std") + eps
        return stat("mean") - half, stat("mean") + half
    if mode == NormalizationMode.QUANTILES:
        return stat("q01"), stat("q99")
    if mode == NormalizationMode.QUANTILE10:
        return stat("q10"), stat("q90")
    raise ValueError(f"LeRobot normalisation mode {mode} is not supported.")


def lerobot_to_backbone(src) -> tuple[Backbone, dict]:
    """A Backbone holding the LeRobot DiffusionPolicy in ``src`` (weights and normalisation as they are)."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.configs.types import FeatureType
    from safetensors.torch import load_file

    src = Path(src)
    read_lerobot_config(src)
    lr_cfg = PreTrainedConfig.from_pretrained(src, local_files_only=True)
    if lr_cfg.prediction_type != "epsilon":
        raise ValueError(f"{src}: prediction_type {lr_cfg.prediction_type!r} is not supported (STEP's samplers "
                         f"assume epsilon prediction).")
    state_dim = env_dim = None
    cameras: dict[str, list[int]] = {}
    for key, feat in lr_cfg.input_features.items():
        if key == STATE_KEY:
            state_dim = feat.shape[0]
        elif key == ENV_STATE_KEY:
            env_dim = feat.shape[0]
        elif feat.type == FeatureType.VISUAL and key.startswith(IMAGE_PREFIX):
            c, h, w = feat.shape
            cameras[key[len(IMAGE_PREFIX):]] = [h, w, c]
        else:
            raise ValueError(f"{src}: input feature {key!r} is not one this project's envs provide "
                             f"({STATE_KEY}, {ENV_STATE_KEY}, {IMAGE_PREFIX}<camera>).")
    if state_dim is None or ACTION_KEY not in lr_cfg.output_features:
        raise ValueError(f"{src}: the policy needs {STATE_KEY!r} in and {ACTION_KEY!r} out.")
    features = FeatureSpec(state_dim=state_dim, action_dim=lr_cfg.output_features[ACTION_KEY].shape[0],
                           env_state_dim=env_dim, cameras=cameras)
    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    values = {name: getattr(lr_cfg, name) for name in known if hasattr(lr_cfg, name)}
    backbone = Backbone(PolicyConfig.from_dict(values), features)
    ours = backbone.lerobot_cfg
    for name in _MODEL_FIELDS + (_IMAGE_FIELDS if cameras else ()):
        mine, theirs = getattr(ours, name, None), getattr(lr_cfg, name, None)
        if (list(mine) if isinstance(mine, tuple) else mine) != (list(theirs) if isinstance(theirs, tuple) else theirs):
            raise ValueError(f"{src}: {name}={theirs!r} is not reproduced by this project's backbone ({mine!r}).")

    weights_path = src / "model.safetensors"
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path} is missing; the LeRobot checkpoint is incomplete.")
    weights = load_file(str(weights_path))
    model_weights = {k[len("diffusion."):]: v.float() for k, v in weights.items() if k.startswith("diffusion.")}
    missing, unexpected = backbone.model.load_state_dict(model_weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit the policy's config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}).")

    norm = _normalizer_step(src)
    stats = norm.stats or {}
    modes = {FeatureType(k) if not isinstance(k, FeatureType) else k: v for k, v in norm.norm_map.items()}
    n = backbone.normalizer

    def mode_of(key):
        feat = norm.features.get(key) or lr_cfg.input_features.get(key) or lr_cfg.output_features.get(key)
        return modes.get(feat.type) if feat is not None else None

    with torch.no_grad():
        for key, lo_buf, hi_buf, shape in ((STATE_KEY, n.state_min, n.state_max, (state_dim,)),
                                           (ACTION_KEY, n.action_min, n.action_max, (features.action_dim,)),
                                           (ENV_STATE_KEY, n.env_min, n.env_max, (env_dim or 0,))):
            if shape[0]:
                lo, hi = _affine(mode_of(key), stats.get(key), norm.eps, shape)
                lo_buf.copy_(lo.float()), hi_buf.copy_(hi.float())
        for cam in cameras:  # our images: (x / 255 - mean) / std; LeRobot's are in [0, 1] already
            key = IMAGE_PREFIX + cam
            lo, hi = _affine(mode_of(key), stats.get(key), norm.eps, (3, 1, 1))
            n.image_mean.copy_(((lo + hi) / 2).float()), n.image_std.copy_(((hi - lo) / 2).float())
    info = {"lerobot_policy": str(src.resolve()), "lerobot_type": "diffusion",
            "normalization": {str(k.value if hasattr(k, "value") else k): str(getattr(v, "value", v))
                              for k, v in modes.items()}}
    return backbone.eval(), info


def import_lerobot_policy(src, out, task: str = "pusht") -> dict:
    """Write the LeRobot DiffusionPolicy in ``src`` as a ``step-policy`` checkpoint in ``out`` for ``task``."""
    from agents.checkpoint import features_from_spaces, save_policy
    from step_envs.registry import make_env

    backbone, info = lerobot_to_backbone(src)
    obs_type = "pixels" if backbone.features.cameras else "state"
    env = make_env(task, obs_type=obs_type)
    try:
        env_features = features_from_spaces(env.observation_space, env.action_space)
    finally:
        env.close()
    if dataclasses.asdict(env_features) != dataclasses.asdict(backbone.features):
        raise ValueError(f"{src}: the policy's features {dataclasses.asdict(backbone.features)} do not match task "
                         f"{task!r} ({obs_type}): {dataclasses.asdict(env_features)}; pass the right --task.")
    save_policy(out, backbone, task=task, obs_type=obs_type, extra={"imported_from": info})
    return {"policy": str(out), "task": task, "obs_type": obs_type, **info}

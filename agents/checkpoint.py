"""Checkpoints: a directory with ``config.json`` and ``*.safetensors``; nothing is ever unpickled.

Policy checkpoint (``step train-policy --out DIR``):
  config.json        {"format": "step-policy", task, obs_type, features, policy, train_step, ...}
  model.safetensors  the EMA backbone weights (network + normaliser stats): what agents load
  training_state.*   raw weights, optimiser, EMA and LR schedule for resuming (safetensors + json)
Predictor checkpoint (``step train-predictor --out DIR``, default ``<policy>/predictor``):
  config.json        {"format": "step-predictor", predictor, policy_fingerprint, metrics, ...}
  predictor.safetensors

Each save replaces its files as one set (``step_envs.safe_io.commit_files``): the weights, the config and the
training state never come from two different saves, even when a kill lands in the middle of one. Readers
complete a set that a kill left half-renamed before they read (``finish_commits``), so folders written before
this existed load unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agents.backbone import Backbone, FeatureSpec, PolicyConfig
from agents.predictor import Predictor, PredictorConfig
from step_envs.safe_io import commit_files, discard_staged, finish_commits, folder_lock, replacing_folder

POLICY_FORMAT = "step-policy"
PREDICTOR_FORMAT = "step-predictor"
FORMAT_VERSION = 1


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a clear ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore {what} or write it again.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; restore {what} or write it again.")
    return data


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``load_file`` with a one-line error naming a truncated or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete (re-export or retrain it).")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt; "
                         f"re-export or retrain it.") from None


def _read_config(path: Path, expected: str) -> dict:
    finish_commits(path)  # a save that a kill interrupted after its commit point
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"No checkpoint at {path} (missing config.json).")
    data = read_json(config_path, "the checkpoint")
    if data.get("format") != expected:
        raise ValueError(f"{path} is a {data.get('format')!r} checkpoint, expected {expected!r}.")
    if data.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer version ({data['version']}) of this library.")
    return data


def _tensor_writer(tensors: dict):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return lambda path: save_file(tensors, str(path))


def _json_writer(data: dict):
    text = json.dumps(data, indent=2)
    return lambda path: path.write_text(text)


def features_from_spaces(obs_space, action_space) -> FeatureSpec:
    """The FeatureSpec an env's single observation/action spaces imply."""
    cameras = {}
    if "pixels" in obs_space.spaces:
        cameras = {cam: list(space.shape) for cam, space in obs_space["pixels"].spaces.items()}
    env_dim = obs_space["environment_state"].shape[0] if "environment_state" in obs_space.spaces else None
    return FeatureSpec(
        state_dim=int(obs_space["agent_pos"].shape[0]),
        action_dim=int(action_space.shape[0]),
        env_state_dim=int(env_dim) if env_dim else None,
        cameras=cameras,
    )


LATER_POLICY_FIELDS = ("vision_width", "resize_shape", "separate_camera_encoders")


def policy_fingerprint(backbone: Backbone) -> str:
    """Identifies the normalised spaces a predictor depends on (config, shapes, normaliser stats)."""
    h = hashlib.sha256()
    config = dataclasses.asdict(backbone.cfg)
    # fields added after predictors were released count only when set away from their default, so that the
    # fingerprints of every earlier checkpoint stay what they were
    defaults = PolicyConfig()
    for name in LATER_POLICY_FIELDS:
        if config.get(name) == getattr(defaults, name):
            config.pop(name, None)
    h.update(json.dumps(config, sort_keys=True, default=list).encode())
    h.update(json.dumps(dataclasses.asdict(backbone.features), sort_keys=True).encode())
    for name, buf in sorted(backbone.normalizer.state_dict().items()):
        h.update(name.encode())
        h.update(buf.detach().cpu().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def policy_files(backbone: Backbone, task: str, obs_type: str, extra: dict | None = None) -> dict:
    """The files of a policy checkpoint, as writers for ``commit_files``."""
    config = {
        "format": POLICY_FORMAT,
        "version": FORMAT_VERSION,
        "task": task,
        "obs_type": obs_type,
        "features": dataclasses.asdict(backbone.features),
        "policy": dataclasses.asdict(backbone.cfg),
        "fingerprint": policy_fingerprint(backbone),
    }
    config.update(extra or {})
    return {"model.safetensors": _tensor_writer(backbone.state_dict()), "config.json": _json_writer(config)}


def save_policy(path, backbone: Backbone, task: str, obs_type: str, extra: dict | None = None) -> Path:
    commit_files(path, policy_files(backbone, task, obs_type, extra))
    return Path(path)


def predictor_files(predictor: Predictor, backbone: Backbone, extra: dict | None = None) -> dict:
    """The files of a predictor checkpoint, as writers for ``commit_files`` (the twin of ``policy_files``)."""
    config = {
        "format": PREDICTOR_FORMAT,
        "version": FORMAT_VERSION,
        "predictor": dataclasses.asdict(predictor.cfg),
        "policy_fingerprint": policy_fingerprint(backbone),
    }
    config.update(extra or {})
    return {"predictor.safetensors": _tensor_writer(predictor.state_dict()), "config.json": _json_writer(config)}


def read_policy_config(path) -> dict:
    return _read_config(Path(path), POLICY_FORMAT)


def checkpoint_obs_type(path) -> str:
    """The obs type a policy or distilled checkpoint was trained on; "state" without one (experts, a missing folder:
    loading the agent then says what is wrong)."""
    config = Path(path) / "config.json" if path else None
    if config is None or not config.exists():
        return "state"
    return read_json(config, "the checkpoint").get("obs_type", "state")


def env_provides(env: FeatureSpec, wanted: FeatureSpec) -> bool:
    """Whether an env's observations and actions carry everything a checkpoint reads, in its shapes. Inputs the
    checkpoint does not read are fine (an image policy in a ``pixels_state`` env ignores the env state)."""
    return (env.state_dim == wanted.state_dim and env.action_dim == wanted.action_dim
            and wanted.env_state_dim in (None, 0, env.env_state_dim)
            and all(list(env.cameras.get(cam, [])) == list(shape) for cam, shape in wanted.cameras.items()))


def load_policy(path, task: str | None = None, features: FeatureSpec | None = None) -> tuple[Backbone, dict]:
    """Load a backbone; refuse (ValueError) a checkpoint for another task or other obs/action shapes."""
    path = Path(path)
    config = read_policy_config(path)
    saved = FeatureSpec(**config["features"])
    if task is not None and config["task"] != task:
        raise ValueError(f"Checkpoint {path} was trained for task {config['task']!r}, not {task!r}.")
    if features is not None and not env_provides(features, saved):
        raise ValueError(
            f"Checkpoint {path} expects observations/actions {dataclasses.asdict(saved)}, "
            f"but this env has {dataclasses.asdict(features)} (wrong obs_type or task?)."
        )
    backbone = Backbone(PolicyConfig.from_dict(config["policy"]), saved)
    if config.get("per_position_timesteps"):  # a streaming (SDP / RNR-DP) backbone: agents/per_position.py
        from agents.per_position import enable_per_position

        enable_per_position(backbone)
    backbone.load_state_dict(load_tensors(path / "model.safetensors"))
    backbone.eval()
    return backbone, config


def save_predictor(path, predictor: Predictor, backbone: Backbone, extra: dict | None = None) -> Path:
    commit_files(path, predictor_files(predictor, backbone, extra))
    return Path(path)


def load_predictor(path, backbone: Backbone | None = None) -> tuple[Predictor, dict]:
    """Load a predictor; refuse one trained on another policy's normalised spaces."""
    path = Path(path)
    config = _read_config(path, PREDICTOR_FORMAT)
    if backbone is not None and config["policy_fingerprint"] != policy_fingerprint(backbone):
        raise ValueError(
            f"Predictor {path} was trained for another policy (fingerprint {config['policy_fingerprint']}, "
            f"this policy {policy_fingerprint(backbone)}); retrain it with `step train-predictor`."
        )
    predictor = Predictor(PredictorConfig.from_dict(config["predictor"]))
    predictor.load_state_dict(load_tensors(path / "predictor.safetensors"))
    predictor.eval()
    return predictor, config


CHECKPOINTS_ENV = "STEP_CHECKPOINTS"  # os.pathsep-separated folders that hold <task>/config.json


def checkpoint_search_path() -> list[Path]:
    """Where ``default_checkpoint`` looks, in order: ``$STEP_CHECKPOINTS`` (each folder), ``./checkpoints`` (the
    working directory) and the ``checkpoints/`` folder of a source checkout (an editable install or a clone).

    A non-editable install (``pip install .``) ships the code, not the committed checkpoints (8.9 MB per task):
    point ``STEP_CHECKPOINTS`` at a clone's ``checkpoints/`` folder, run from the clone, or pass --checkpoint.
    """
    folders = [Path(p) for p in os.environ.get(CHECKPOINTS_ENV, "").split(os.pathsep) if p]
    folders += [Path.cwd() / "checkpoints", Path(__file__).resolve().parents[1] / "checkpoints"]
    unique: list[Path] = []
    for folder in folders:
        if folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def default_checkpoint(task: str) -> Path:
    """The committed checkpoint of a task (used when --checkpoint is not given), from ``checkpoint_search_path``.

    FileNotFoundError naming every path tried when none holds ``<task>/config.json``."""
    tried = [folder / task for folder in checkpoint_search_path()]
    for candidate in tried:
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"No checkpoint for task {task!r}; tried {', '.join(map(str, tried))}. Pass --checkpoint, "
                            f"or set {CHECKPOINTS_ENV} to a folder holding {task}/config.json.")


def find_predictor(checkpoint) -> Path | None:
    """The conventional place of a policy's predictor: ``<policy>/predictor``."""
    candidate = Path(checkpoint) / "predictor"
    finish_commits(candidate)
    return candidate if (candidate / "config.json").exists() else None


# ----- resumable training state (tensors in safetensors, the rest in json) -----

def training_state_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The resume files (raw weights, optimiser, EMA, RNGs + step, schedule), as writers for ``commit_files``."""
    return {"training_state.safetensors": _tensor_writer(tensors), "training_state.json": _json_writer(meta)}


def load_training_state(path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The last committed training state of a run folder, or None; completes or discards a killed save first.

    Only the folder's writer (holding its lock) may call this: it deletes the litter of an uncommitted save.
    """
    path = Path(path)
    finish_commits(path)
    discard_staged(path)
    if not (path / "training_state.json").exists() or not (path / "training_state.safetensors").exists():
        return None
    return load_tensors(path / "training_state.safetensors"), read_json(path / "training_state.json", "the run folder")


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state_dict -> (tensors, json-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----- release copies (what gets committed under checkpoints/) -----

RELEASE_LOGS = ("loss.jsonl", "eval.jsonl", "train_config.json")


def _half_weights(tensors: dict[str, torch.Tensor], keep_prefix: str | None) -> dict[str, torch.Tensor]:
    """float32 -> float16 storage; tensors under ``keep_prefix`` (the normaliser stats) stay exact."""
    return {k: (v.half() if v.dtype == torch.float32 and not (keep_prefix and k.startswith(keep_prefix)) else v)
            for k, v in tensors.items()}


# Folders of a release that other commands fill (the streaming fine-tune, the distilled students, a second
# predictor): the policies are self-contained (no link to the backbone's weights at run time), so re-exporting the
# backbone keeps them; a kept predictor is refused at load, with the fingerprint error, if the backbone changed.
RELEASE_SIDE_FOLDERS = ("streaming", "cp", "onedp", "bridger", "predictor_small")


def export_checkpoint(src, dst, half: bool = True, overwrite: bool = False) -> dict:
    """Copy a trained policy and its predictor into a small release folder (no optimiser state).

    With ``half`` the weights are stored as float16 (half the bytes; agents still run in float32, as
    ``load_state_dict`` casts them back). The normaliser stats are kept in float32 so the policy's
    fingerprint, and with it the predictor's link to the policy, does not change.
    ``src`` may also be a ``step train-baseline`` output (a distilled student: Consistency Policy, OneDP,
    BRIDGER), exported the same way to e.g. ``checkpoints/<task>/cp``. With ``overwrite`` a release's
    ``RELEASE_SIDE_FOLDERS`` that ``src`` does not bring are carried over (and listed in the report as ``kept``).
    """
    from agents.distill import DISTILLED_FORMAT, PART_FILES, load_distilled

    src, dst = Path(src), Path(dst)
    finish_commits(src)
    config_path = src / "config.json"
    distilled = config_path.exists() and read_json(config_path, "the checkpoint").get("format") == DISTILLED_FORMAT
    config = _read_config(src, DISTILLED_FORMAT if distilled else POLICY_FORMAT)
    with folder_lock(dst, "export"):
        if dst.exists() and any(dst.iterdir()) and not overwrite:
            raise FileExistsError(f"{dst} is not empty; pass overwrite=True (--overwrite) to replace it.")
        predictor_src = None if distilled else find_predictor(src)
        kept = []
        # Built beside dst and swapped in only once it loads: a failure leaves the old release as it was.
        with replacing_folder(dst) as new:
            new.mkdir()
            weights = load_tensors(src / "model.safetensors")
            # plain writes: the whole folder is the transaction (replacing_folder)
            _tensor_writer(_half_weights(weights, "normalizer.") if half else weights)(new / "model.safetensors")
            config["weights_dtype"] = "float16" if half else "float32"
            _json_writer(config)(new / "config.json")
            for name in RELEASE_LOGS:
                if (src / name).exists():
                    (new / name).write_bytes((src / name).read_bytes())
            for name in PART_FILES if distilled else ():  # a student's frozen side networks (BRIDGeR's CVAE source)
                if (src / name).exists():
                    weights = load_tensors(src / name)
                    _tensor_writer(_half_weights(weights, None) if half else weights)(new / name)
            if predictor_src is not None:
                _read_config(predictor_src, PREDICTOR_FORMAT)  # valid, and any interrupted save completed
                (new / "predictor").mkdir()
                weights = load_tensors(predictor_src / "predictor.safetensors")
                _tensor_writer(_half_weights(weights, None) if half else weights)(new / "predictor" / "predictor.safetensors")
                # the predictor's metrics live in its config.json (train-predictor writes no other file)
                (new / "predictor" / "config.json").write_bytes((predictor_src / "config.json").read_bytes())
            if not distilled and dst.is_dir():
                for name in RELEASE_SIDE_FOLDERS:
                    if (dst / name).is_dir() and not (new / name).exists():
                        shutil.copytree(dst / name, new / name)
                        kept.append(name)
            # Load what was written, so a broken export fails here and not in someone's benchmark.
            if distilled:
                load_distilled(new, config["method"], task=config["task"])
            else:
                backbone, _ = load_policy(new, task=config["task"])
                if predictor_src is not None:
                    load_predictor(new / "predictor", backbone)
    return {"task": config["task"], "out": str(dst), "predictor": predictor_src is not None, "kept": kept,
            "bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())}

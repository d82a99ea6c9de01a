"""The trained few-step peers built on the task's frozen DDPM backbone: Consistency Policy ``cp:k``
(agents/consistency.py) and OneDP ``onedp`` (agents/onedp.py), distilled from it (issue 15), and BRIDGeR
``bridger:k`` (agents/bridger.py), a stochastic-interpolant policy trained on the demonstrations from the
teacher's weights.

This module holds what they share, written once:
  * ``TrainBaselineConfig`` / ``train_baseline``: ``step train-baseline --method cp|onedp|bridger --teacher CKPT
    --dataset DIR [--out DIR]``. The loop reuses the backbone trainer's pieces (agents/training.py: the
    in-memory ``WindowBank``, ``make_optimizer`` = AdamW + cosine warm-up + the Diffusion Policy EMA, bf16
    ``autocast``, the JSONL logs and their truncation on resume, the seeded rollouts, ``folder_lock`` and
    ``commit_files`` saves of weights + config + training state as one set). Each method brings a ``Distiller``
    (its networks and one ``train_step``; BRIDGeR also gets the bank's action windows, for its source); the
    loop does not know which.
  * the checkpoint: format ``step-distilled`` (``load_policy`` refuses it, so no DDIM/STEP agent can run a
    student as if it were a diffusion backbone), the EMA student in ``model.safetensors``, config.json with the
    task, the method, its inference settings and the teacher's path and fingerprint. Default place:
    ``<teacher>/<method>`` (``cp``, ``onedp`` or ``bridger``), beside ``<teacher>/predictor`` and ``<teacher>/streaming``.
  * ``make_distilled_agent``: ``make_agent("cp:2", env, checkpoint=...)`` with the task's checkpoint (its
    ``cp/`` folder is used) or the distilled folder itself; a teacher without that folder, another method's
    checkpoint or another task's is refused with a ValueError. ``DistilledAgent``: the agents' shared part.

The noise schedule is the teacher's (DDPM, 100 steps, squaredcos_cap_v2, epsilon prediction): x_t = a_t x0 +
b_t eps with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t). Neither method uses t = 99: there a_t = 4.9e-4 and the
teacher's epsilon -> x0 map amplifies every error 2000-fold (measured on the Push-T teacher, one step from
N(0, I), 64 chunks: mean |x0| = 105 at t = 99, 0.94 at 95, 0.57 at 90, 0.38 at 75; the teacher's own samplers
survive t = 99 only through their x0 clip). ``top_t`` = 90 (a_t = 0.14, b_t = 0.990, so N(0, I) is very nearly
the marginal there) is the largest timestep either method evaluates; it is a setting, recorded in config.json.
BRIDGeR does not use this schedule (it has its own interpolant, agents/bridger.py).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from agents.backbone import Backbone, FeatureSpec, PolicyConfig
from agents.config_files import option, validate_fields
from agents.diffusion_agents import AgentConfig, DiffusionAgent
from step_envs.seeds import TRAIN_EVAL_SEEDS

DISTILLED_FORMAT = "step-distilled"
DISTILLED_METHODS = ("cp", "onedp", "bridger")
DISTILLED_NAMES = {"cp": "Consistency Policy", "onedp": "OneDP", "bridger": "BRIDGeR"}
SOURCE_FILE = "source.safetensors"  # BRIDGeR's CVAE source (agents/bridger.py), beside the student's weights
PART_FILES = (SOURCE_FILE,)  # the networks a student keeps beside model.safetensors, carried by step export


# ---------------------------------------------------------------- schedule helpers
def schedule_tables(cfg: PolicyConfig) -> tuple[Tensor, Tensor]:
    """(a_t, b_t) = (sqrt(abar_t), sqrt(1 - abar_t)) for t = 0 .. T-1, float32, from the teacher's schedule."""
    from diffusers import DDPMScheduler

    from agents.samplers import ScheduleConfig

    abar = DDPMScheduler(**ScheduleConfig.from_policy(cfg).common_kwargs()).alphas_cumprod.double()
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def gather(table: Tensor, t: Tensor) -> Tensor:
    """Per-row coefficient (B,) -> (B, 1, 1) for (B, H, A) chunks."""
    return table[t].view(-1, 1, 1)


def x0_estimate(net: Backbone, x: Tensor, t: Tensor, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The network's one-step clean estimate (x - b_t eps) / a_t (no clip: the trained models need its gradient)."""
    return (x - gather(b, t) * net.denoise(x, t, cond)) / gather(a, t)


def mark_distilled(backbone: Backbone, settings: dict, parts: dict | None = None) -> Backbone:
    """Tag a backbone as a distilled student (``settings['method']`` = cp | onedp | bridger) with its inference
    settings and the frozen networks its sampler needs beside it (``parts``, e.g. BRIDGeR's CVAE source; a plain
    dict, so they stay out of the backbone's state_dict and fingerprint)."""
    backbone.distilled = dict(settings)
    backbone.distilled_parts = dict(parts or {})
    return backbone


def distilled_settings(backbone) -> dict | None:
    return getattr(backbone, "distilled", None)


# ---------------------------------------------------------------- training config
@dataclass
class TrainBaselineConfig:
    method: str = option(help="cp (Consistency Policy) | onedp (One-Step Diffusion Policy) | bridger (BRIDGeR)",
                         choices=DISTILLED_METHODS)
    teacher: str = option(help="the frozen DDPM backbone (a step train-policy checkpoint)")
    dataset: str = option(help="LeRobotDataset root or `step collect` folder (the teacher's demonstrations)")
    out: str | None = option(None, help="checkpoint folder (default <teacher>/<method>; resumes if it holds a run)")
    steps: int = option(5000, min=1)
    stop_at: int | None = option(None, min=1, help="stop (and save) at this step; rerun to resume towards --steps")
    batch_size: int = option(256, min=1)
    lr: float = 1e-4  # Consistency Policy's public configs (AdamW 1e-4); OneDP: ours
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = option(200, min=0)
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    top_t: int = option(90, min=1, help="largest timestep evaluated (CP's chain top, OneDP's generator timestep)")
    # Consistency Policy (agents/consistency.py)
    cp_skip: int = option(2, min=1, help="cp: timesteps between the chain's adjacent points t_{n+1} = t_n + skip")
    cp_target_decay: float = option(0.95, help="cp: EMA decay mu of the target network (Song et al. 2023, CD)")
    cp_huber_c: float | None = option(None, help="cp: pseudo-Huber c (default 0.00054 sqrt(H*A), iCT)")
    # OneDP (agents/onedp.py)
    onedp_t_min: int = option(2, min=0, help="onedp: smallest timestep of the KL's diffusion chain")
    onedp_t_max: int = option(95, min=0, help="onedp: largest timestep of the KL's diffusion chain")
    onedp_score_lr: float = option(1e-4, help="onedp: learning rate of the generator-score network")
    # BRIDGeR (agents/bridger.py)
    bridger_interpolant: str = option("linear", choices=("linear", "power3"),
                                      help="bridger: I(t, x0, x1) = (1-t) x0 + t x1 (linear) or (1-t)^3 x0 + "
                                           "(1-(1-t)^3) x1 (power3)")
    bridger_gamma: float = option(0.03, min=0.0, help="bridger: d in the latent noise gamma(t) = d sqrt(2t(1-t)) "
                                                      "(the authors' beta_max; 0: no latent noise)")
    bridger_t_eps: float = option(1e-3, help="bridger: train on t ~ U[t_eps, 1-t_eps] (gamma'(t) is infinite at "
                                             "0 and 1); the sampler clips its times to it")
    bridger_source: str = option("gaussian", choices=("gaussian", "cvae"),
                                 help="bridger: x0 from a Gaussian fitted to the action chunks, or from a CVAE of the "
                                      "chunk given the observation, fitted first (the paper's informative source)")
    bridger_source_steps: int = option(3000, min=1, help="bridger: optimiser steps of the CVAE source's fit")
    log_every: int = option(50, min=1)
    save_every: int = option(500, min=1)
    eval_every: int = option(0, min=0, help="0: no periodic rollouts")
    eval_episodes: int = option(5, min=1)
    eval_seed_start: int = TRAIN_EVAL_SEEDS.start
    eval_max_steps: int | None = None
    seed: int = 0
    threads: int = option(0, min=0, help="torch CPU threads (0: every core)")
    precision: str = option("auto", help="auto | bf16 | fp32 for the forward passes (agents/compute.py)")
    progress: bool = True

    def __post_init__(self):
        validate_fields(self)
        if not 0.0 <= self.cp_target_decay < 1.0:
            raise ValueError(f"--cp-target-decay must lie in [0, 1), got {self.cp_target_decay}.")
        if not self.onedp_t_min <= self.onedp_t_max:
            raise ValueError("--onedp-t-min must not exceed --onedp-t-max.")
        if not 0.0 < self.bridger_t_eps < 0.5:
            raise ValueError(f"--bridger-t-eps must lie in (0, 0.5), got {self.bridger_t_eps}.")

    @property
    def eval_method(self) -> str:  # what agents/training.py's _rollout_score runs
        return {"cp": "cp:1", "onedp": "onedp", "bridger": "bridger:2"}[self.method]


class Distiller:
    """One method's networks and training step. ``student``: the network that is EMA'd and saved (the agent's);
    ``aux``: the second trained network (CP's target, OneDP's generator-score net; training state only), None
    for a method with one network (BRIDGeR). ``setup_seconds``: time spent before the first step (BRIDGeR's source
    fits), counted in the run's training time."""

    method: str
    student: Backbone
    aux: Backbone | None = None
    aux_optimizer = None
    aux_schedule = None
    setup_seconds: float = 0.0

    def settings(self) -> dict:  # inference settings recorded in config.json (and read by the agent)
        raise NotImplementedError

    def parts(self) -> dict:  # frozen networks the agent needs beside the student (see mark_distilled)
        return {}

    def files(self) -> dict:  # their files, saved with the student (names in PART_FILES), as commit_files writers
        return {}

    def train_step(self, obs: dict, action: Tensor, generator: torch.Generator, precision: str) -> dict[str, float]:
        raise NotImplementedError


def optimize(loss: Tensor, net: Backbone, optimizer, schedule, max_norm: float = 10.0) -> None:
    """One optimiser step of ``net`` on ``loss`` (gradient norm clipped as the backbone trainer does), then the
    learning-rate schedule's step: the update every trained network of these methods makes."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.model.parameters(), max_norm)
    optimizer.step()
    schedule.step()


def make_distiller(teacher: Backbone, cfg: TrainBaselineConfig, optimizer_factory, bank) -> Distiller:
    """``bank``: the training WindowBank (BRIDGeR fits its source to its windows; a resumed run in ``cfg.out``
    reuses the saved one)."""
    if cfg.top_t >= teacher.cfg.num_train_timesteps:
        raise ValueError(f"--top-t must be below the teacher's {teacher.cfg.num_train_timesteps} timesteps.")
    if cfg.method == "bridger":
        from agents.bridger import BridgerDistiller

        return BridgerDistiller(teacher, cfg, bank, optimizer_factory, out=cfg.out)
    if cfg.method == "cp":
        from agents.consistency import ConsistencyDistiller

        return ConsistencyDistiller(teacher, cfg, optimizer_factory)
    from agents.onedp import OneDPDistiller

    if cfg.onedp_t_max >= teacher.cfg.num_train_timesteps:
        raise ValueError(f"--onedp-t-max must be below the teacher's {teacher.cfg.num_train_timesteps} timesteps.")
    return OneDPDistiller(teacher, cfg, optimizer_factory)


def _rename(tensors: dict, old: str, new: str) -> dict:
    return {new + k[len(old):]: v for k, v in tensors.items() if k.startswith(old)}


def train_baseline(cfg: TrainBaselineConfig) -> dict:
    """Distil (or resume distilling) ``cfg.method`` from the teacher; returns a summary dict. Resuming is exact
    (the same contract as ``train_policy``: weights, optimisers, EMA, target / score network, RNGs as one set)."""
    from step_envs.safe_io import folder_lock

    out = cfg.out or str(Path(cfg.teacher) / cfg.method)
    with folder_lock(out, "train-baseline"):
        return _train_baseline(dataclasses.replace(cfg, out=out))


def _train_baseline(cfg: TrainBaselineConfig) -> dict:
    from agents.checkpoint import (
        flatten_optimizer,
        load_policy,
        load_training_state,
        policy_files,
        policy_fingerprint,
        training_state_files,
        unflatten_optimizer,
    )
    from agents.compute import resolve_precision, resolve_threads
    from agents.training import TrainingRun, WindowBank, _ema_backbone, _rollout_score, load_frames, make_optimizer
    from step_envs.safe_io import commit_files
    from step_envs.seeds import check_train_eval_seeds

    if cfg.eval_every:
        check_train_eval_seeds(cfg.eval_seed_start, cfg.eval_episodes)
    torch.set_num_threads(resolve_threads(cfg.threads))
    out = Path(cfg.out)
    teacher, teacher_config = load_policy(cfg.teacher)
    if teacher_config.get("per_position_timesteps"):
        raise ValueError(f"--teacher {cfg.teacher} is a streaming (per-position) backbone; distil from the task's "
                         "DDPM backbone.")
    teacher.requires_grad_(False)
    precision = resolve_precision(cfg.precision, has_images=bool(teacher.features.cameras))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = load_frames(cfg.dataset, use_images=bool(teacher.features.cameras),
                       use_env_state=bool(teacher.features.env_state_dim), progress=cfg.progress)
    if dataclasses.asdict(data.features()) != dataclasses.asdict(teacher.features):
        raise ValueError(f"Dataset features {dataclasses.asdict(data.features())} do not match the teacher's "
                         f"{dataclasses.asdict(teacher.features)}.")
    bank = WindowBank.for_policy(data, teacher.cfg)
    if len(bank) == 0:
        raise ValueError("Dataset too small: no training windows.")

    distiller = make_distiller(teacher, cfg, make_optimizer, bank)
    student = distiller.student
    optimizer, lr_schedule, ema = make_optimizer(student, cfg)
    distiller.optimizer, distiller.lr_schedule = optimizer, lr_schedule
    settings = distiller.settings()
    fingerprint = hashlib.sha256(json.dumps({"teacher": policy_fingerprint(teacher), **settings},
                                            sort_keys=True).encode()).hexdigest()[:16]
    task, obs_type = teacher_config["task"], teacher_config.get("obs_type", "state")
    run = TrainingRun(out, cfg, optimizer, lr_schedule, ema, torch.Generator().manual_seed(cfg.seed))
    resumed = load_training_state(out)
    if resumed is not None:
        tensors, meta = resumed
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(f"{out} holds a run of another method, teacher or setting; choose another --out.")
        student.load_state_dict(_rename(tensors, "model.", ""))
        if distiller.aux is not None:
            distiller.aux.load_state_dict(_rename(tensors, "aux.", ""))
        if distiller.aux_optimizer is not None:
            distiller.aux_optimizer.load_state_dict(unflatten_optimizer(_rename(tensors, "aux_opt.", "opt."),
                                                                        meta["aux_optimizer"]))
            distiller.aux_schedule.load_state_dict(meta["aux_lr_schedule"])
        run.restore(tensors, meta)
    else:
        run.elapsed_before = distiller.setup_seconds  # a resumed run's saved seconds already hold it
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    trainable = sum(p.numel() for p in student.parameters())
    if distiller.aux_optimizer is not None:  # a trained second network (OneDP's score net; CP's target is an EMA)
        trainable += sum(p.numel() for p in distiller.aux.parameters())
    trainable += sum(p.numel() for part in distiller.parts().values() for p in part.parameters())  # fitted first

    def averaged() -> Backbone:
        return mark_distilled(_ema_backbone(student, ema), settings, distiller.parts())

    def save() -> None:
        extra = {"format": DISTILLED_FORMAT, "method": cfg.method, "distilled": settings, "train_step": run.step,
                 "teacher": str(Path(cfg.teacher).resolve()), "teacher_fingerprint": policy_fingerprint(teacher),
                 "trainable_parameters": trainable}
        files = policy_files(averaged(), task, obs_type, extra=extra)
        files.update(distiller.files())
        tensors, meta = run.state()
        tensors.update({f"model.{k}": v for k, v in student.state_dict().items()})
        if distiller.aux is not None:
            tensors.update({f"aux.{k}": v for k, v in distiller.aux.state_dict().items()})
        meta.update(fingerprint=fingerprint, precision=precision)
        if distiller.aux_optimizer is not None:
            aux_tensors, meta["aux_optimizer"] = flatten_optimizer(distiller.aux_optimizer)
            tensors.update(_rename(aux_tensors, "opt.", "aux_opt."))
            meta["aux_lr_schedule"] = distiller.aux_schedule.state_dict()
        files.update(training_state_files(tensors, meta))
        commit_files(out, files)

    student.train()
    bar = run.begin(f"train-baseline {cfg.method} ({precision})")
    while run.step < run.end:
        obs, action, _ = bank.batch(torch.randint(len(bank), (cfg.batch_size,), generator=run.generator))
        losses = distiller.train_step(obs, action, run.generator, precision)
        ema.step(student.parameters())
        run.stepped(losses, save, lambda: _rollout_score(averaged(), _EvalView(cfg, task, obs_type)))
    bar.close()
    if resumed is not None and run.step == resumed[1]["step"]:
        save()
    return {"out": str(out), "method": cfg.method, "task": task, "step": run.step, "trainable_parameters": trainable,
            "eval": run.last_eval}


@dataclass
class _EvalView:
    """The fields ``agents.training._rollout_score`` reads, for a distilled run."""

    cfg: TrainBaselineConfig
    task: str
    obs_type: str

    def __getattr__(self, name):
        return getattr(self.cfg, name)


# ---------------------------------------------------------------- checkpoints and agents
def read_distilled_config(path) -> dict:
    from agents.checkpoint import _read_config

    return _read_config(Path(path), DISTILLED_FORMAT)


def load_distilled(path, method: str, task: str | None = None, features: FeatureSpec | None = None) -> tuple[Backbone, dict]:
    """Load a distilled student; refuse another method's, another task's, or other shapes (ValueError)."""
    from agents.checkpoint import env_provides, load_tensors

    path = Path(path)
    config = read_distilled_config(path)
    if config.get("method") != method:
        raise ValueError(f"{path} is a {config.get('method')!r} checkpoint (step train-baseline --method "
                         f"{config.get('method')}), not {method!r}.")
    if task is not None and config["task"] != task:
        raise ValueError(f"Checkpoint {path} was distilled for task {config['task']!r}, not {task!r}.")
    saved = FeatureSpec(**config["features"])
    if features is not None and not env_provides(features, saved):
        raise ValueError(f"Checkpoint {path} expects observations/actions {dataclasses.asdict(saved)}, but this env "
                         f"has {dataclasses.asdict(features)} (wrong obs_type or task?).")
    backbone = Backbone(PolicyConfig.from_dict(config["policy"]), saved)
    backbone.load_state_dict(load_tensors(path / "model.safetensors"))
    parts = {}
    if method == "bridger":
        from agents.bridger import load_parts

        parts = load_parts(path, config["distilled"], backbone.action_shape)
    return mark_distilled(backbone.eval(), config["distilled"], parts), config


def find_distilled(checkpoint, method: str) -> Path:
    """The distilled folder that serves ``method`` for ``checkpoint``: the folder itself when it is a distilled
    checkpoint, else ``<checkpoint>/<method>``; a clear ValueError for a teacher without one."""
    from step_envs.safe_io import finish_commits

    path = Path(checkpoint)
    finish_commits(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"No checkpoint at {path} (missing config.json).")
    from agents.checkpoint import read_json

    fmt = read_json(config_path, "the checkpoint").get("format")
    if fmt == DISTILLED_FORMAT:
        return path
    candidate = path / method
    finish_commits(candidate)
    if (candidate / "config.json").exists():
        return candidate
    raise ValueError(f"{method} needs a {DISTILLED_NAMES[method]} checkpoint: {path} is a {fmt!r} checkpoint (the "
                     f"teacher) with no {method}/ folder; distil one with `step train-baseline --method {method} "
                     f"--teacher {path} --dataset DIR`.")


def make_distilled_agent(name: str, steps: int | None, env, task: str | None = None, checkpoint: str | None = None,
                         seed: int = 0, backbone=None, predictor_model=None, predictor=None, runtime: str | None = None,
                         **unused):
    """``cp[:k]`` / ``onedp`` / ``bridger[:k]`` behind ``make_agent``. ``backbone``: an already loaded student (a
    teacher backbone, as ``step bench`` passes for every method, is ignored and the student is loaded from
    ``checkpoint``)."""
    from agents.checkpoint import features_from_spaces
    from agents.factory import _env_task, _single_spaces

    if runtime not in (None, "torch", "eager"):
        raise ValueError(f"{name} runs on the eager torch runtime only, not {runtime!r}.")
    if unused:
        raise ValueError(f"{name}: unsupported option(s) {', '.join(sorted(unused))}.")
    obs_space, action_space, batch = _single_spaces(env)
    settings = distilled_settings(backbone) if backbone is not None else None
    if settings is None or settings.get("method") != name:
        if checkpoint is None:
            raise ValueError(f"{name} needs --checkpoint (the task's checkpoint with a {name}/ folder, or a "
                             f"`step train-baseline --method {name}` output folder).")
        features = features_from_spaces(obs_space, action_space) if obs_space is not None else None
        backbone, _ = load_distilled(find_distilled(checkpoint, name), name, task=task or _env_task(env),
                                     features=features)
    if name == "cp":
        from agents.consistency import ConsistencyAgent

        return ConsistencyAgent(backbone, action_space, batch_size=batch, seed=seed, steps=1 if steps is None else steps)
    if name == "bridger":
        from agents.bridger import DEFAULT_STEPS, BridgerAgent

        return BridgerAgent(backbone, action_space, batch_size=batch, seed=seed,
                            steps=DEFAULT_STEPS if steps is None else steps)
    from agents.onedp import OneDPAgent

    if steps not in (None, 1):
        raise ValueError(f"onedp is one generator call per chunk: use 'onedp' (or 'onedp:1'), not 'onedp:{steps}'.")
    return OneDPAgent(backbone, action_space, batch_size=batch, seed=seed)


def copy_for_timing(spec_name: str, backbone: Backbone) -> Backbone:
    """``step latency`` without a distilled checkpoint: a copy of the teacher tagged as the student (the same
    network, so the same cost per call; its outputs are not the method's)."""
    if spec_name not in DISTILLED_METHODS or distilled_settings(backbone) is not None:
        return backbone
    if spec_name == "cp":
        from agents.consistency import default_settings

        settings = default_settings(backbone.cfg)
    elif spec_name == "onedp":
        from agents.onedp import default_settings

        settings = default_settings(backbone.cfg)
    else:
        from agents.bridger import default_settings

        settings = default_settings(backbone.cfg, backbone.features.action_dim)  # source N(0, I): no data here
    return mark_distilled(copy.deepcopy(backbone), settings)


class DistilledAgent(DiffusionAgent):
    """DiffusionAgent mechanics (history, chunk cache, per-row generators, unnormalise + clip into the action
    space + execute Ta actions) for a student tagged with ``method``'s settings; subclasses write ``plan`` and
    end it with ``clip`` (the teacher config's x0 clip in the normalised space)."""

    method: str

    def __init__(self, backbone: Backbone, action_space, batch_size: int | None = None, seed: int = 0,
                 steps: int = 1):
        settings = distilled_settings(backbone)
        if settings is None or settings.get("method") != self.method:
            raise ValueError(f"{type(self).__name__} needs a {DISTILLED_NAMES[self.method]} student (step "
                             f"train-baseline --method {self.method}).")
        # the DDIM config only satisfies DiffusionAgent's checks; ``plan`` replaces its sampler
        super().__init__(backbone, AgentConfig(method="ddim", steps=1, seed=seed), action_space, batch_size)
        self.cfg = dataclasses.replace(self.cfg, steps=steps)
        self.settings = settings
        pc = backbone.cfg
        self.clip_range = pc.clip_sample_range if pc.clip_sample else None
        self.nfe_per_replan = float(steps)
        self.actions_per_replan = pc.n_action_steps

    def clip(self, chunk: Tensor) -> Tensor:
        return chunk.clamp(-self.clip_range, self.clip_range) if self.clip_range is not None else chunk

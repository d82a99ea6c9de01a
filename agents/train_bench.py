"""``step train-bench``: training throughput of a task's backbone over precision x threads x batch size.

Each row times real optimizer steps (``agents.training.optimizer_step``: forward, backward, clip, AdamW,
schedule, EMA) of the task's preset on synthetic batches shaped like the task's observations (or on
real windows with ``--dataset``). The baseline row is the configuration the project trained with
before the fast path (fp32, one thread, batch 64); the ``config`` row is what ``configs/`` now uses.
Speed depends on what else runs: measure on a quiet machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agents.backbone import PRESETS, Backbone, FeatureSpec
from agents.compute import (
    CHANNELS_LAST,
    available_cores,
    cpu_has_amx,
    cpu_has_bf16,
    resolve_channels_last,
    resolve_precision,
    resolve_threads,
    use_channels_last,
)
from agents.config_files import build_config, option, validate_fields
from agents.training import TrainPolicyConfig, WindowBank, fit_normalizer, load_frames, make_optimizer, optimizer_step
from step_envs.dataset import ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY

BASELINE = {"precision": "fp32", "threads": 1, "batch_size": 64}
DEFAULT_PRESET = {"state": "state", "pixels": "pusht_image"}


@dataclass
class TrainBenchConfig:
    task: str = "pusht"
    obs_type: str = option("state", choices=("state", "pixels"))
    preset: str | None = option(None, help="backbone preset (default: state, or pusht_image for pixels)")
    precisions: tuple[str, ...] = option(("fp32", "bf16"), help="comma list of fp32,bf16")
    threads: tuple[int, ...] = option((1, 0), help="comma list; 0 = every core")
    batch_sizes: tuple[int, ...] = option((64, 256), help="comma list")
    steps: int = option(8, min=1, help="timed optimizer steps per setting")
    # untimed steps first (oneDNN picks its kernels on the first calls)
    warmup: int = option(2, min=0, help="untimed steps before timing each setting")
    dataset: str | None = option(None, help="time on real windows of this dataset (default: synthetic)")
    config: str | None = option(None, help="training config to mark (default configs/<task>_<obs>_policy.yaml)")
    channels_last: str = option("auto", choices=CHANNELS_LAST,
                                help="image encoder in NHWC memory format: auto (as training decides per row: bf16 "
                                     "on a CPU with AMX), on, off (agents/compute.py)")
    seed: int = 0
    json: str | None = option(None, help="write JSON here, with .md and .png beside it")
    progress: bool = True

    def __post_init__(self):
        validate_fields(self)


def _task_features(task: str, obs_type: str) -> FeatureSpec:
    from agents.checkpoint import features_from_spaces
    from step_envs.registry import make_env

    env = make_env(task, obs_type=obs_type)
    try:
        return features_from_spaces(env.observation_space, env.action_space)
    finally:
        env.close()


def _synthetic_batch(backbone: Backbone, batch: int, gen: torch.Generator) -> tuple[dict, torch.Tensor, torch.Tensor]:
    f, c = backbone.features, backbone.cfg
    obs = {STATE_KEY: torch.rand(batch, c.n_obs_steps, f.state_dim, generator=gen)}
    if f.env_state_dim:
        obs[ENV_STATE_KEY] = torch.rand(batch, c.n_obs_steps, f.env_state_dim, generator=gen)
    for cam, (h, w, ch) in f.cameras.items():
        obs[IMAGE_PREFIX + cam] = torch.randint(0, 256, (batch, c.n_obs_steps, ch, h, w), generator=gen, dtype=torch.uint8)
    action = torch.rand(batch, c.horizon, f.action_dim, generator=gen) * 2 - 1
    return obs, action, torch.zeros(batch, c.horizon, dtype=torch.bool)


def _configured_setting(cfg: TrainBenchConfig) -> dict | None:
    path = Path(cfg.config) if cfg.config else Path("configs") / f"{cfg.task}_{cfg.obs_type}_policy.yaml"
    if not path.exists():
        return None
    train = build_config(TrainPolicyConfig, path, dataset="", out="")
    return {"precision": resolve_precision(train.precision, has_images=cfg.obs_type == "pixels", quiet=True),
            "threads": resolve_threads(train.threads), "batch_size": train.batch_size, "file": str(path)}


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    if cfg.obs_type not in DEFAULT_PRESET:
        raise ValueError(f"obs_type must be one of {list(DEFAULT_PRESET)}, got {cfg.obs_type!r}")
    preset = cfg.preset or DEFAULT_PRESET[cfg.obs_type]
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: {', '.join(PRESETS)}")
    if cfg.steps < 1 or cfg.warmup < 0:
        raise ValueError("steps must be >= 1 and warmup >= 0")
    for p in cfg.precisions:
        if p not in ("fp32", "bf16"):
            raise ValueError(f"precisions are fp32 / bf16, got {p!r}")
    if "bf16" in cfg.precisions and not cpu_has_bf16():
        print("train-bench: this CPU has no native bf16; bf16 rows run on emulated kernels")
    configured = _configured_setting(cfg)
    settings = [dict(precision=p, threads=resolve_threads(t), batch_size=b)
                for p, t, b in itertools.product(cfg.precisions, cfg.threads, cfg.batch_sizes)]
    for extra in (BASELINE, configured):  # the two rows the speed-up is measured between are always timed
        if extra is not None:
            row = {k: extra[k] for k in ("precision", "threads", "batch_size")}
            if row not in settings:
                settings.append(row)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.dataset:
        data = load_frames(cfg.dataset, use_images=cfg.obs_type == "pixels", use_env_state=cfg.obs_type == "state",
                           progress=cfg.progress)
        features = data.features()
    else:
        features = _task_features(cfg.task, cfg.obs_type)
    policy_cfg = PRESETS[preset]
    backbone = Backbone(policy_cfg, features)
    bank = None
    if cfg.dataset:
        fit_normalizer(backbone, data)
        bank = WindowBank.for_policy(data, policy_cfg)
    backbone.train()
    train_cfg = TrainPolicyConfig(dataset="", out="", steps=10**6)
    rows = []
    old_threads = torch.get_num_threads()
    try:
        for setting in tqdm(settings, desc=f"train-bench {cfg.task}/{cfg.obs_type}", unit="setting", disable=not cfg.progress):
            torch.set_num_threads(setting["threads"])
            nhwc = bool(features.cameras) and resolve_channels_last(cfg.channels_last, setting["precision"])
            if features.cameras:  # before the optimizer is made: it holds the parameters
                use_channels_last(backbone.model, nhwc)
            optimizer, lr_schedule, ema = make_optimizer(backbone, train_cfg)
            times = []
            for i in range(cfg.warmup + cfg.steps):
                if bank is not None:
                    batch = bank.batch(torch.randint(len(bank), (setting["batch_size"],), generator=gen))
                else:
                    batch = _synthetic_batch(backbone, setting["batch_size"], gen)
                t0 = time.perf_counter()
                optimizer_step(backbone, optimizer, lr_schedule, ema, *batch, setting["precision"])
                if i >= cfg.warmup:
                    times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            rows.append({**setting, "channels_last": nhwc, "samples_per_s": round(setting["batch_size"] / step_s, 1),
                         "step_ms": round(step_s * 1000, 1),
                         "baseline": {k: setting[k] for k in BASELINE} == BASELINE,
                         "config": configured is not None and all(setting[k] == configured[k] for k in BASELINE)})
    finally:
        torch.set_num_threads(old_threads)
    base = next(r for r in rows if r["baseline"])
    for row in rows:
        row["speedup"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
    return {"task": cfg.task, "obs_type": cfg.obs_type, "preset": preset,
            "parameters": sum(p.numel() for p in backbone.model.parameters()),
            "batches": "dataset " + cfg.dataset if cfg.dataset else "synthetic", "timed_steps": cfg.steps,
            "channels_last": cfg.channels_last, "cores": available_cores(), "cpu_bf16": cpu_has_bf16(),
            "cpu_amx": cpu_has_amx(),
            "config": configured, "rows": rows, "bench_config": dataclasses.asdict(cfg)}


def markdown(result: dict) -> str:
    lines = [f"Task: {result['task']} ({result['obs_type']}), preset {result['preset']} "
             f"({result['parameters'] / 1e6:.1f} M parameters), {result['batches']} batches, "
             f"median of {result['timed_steps']} optimizer steps per row, {result['cores']} cores.", "",
             "| precision | threads | batch | layout | samples/s | ms/step | x baseline | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tag = ", ".join(t for t, on in (("baseline", r["baseline"]), ("config", r["config"])) if on)
        layout = "NHWC" if r.get("channels_last") else "NCHW" if result["obs_type"] == "pixels" else "-"
        lines.append(f"| {r['precision']} | {r['threads']} | {r['batch_size']} | {layout} | {r['samples_per_s']:.0f} | "
                     f"{r['step_ms']:.0f} | {r['speedup']:.2f} | {tag} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, json_path: str | Path) -> None:
    """JSON at ``json_path``, the Markdown table and a bar chart beside it (same stem)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    json_path.with_suffix(".md").write_text(markdown(result))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels = [f"{r['precision']}, {r['threads']} thr, batch {r['batch_size']}" + (", NHWC" if r.get("channels_last") else "")
              for r in rows]
    colors = ["tab:gray" if r["baseline"] else "tab:green" if r["config"] else "tab:blue" for r in rows]
    ax.barh(labels, [r["samples_per_s"] for r in rows], color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("training samples / s (grey: baseline, green: configs/)")
    ax.set_title(f"{result['task']} {result['obs_type']}: preset {result['preset']}")
    fig.tight_layout()
    fig.savefig(json_path.with_suffix(".png"), dpi=120)
    plt.close(fig)

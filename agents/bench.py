"""``step bench``: every method on the same seeds, success and latency side by side (the paper's Table 2).

Rollouts are batched (one network call for all envs per replan); latency is the batch-1 chunk time
from ``agents.latency`` with the bare one-NFE time measured in the same run. Writes
``results.json``, ``results.md`` and ``pareto.png`` (success against latency, log-scaled latency).
"""

from __future__ import annotations

import json
import time
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agents.factory import make_agent, parse_method
from agents.latency import LatencyConfig, measure_latency
from step_envs.registry import get_task, make_env
from step_envs.rollout import rollout, summarize

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("ddpm:100", "ddim:4", "ddim:2", "dpmsolver:4", "dpmsolver:2", "step:4", "step:2", "step:1")
METHOD_NAMES = {"ddpm": "Vanilla (DDPM)", "ddim": "DDIM", "dpmsolver": "DPM-Solver++", "step": "STEP",
                "step-spatial": "STEP, spatial only", "step-temporal": "STEP, temporal only"}


def default_checkpoint(task: str) -> Path:
    """The committed checkpoint of a task (state policy), used when --checkpoint is not given."""
    return REPO_ROOT / "checkpoints" / task


@dataclass
class BenchConfig:
    task: str = "pusht"
    methods: tuple[str, ...] = DEFAULT_METHODS
    episodes: int = 50
    seed_start: int = 0
    num_envs: int = 50  # envs batched per wave (one agent call per step for all of them)
    checkpoint: str | None = None  # default: checkpoints/<task>
    out: str = "results/pusht"
    latency_calls: int = 50
    latency_threads: int = 1  # batch-1 latency is measured with a fixed torch thread count
    max_steps: int | None = None  # cap episodes below the task horizon (quick smoke runs only)
    # Re-measure only the latency of an existing results.json in ``out`` (e.g. on a quiet machine after
    # rollouts that ran beside other jobs); success rows are kept as they are.
    latency_only: bool = False
    progress: bool = True


def run_bench(cfg: BenchConfig) -> dict:
    import torch

    from agents.checkpoint import find_predictor, load_policy, load_predictor

    spec = get_task(cfg.task)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(spec.name)
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"No policy checkpoint at {checkpoint}; train one with `step train-policy`.")
    if cfg.episodes < 1:
        raise ValueError("episodes must be at least 1")
    methods = [parse_method(m) for m in cfg.methods]  # validate every spec before any work
    backbone, policy_cfg = load_policy(checkpoint, task=spec.name)
    predictor_path = find_predictor(checkpoint)
    predictor = load_predictor(predictor_path, backbone)[0] if predictor_path else None
    obs_type = policy_cfg["obs_type"]
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.episodes))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if cfg.latency_only:
        previous = load_report(out)
        if previous["task"] != spec.name or Path(previous["checkpoint"]).resolve() != checkpoint.resolve():
            raise ValueError(f"{out}/results.json is for {previous['task']} / {previous['checkpoint']}, "
                             f"not {spec.name} / {checkpoint}.")
        cfg = replace(cfg, methods=tuple(previous["config"]["methods"]))
        rows = previous["rows"]
    else:
        rows = _rollout_rows(cfg, spec, checkpoint, backbone, predictor, obs_type, seeds, methods)

    # Latency after the rollouts, with its own fixed thread count, one method after another.
    threads_before = torch.get_num_threads()
    env = make_env(spec.name, obs_type=obs_type)
    latency_rows = measure_latency(
        backbone, predictor, LatencyConfig(methods=tuple(cfg.methods), calls=cfg.latency_calls,
                                           threads=cfg.latency_threads), env.action_space)
    env.close()
    torch.set_num_threads(threads_before)
    for row, lat in zip(rows, latency_rows):
        row.update(latency_ms=lat["latency_ms"], nfe_ms_median=lat["nfe_ms_median"], ratio=lat["ratio"])

    report = {
        "task": spec.name,
        "checkpoint": str(checkpoint),
        "obs_type": obs_type,
        "latency_threads": cfg.latency_threads,
        # a latency-only rerun keeps the wall time of the run that made the success rows
        "wall_seconds": previous["wall_seconds"] if cfg.latency_only else time.perf_counter() - t_start,
        "latency_remeasured": cfg.latency_only,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    pareto_plot(report, out / "pareto.png")
    return report


def _rollout_rows(cfg, spec, checkpoint, backbone, predictor, obs_type, seeds, methods) -> list[dict]:
    rows = []
    for spec_str, (name, steps) in zip(cfg.methods, methods):
        env = make_env(spec.name, obs_type=obs_type, num_envs=min(cfg.num_envs, len(seeds)))
        try:
            agent = make_agent(spec_str, env, task=spec.name, checkpoint=str(checkpoint), backbone=backbone,
                               predictor_model=predictor)
            t0 = time.perf_counter()
            results = rollout(env, agent, seeds, progress=cfg.progress, max_steps=cfg.max_steps)
            rollout_seconds = time.perf_counter() - t0
        finally:
            env.close()
        summary = summarize(results)
        steps = agent.cfg.steps
        if cfg.progress:
            print(f"{spec_str}: success {summary['success_rate']:.2f}, mean max reward {summary['mean_max_reward']:.3f} "
                  f"({rollout_seconds:.0f} s)")
        rows.append({
            "method": name, "steps": steps, "episodes": len(seeds), "seed_start": cfg.seed_start,
            "success_rate": summary["success_rate"], "mean_max_reward": summary["mean_max_reward"],
            "rollout_seconds": rollout_seconds,
        })
    return rows


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (sound at 0/n and n/n, unlike the normal approximation)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def row_interval(row: dict) -> tuple[float, float]:
    return wilson_interval(round(row["success_rate"] * row["episodes"]), row["episodes"])


def success_cell(row: dict) -> str:
    lo, hi = row_interval(row)
    return f"{row['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def seed_range(row: dict) -> str:
    return f"{row['seed_start']}-{row['seed_start'] + row['episodes'] - 1}"


def _label(row: dict) -> str:
    return f"{METHOD_NAMES.get(row['method'], row['method'])}-{row['steps']}"


def markdown_table(report: dict) -> str:
    """The paper's Table 2 layout: per method and step count, score and time."""
    reward_name = "mean max coverage" if report["task"] == "pusht" else "mean max reward"
    lines = [
        f"Task: {report['task']} ({report['obs_type']}), {report['rows'][0]['episodes']} episodes on seeds "
        f"{seed_range(report['rows'][0])}; success with its 95 % Wilson interval; latency: batch 1, "
        f"{report['latency_threads']} torch thread(s).",
        "",
        f"| Method | Step | Success [95 % CI] | {reward_name} | Time (ms, median) | p90 (ms) | NFE (ms) | Time / (Step x NFE) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for row in report["rows"]:
        name = METHOD_NAMES.get(row["method"], row["method"])
        shown = name if name != previous else ""
        previous = name
        lines.append(
            f"| {shown} | {row['steps']} | {success_cell(row)} | {row['mean_max_reward']:.3f} | "
            f"{row['latency_ms']['median']:.1f} | {row['latency_ms']['p90']:.1f} | {row['nfe_ms_median']:.2f} | "
            f"{row['ratio']:.2f} |")
    lines.append("")
    lines.append(f"Bench wall time: {report['wall_seconds']:.0f} s."
                 + (" Latency re-measured afterwards on its own (`--latency-only`)." if report.get("latency_remeasured") else ""))
    return "\n".join(lines) + "\n"


def _pareto_panel(ax, report: dict, colours: dict) -> None:
    """Success against batch-1 latency (log scale) for one task; ``colours`` keeps methods alike across panels."""
    for row in report["rows"]:
        colour = colours.setdefault(row["method"], f"C{len(colours)}")
        x, y = row["latency_ms"]["median"], row["success_rate"]
        lo, hi = row_interval(row)
        ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], color=colour, alpha=0.5, capsize=2, zorder=2)
        ax.scatter(x, y, color=colour, s=40, zorder=3)
        ax.annotate(_label(row), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("chunk latency, batch 1 (ms, log scale); bars: 95 % interval")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(True, which="both", alpha=0.3)


def pareto_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    _pareto_panel(ax, report, {})
    ax.set_ylabel("success rate")
    ax.set_title(f"{report['task']}: success vs latency")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

def load_report(folder) -> dict:
    path = Path(folder) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"No bench results at {path}; run `step bench --task ... --out {folder}` first.")
    return json.loads(path.read_text())


def combined_table(reports: list[dict]) -> str:
    """Several tasks side by side (the paper's Table 2/3 layout): success and batch-1 time per method."""
    if not reports:
        raise ValueError("combined_table needs at least one bench report")
    keys = []  # (method, steps) in first-seen order
    cells = {}
    for column, report in enumerate(reports):  # by position: two reports may share a task
        for row in report["rows"]:
            key = (row["method"], row["steps"])
            if key not in cells:
                keys.append(key)
                cells[key] = {}
            cells[key][column] = row
    tasks = [r["task"] for r in reports]
    header = "| Method | Step | " + " | ".join(f"{t} success | {t} ms" for t in tasks) + " |"
    lines = [header, "|---|---|" + "---|---|" * len(tasks)]
    previous = None
    for method, steps in keys:
        name = METHOD_NAMES.get(method, method)
        shown, previous = (name if name != previous else ""), name
        values = []
        for column in range(len(reports)):
            row = cells[(method, steps)].get(column)
            values += ([success_cell(row), f"{row['latency_ms']['median']:.1f}"] if row else ["-", "-"])
        lines.append(f"| {shown} | {steps} | " + " | ".join(values) + " |")
    episodes = ", ".join(f"{r['task']} {r['rows'][0]['episodes']} episodes on seeds {seed_range(r['rows'][0])}"
                         for r in reports)
    lines += ["", f"Success [95 % Wilson interval] over {episodes}; time: median batch-1 chunk latency on the CPU."]
    return "\n".join(lines) + "\n"


def combined_plot(reports: list[dict], path: Path) -> None:
    """One success-vs-latency panel per task, same colours per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.4 * len(reports), 4.0), dpi=110, squeeze=False)
    colours = {}
    for ax, report in zip(axes[0], reports):
        _pareto_panel(ax, report, colours)
        ax.set_title(report["task"])
    axes[0][0].set_ylabel("success rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

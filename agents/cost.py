"""What each acceleration costs to train, beside what it buys (the paper's Table 5, extended; issue 15).

``step cost --task pusht [--checkpoint DIR] [--results results/pusht] [--out results/pusht]`` reads a task's release
folder and a ``step bench`` report and writes one row per trained part:

* the DDPM backbone (the reference every method shares; trained once),
* STEP's predictor (``<checkpoint>/predictor``, on the frozen backbone),
* each trained few-step peer found beside it (``cp/``, ``onedp/``, ``bridger/``: ``step train-baseline``).

Columns: trainable parameters, optimiser steps, training wall seconds and the torch threads it ran with (so
core-hours = wall x threads, an upper bound when other jobs shared the cores), and the bench's success rate of every
row of that method (e.g. STEP-1/2/4). Every number comes from the files the training commands wrote: ``loss.jsonl``
(its last record's ``step`` and ``seconds``), ``train_config.json`` / the predictor's config.json (``train_seconds``,
``train_threads``, recorded since this table exists). A number a folder does not hold is shown as "-" and never
guessed; ``--predictor-seconds`` fills the predictor's seconds for a release trained before they were recorded (say
where the number comes from).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from agents.config_files import option


@dataclass
class CostConfig:
    task: str = "pusht"
    checkpoint: str | None = option(None, help="the task's release folder (default: its committed checkpoint)")
    results: str | None = option(None, help="a `step bench` output folder for the success column "
                                            "(default results/<task>)")
    out: str | None = option(None, help="write cost.json, cost.md and cost.png here")
    predictor_seconds: float | None = option(None, min=0.0, help="the predictor's training wall seconds when its "
                                                                "config.json predates their recording")
    predictor_threads: int | None = option(None, min=1, help="with --predictor-seconds: its torch threads")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _last_record(path: Path) -> dict:
    from agents.curves import read_jsonl  # the one reader of training logs (a corrupt record named, not a traceback)

    records = read_jsonl(path) if path.exists() else []
    return records[-1] if records else {}


def _threads(value) -> int | None:
    """A recorded thread setting; 0 meant every core of the machine (this table is made on the same machine)."""
    if value is None:
        return None
    return int(value) or (os.cpu_count() or 1)


def _parameters(model_path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_path), "pt") as f:  # weights only: the normaliser's statistics are not trained
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("normalizer."))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _success(report: dict | None, method: str) -> dict[str, float]:
    """``{"step:2": 0.66, ...}``: every bench row of ``method``."""
    if report is None:
        return {}
    return {f"{r['method']}:{r['steps']}": r["success_rate"] for r in report["rows"] if r["method"] == method}


def _row(part: str, method: str, parameters, steps, seconds, threads, report) -> dict:
    hours = seconds * threads / 3600 if seconds is not None and threads else None
    return {"part": part, "method": method, "trainable_parameters": parameters, "steps": steps,
            "wall_seconds": seconds, "threads": threads, "core_hours": hours, "success": _success(report, method)}


def bench_report(cfg: CostConfig) -> dict | None:
    """The task's ``step bench`` report (None when there is none); another task's is refused."""
    results = Path(cfg.results) if cfg.results else Path("results") / cfg.task
    report = _read_json(results / "results.json")
    if report is not None and report.get("task") != cfg.task:
        raise ValueError(f"{results} holds bench results of task {report.get('task')!r}, not {cfg.task!r}.")
    return report


def cost_rows(cfg: CostConfig, report: dict | None) -> list[dict]:
    """One row per trained part of the task's release; ``report``: ``bench_report(cfg)``, for the success column."""
    from agents.checkpoint import default_checkpoint, read_policy_config
    from agents.distill import DISTILLED_NAMES

    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(cfg.task)
    policy = read_policy_config(checkpoint)
    if policy["task"] != cfg.task:
        raise ValueError(f"{checkpoint} is a checkpoint of task {policy['task']!r}, not {cfg.task!r}.")

    last = _last_record(checkpoint / "loss.jsonl")
    train_config = _read_json(checkpoint / "train_config.json") or {}
    rows = [_row("DDPM backbone (shared reference)", "ddpm", _parameters(checkpoint / "model.safetensors"),
                 last.get("step"), last.get("seconds"), _threads(train_config.get("threads")), report)]

    predictor = _read_json(checkpoint / "predictor" / "config.json")
    if predictor is not None:
        seconds = predictor.get("train_seconds", cfg.predictor_seconds)
        threads = predictor.get("train_threads") or (cfg.predictor_threads if cfg.predictor_seconds is not None
                                                     else _threads(predictor.get("train_config", {}).get("threads")))
        rows.append(_row("STEP predictor (frozen backbone)", "step", predictor.get("parameters"),
                         predictor.get("train_config", {}).get("steps"), seconds, threads, report))
    for folder, name in DISTILLED_NAMES.items():
        config = _read_json(checkpoint / folder / "config.json")
        if config is None:
            continue
        last = _last_record(checkpoint / folder / "loss.jsonl")
        train_config = _read_json(checkpoint / folder / "train_config.json") or {}
        rows.append(_row(name, folder, config.get("trainable_parameters"), config.get("train_step", last.get("step")),
                         last.get("seconds"), _threads(train_config.get("threads")), report))
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], task: str, seeds: str) -> str:
    lines = [f"Training cost vs success, {task} (success: `step bench`, {seeds})", "",
             "| part | trainable params | steps | wall s | threads | core-hours | success |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        success = ", ".join(f"{k} {v:.2f}" for k, v in r["success"].items()) or "-"
        lines.append(f"| {r['part']} | {_fmt(r['trainable_parameters'], ',')} | {_fmt(r['steps'], '')} | "
                     f"{_fmt(r['wall_seconds'], '.0f')} | {_fmt(r['threads'], '')} | {_fmt(r['core_hours'], '.2f')} | "
                     f"{success} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, task: str) -> None:
    """Best success of each trained part against its training core-hours (the backbone as the reference line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    untimed = []
    for r in rows:
        if r["core_hours"] is None or not r["success"]:
            if r["success"]:
                untimed.append(r["part"].split(" (")[0])
            continue
        spec, best = max(r["success"].items(), key=lambda kv: kv[1])
        if r["method"] == "ddpm":
            ax.axhline(best, color="grey", linestyle="--", label=f"DDPM-100 {best:.2f} ({r['core_hours']:.2f} h)")
            continue
        ax.scatter(r["core_hours"], best, s=40)
        ax.annotate(f"{r['part'].split(' (')[0]} ({spec})", (r["core_hours"], best), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    ax.set_xlabel("training core-hours on this machine (wall x threads)")
    ax.set_ylabel("best success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{task}: what the acceleration costs to train")
    ax.legend(loc="best", fontsize=8)
    if untimed:  # a part whose training time predates its recording has no x: say so instead of dropping it silently
        ax.text(0.01, 0.99, "not plotted (training time not recorded): " + ", ".join(untimed), transform=ax.transAxes,
                fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name (atomic_write)
    plt.close(fig)


def run_cost(cfg: CostConfig) -> dict:
    report = bench_report(cfg)
    rows = cost_rows(cfg, report)
    seeds = "no bench report"
    if report is not None and report["rows"]:
        first = report["rows"][0]
        seeds = f"{first['episodes']} episodes, seeds {first['seed_start']}-{first['seed_start'] + first['episodes'] - 1}"
    table = markdown(rows, cfg.task, seeds)
    if cfg.out:
        from step_envs.safe_io import atomic_write

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"task": cfg.task, "seeds": seeds, "rows": rows}, indent=2)
        atomic_write(out / "cost.json", lambda tmp: tmp.write_text(text))
        atomic_write(out / "cost.md", lambda tmp: tmp.write_text(table + "\n"))
        atomic_write(out / "cost.png", lambda tmp: plot(rows, tmp, cfg.task))
    return {"table": table, "rows": rows}

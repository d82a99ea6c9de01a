"""Training curves and their knee: ``step curves RUN [RUN ...] [--out DIR] [--knee-tolerance 0.1]``.

A run folder is anything ``step train-policy`` / ``train-baseline`` wrote, or its release copy (``step export``
carries the logs): ``loss.jsonl`` (step, loss, seconds) and ``eval.jsonl`` (the periodic rollout score on the
training-evaluation seeds, step_envs/seeds.py). Per run this reports each rollout score with its 95 % Wilson
interval, the loss and wall seconds at that step, and the knee: the first evaluated step whose score is within
``knee_tolerance`` of the run's best score (so training past it bought at most that much on those seeds). With
``--out`` it writes curves.json, curves.md and curves.png (score with its interval and loss against the step).

The score is measured on few episodes (10-20): read the knee with its interval, not as a point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agents.config_files import option


@dataclass
class CurvesConfig:
    runs: tuple[str, ...] = option(positional=True, help="training or release folders holding loss.jsonl / eval.jsonl")
    out: str | None = option(None, help="write curves.json, curves.md and curves.png here")
    knee_tolerance: float = option(0.1, min=0.0, help="the knee: first evaluated step within this of the best score")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a clear error naming the file and line of a corrupt record."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                break  # the record a running training is writing now (it ends with a newline once complete)
            raise ValueError(f"{path}:{number} is not a JSON record ({err}).") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{number} has no 'step' field; is it a training log?")
        records.append(record)
    return records


def knee_step(evals: list[dict], tolerance: float) -> int | None:
    """First evaluated step whose success rate is within ``tolerance`` of the best one (None: no evaluations)."""
    if not evals:
        return None
    best = max(e["success_rate"] for e in evals)
    return next(e["step"] for e in evals if e["success_rate"] >= best - tolerance - 1e-12)


def run_curve(folder: str | Path, tolerance: float) -> dict:
    from agents.bench import wilson_interval

    folder = Path(folder)
    if not (folder / "loss.jsonl").exists():
        raise FileNotFoundError(f"{folder} has no loss.jsonl: not a `step train-policy` / `train-baseline` folder "
                                f"or its release copy.")
    losses = read_jsonl(folder / "loss.jsonl")
    evals = read_jsonl(folder / "eval.jsonl") if (folder / "eval.jsonl").exists() else []
    train_config = {}
    if (folder / "train_config.json").exists():
        from agents.checkpoint import read_json

        train_config = read_json(folder / "train_config.json", "the run's train_config.json")
    points = []
    for e in evals:
        n = int(e["episodes"])
        low, high = wilson_interval(round(e["success_rate"] * n), n)
        # the loss record at or just before the evaluation (the loss log is written every log_every steps)
        before = [r for r in losses if r["step"] <= e["step"]]
        at = before[-1] if before else None
        points.append({"step": e["step"], "episodes": n, "success_rate": e["success_rate"], "ci95": [low, high],
                       "loss": at["loss"] if at else None, "seconds": at.get("seconds") if at else None})
    return {"run": str(folder), "eval_seed_start": train_config.get("eval_seed_start"),
            "init_from": train_config.get("init_from"), "last_step": losses[-1]["step"] if losses else 0,
            "wall_seconds": losses[-1].get("seconds") if losses else None, "evals": points,
            "knee_step": knee_step(evals, tolerance), "knee_tolerance": tolerance,
            "loss": [(r["step"], r["loss"]) for r in losses]}


def markdown(curves: list[dict]) -> str:
    lines = []
    for c in curves:
        most = max((p["episodes"] for p in c["evals"]), default=0)
        seeds = (f"seeds {c['eval_seed_start']}-{c['eval_seed_start'] + most - 1}"
                 if c["eval_seed_start"] is not None and most else "the training-evaluation seeds")
        wall = "unrecorded" if c["wall_seconds"] is None else f"{c['wall_seconds']:.0f}"
        lines += [f"{c['run']}: {c['last_step']} steps, {wall} s of training; rollout score on "
                  f"{seeds}; knee (first step within {c['knee_tolerance']:.2f} of the best): {c['knee_step']}"
                  + (f"; steps counted from the weights of {c['init_from']}" if c["init_from"] else ""), "",
                  "| step | episodes | success [95 % CI] | loss | wall s |", "|---|---|---|---|---|"]
        for p in c["evals"]:
            loss = "-" if p["loss"] is None else f"{p['loss']:.4f}"
            wall = "-" if p["seconds"] is None else f"{p['seconds']:.0f}"
            lines.append(f"| {p['step']} | {p['episodes']} | {p['success_rate']:.2f} [{p['ci95'][0]:.2f}, "
                         f"{p['ci95'][1]:.2f}] | {loss} | {wall} |")
        lines.append("")
    return "\n".join(lines)


def plot(curves: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        label = c["run"]
        if c["evals"]:
            steps = [p["step"] for p in c["evals"]]
            rates = [p["success_rate"] for p in c["evals"]]
            errors = [[r - p["ci95"][0] for r, p in zip(rates, c["evals"])],
                      [p["ci95"][1] - r for r, p in zip(rates, c["evals"])]]
            line = score_ax.errorbar(steps, rates, yerr=errors, marker="o", capsize=3, label=label)
            if c["knee_step"] is not None:
                score_ax.axvline(c["knee_step"], color=line[0].get_color(), linestyle=":", alpha=0.7)
        if c["loss"]:
            loss_ax.plot([s for s, _ in c["loss"]], [v for _, v in c["loss"]], label=label)
    score_ax.set_xlabel("training step")
    score_ax.set_ylabel("rollout success (95 % Wilson interval)")
    score_ax.set_ylim(-0.05, 1.05)
    score_ax.set_title("periodic rollout score (dotted: knee)")
    loss_ax.set_xlabel("training step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    loss_ax.set_title("loss")
    for ax in (score_ax, loss_ax):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")  # path may be a temporary name (atomic_write)
    plt.close(fig)


def run_curves(cfg: CurvesConfig) -> dict:
    if not cfg.runs:
        raise ValueError("name at least one run folder, e.g. `step curves runs/square_state`.")
    curves = [run_curve(folder, cfg.knee_tolerance) for folder in cfg.runs]
    table = markdown(curves)
    if cfg.out:
        from step_envs.safe_io import atomic_write

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"runs": curves}, indent=2)
        atomic_write(out / "curves.json", lambda tmp: tmp.write_text(text))
        atomic_write(out / "curves.md", lambda tmp: tmp.write_text(table))
        atomic_write(out / "curves.png", lambda tmp: plot(curves, tmp))
    return {"table": table, "runs": curves}

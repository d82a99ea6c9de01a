"""``step stall-sweep``: STEP-k without and with the velocity-aware perturbation over a sweep of sigma.

The paper's Table 8: success rate and mean episode time as the perturbation scale sigma (applied only
when consecutive chunks stall) grows. The first row turns the stall detector off (no perturbation).
Writes ``results.json``, ``results.md`` and ``sigma_sweep.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from agents.factory import make_agent
from step_envs.registry import get_task, make_env
from step_envs.rollout import rollout, summarize


@dataclass
class StallSweepConfig:
    task: str = "so101-pickplace-sim"
    checkpoint: str = "runs/so101_pp"
    method: str = "step:2"
    sigmas: tuple[float, ...] = (0.2, 0.5, 1.0, 1.4, 2.0)
    lam_stall: float = 1.0  # predictor retention while stalled
    eps: float = 0.01  # stall threshold (normalised units)
    episodes: int = 20
    seed_start: int = 0
    num_envs: int = 20
    out: str = "results/stall_sweep"
    max_steps: int | None = None  # cap episodes below the task horizon (smoke runs only)
    progress: bool = True


def run_stall_sweep(cfg: StallSweepConfig) -> dict:
    from agents.checkpoint import find_predictor, load_policy, load_predictor

    spec = get_task(cfg.task)
    backbone, policy_cfg = load_policy(cfg.checkpoint, task=spec.name)
    path = find_predictor(cfg.checkpoint)
    if path is None:
        raise FileNotFoundError(f"No predictor in {cfg.checkpoint}/predictor; run `step train-predictor` first.")
    predictor, _ = load_predictor(path, backbone)
    seeds = range(cfg.seed_start, cfg.seed_start + cfg.episodes)
    settings = [("off", {"enabled": False})] + [
        (sigma, {"enabled": True, "eps": cfg.eps, "sigma_stall": sigma, "lam_stall": cfg.lam_stall})
        for sigma in cfg.sigmas
    ]
    rows = []
    t0 = time.perf_counter()
    for sigma, stall in settings:
        env = make_env(spec.name, obs_type=policy_cfg["obs_type"], num_envs=min(cfg.num_envs, cfg.episodes))
        try:
            agent = make_agent(cfg.method, env, task=spec.name, checkpoint=cfg.checkpoint, backbone=backbone,
                               predictor_model=predictor, stall=stall)
            results = rollout(env, agent, seeds, progress=cfg.progress, max_steps=cfg.max_steps)
        finally:
            env.close()
        summary = summarize(results)
        row = {
            "sigma_stall": sigma, "lam_stall": cfg.lam_stall if sigma != "off" else None,
            "success_rate": summary["success_rate"], "mean_max_reward": summary["mean_max_reward"],
            # episode time in seconds of robot time: steps until success (or the horizon) / control rate
            "mean_episode_seconds": summary["mean_length"] / spec.fps,
            "episodes": len(results),
        }
        rows.append(row)
        if cfg.progress:
            print(f"sigma_stall={sigma}: success {row['success_rate']:.2f}, episode {row['mean_episode_seconds']:.1f} s")
    report = {"task": spec.name, "method": cfg.method, "checkpoint": cfg.checkpoint, "eps": cfg.eps,
              "wall_seconds": time.perf_counter() - t0,
              "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}, "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    sweep_plot(report, out / "sigma_sweep.png")
    return report


def markdown_table(report: dict) -> str:
    lines = [f"Task: {report['task']}, {report['method']}, stall threshold eps = {report['eps']}, "
             f"{report['rows'][0]['episodes']} episodes per row.", "",
             "| perturbation sigma (when stalled) | success | mean episode time (s) |", "|---|---|---|"]
    for row in report["rows"]:
        label = "none (detector off)" if row["sigma_stall"] == "off" else f"{row['sigma_stall']:g}"
        lines.append(f"| {label} | {row['success_rate']:.2f} | {row['mean_episode_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def sweep_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["sigma_stall"] != "off"]
    off = next(r for r in report["rows"] if r["sigma_stall"] == "off")
    sigmas = [r["sigma_stall"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(sigmas, [r["success_rate"] for r in rows], "o-", color="C0", label="success (perturbation on)")
    ax.axhline(off["success_rate"], color="C0", ls="--", label="success, no perturbation")
    ax.set_xlabel("perturbation scale sigma when stalled")
    ax.set_ylabel("success rate", color="C0")
    ax.set_ylim(-0.05, 1.05)
    twin = ax.twinx()
    twin.plot(sigmas, [r["mean_episode_seconds"] for r in rows], "s-", color="C1", label="episode time")
    twin.axhline(off["mean_episode_seconds"], color="C1", ls=":")
    twin.set_ylabel("mean episode time (s)", color="C1")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{report['task']}: {report['method']} stall perturbation sweep")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

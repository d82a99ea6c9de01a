"""``step stall-sweep``: STEP-k without and with the velocity-aware perturbation over a sweep of sigma.

The paper's Table 8: success rate and mean episode time as the perturbation scale sigma (applied only
when consecutive chunks stall) grows. The first row turns the stall detector off (no perturbation).
Writes ``results.json``, ``results.md`` and ``sigma_sweep.png``.

Besides success and time, every row reports what happened to the robot and what the detector saw:
  * ``frozen_rate``: episodes in which the robot's ``agent_pos`` did not change (every entry by less
    than ``freeze_tol`` per step, env units: degrees on the SO-101) for ``freeze_steps`` consecutive
    steps or more (default 30 = 1 s at 30 Hz). Episodes end on success, so such a run always happens
    before success: an execution stall.
  * ``frozen_at_end_rate``: episodes that failed with the robot frozen over their last
    ``freeze_steps`` steps (a deadlock that was never broken).
  * ``fired_rate``: fraction of replans (with a previous chunk) at which the detector flagged a stall;
    ``delta_*``: the chunk-to-chunk delta the detector compares with eps, at all replans and at the
    replans where the robot had not moved over the last chunk ("frozen" replans), so eps can be
    chosen from data.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agents.bench import success_cell
from agents.config_files import option, validate_fields
from agents.factory import make_agent
from step_envs.registry import get_task, make_env
from step_envs.rollout import rollout, summarize
from step_envs.seeds import EVAL_SEEDS


@dataclass(kw_only=True)
class StallSweepConfig:
    task: str = "so101-pickplace-sim"
    checkpoint: str = option(help="policy checkpoint with a predictor in <ckpt>/predictor")
    method: str = option("step:2", help="a STEP spec, e.g. step:2")
    sigmas: tuple[float, ...] = (0.2, 0.5, 1.0, 1.4, 2.0)
    lam_stall: float = 1.0  # predictor retention while stalled
    eps: float = 0.01  # stall threshold (normalised units)
    episodes: int = option(20, min=1)
    seed_start: int = EVAL_SEEDS.start
    num_envs: int = option(20, min=1)
    out: str = "results/stall_sweep"
    max_steps: int | None = option(None, min=1, help="cap episodes (smoke runs; not for reports)")
    env_kwargs: dict = option(default_factory=dict, help='env keyword arguments as JSON, e.g. '
                                                         '\'{"servo": "lerobot", "dead_band_deg": 1.0}\'')
    freeze_tol: float = option(0.05, help="agent_pos change per step below which the robot counts as frozen "
                                          "(env units)")
    freeze_steps: int = option(30, min=1, help="steps without motion that make a freeze")
    threads: int = option(1, min=1, help="torch threads")
    progress: bool = True

    def __post_init__(self):
        validate_fields(self)
        if not self.method.startswith("step"):
            raise ValueError("--method must be a STEP spec (the perturbation belongs to STEP's warm start)")


class StallRecorder:
    """Wraps an agent: records the observed ``agent_pos`` of every step and the detector at every replan."""

    def __init__(self, agent):
        self.agent = agent
        self.waves: list[dict] = []

    def reset(self) -> None:
        self.agent.reset()
        self.waves.append({"pos": [], "replans": []})  # rollout resets the agent once per wave

    def act(self, obs: dict) -> np.ndarray:
        wave = self.waves[-1]
        rows = self.agent.rows
        wave["pos"].append(np.asarray(obs["agent_pos"], dtype=np.float64).reshape(rows, -1).copy())
        before = self.agent.n_replans
        fired = self.agent.stall.stalled(rows).numpy().copy()  # what the next plan will use
        action = self.agent.act(obs)
        if self.agent.n_replans != before:
            delta = self.agent.stall.delta
            delta = None if delta is None else delta.numpy().copy()
            wave["replans"].append((len(wave["pos"]) - 1, fired, delta))
        return action


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(longest run of True, length of the run of True that ends at the last entry)."""
    longest = current = 0
    for value in mask:
        current = current + 1 if value else 0
        longest = max(longest, current)
    return longest, current


def stall_statistics(recorder: StallRecorder, results, width: int, cfg: StallSweepConfig, shift: int) -> dict:
    """Per-episode freezes and what the detector saw, for rollout ``results`` (seed order, waves of ``width``)."""
    frozen, frozen_end, frozen_frac = [], [], []
    fired, deltas, frozen_deltas = [], [], []
    for k, wave in enumerate(recorder.waves):
        pos = np.stack(wave["pos"])  # (T, B, D)
        for i, res in enumerate(results[k * width : (k + 1) * width]):
            p = pos[: res.length, i]
            still = np.max(np.abs(np.diff(p, axis=0)), axis=1) < cfg.freeze_tol if len(p) > 1 else np.zeros(0, bool)
            longest, tail = _longest_run(still)
            frozen.append(longest >= cfg.freeze_steps)
            frozen_end.append(not res.success and tail >= cfg.freeze_steps)
            frozen_frac.append(float(still.mean()) if len(still) else 0.0)
            for t, flags, delta in wave["replans"]:
                if t >= res.length or delta is None:
                    continue
                fired.append(bool(flags[i]))
                deltas.append(float(delta[i]))
                if t >= shift and np.max(np.abs(p[t] - p[t - shift])) < cfg.freeze_tol:
                    frozen_deltas.append(float(delta[i]))

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {
        "frozen_rate": float(np.mean(frozen)), "frozen_at_end_rate": float(np.mean(frozen_end)),
        "frozen_time_fraction": float(np.mean(frozen_frac)),
        "fired_rate": float(np.mean(fired)) if fired else 0.0, "replans": len(deltas),
        "delta_median": pct(deltas, 50), "delta_p10": pct(deltas, 10), "delta_min": pct(deltas, 0),
        "frozen_replans": len(frozen_deltas), "frozen_delta_median": pct(frozen_deltas, 50),
        "frozen_delta_p90": pct(frozen_deltas, 90),
    }


def run_stall_sweep(cfg: StallSweepConfig) -> dict:
    import torch

    from agents.checkpoint import find_predictor, load_policy, load_predictor

    torch.set_num_threads(cfg.threads)
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
    width = min(cfg.num_envs, cfg.episodes)
    for sigma, stall in settings:
        env = make_env(spec.name, obs_type=policy_cfg["obs_type"], num_envs=width, **cfg.env_kwargs)
        try:
            agent = make_agent(cfg.method, env, task=spec.name, checkpoint=cfg.checkpoint, backbone=backbone,
                               predictor_model=predictor, stall=stall)
            recorder = StallRecorder(agent)
            results = rollout(env, recorder, seeds, progress=cfg.progress, max_steps=cfg.max_steps)
        finally:
            env.close()
        summary = summarize(results)
        row = {
            "sigma_stall": sigma, "lam_stall": cfg.lam_stall if sigma != "off" else None,
            "success_rate": summary["success_rate"], "mean_max_reward": summary["mean_max_reward"],
            # episode time in seconds of robot time: steps until success (or the horizon) / control rate
            "mean_episode_seconds": summary["mean_length"] / spec.fps,
            "episodes": len(results),
            **stall_statistics(recorder, results, width, cfg, agent.backbone.cfg.n_action_steps),
            "per_episode": [{"seed": r.seed, "success": r.success, "length": r.length} for r in results],
        }
        rows.append(row)
        if cfg.progress:
            print(f"sigma_stall={sigma}: success {row['success_rate']:.2f}, episode {row['mean_episode_seconds']:.1f} s, "
                  f"frozen {row['frozen_rate']:.2f}, detector fired at {row['fired_rate']:.1%} of replans")
    report = {"task": spec.name, "method": cfg.method, "checkpoint": cfg.checkpoint, "eps": cfg.eps,
              "env_kwargs": cfg.env_kwargs, "wall_seconds": time.perf_counter() - t0,
              "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}, "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    sweep_plot(report, out / "sigma_sweep.png")
    return report


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    cfg = report["config"]
    env = json.dumps(report["env_kwargs"])
    lines = [f"Task: {report['task']}, {report['method']}, stall threshold eps = {report['eps']}, "
             f"{report['rows'][0]['episodes']} episodes per row on seeds {cfg['seed_start']}-"
             f"{cfg['seed_start'] + report['rows'][0]['episodes'] - 1}, env kwargs {env}; success with its 95 % "
             "Wilson interval.", "",
             f"frozen: agent_pos unchanged (< {cfg['freeze_tol']:g} per step) for >= "
             f"{cfg['freeze_steps']} steps; stuck at end: failed and frozen over the last "
             f"{cfg['freeze_steps']} steps; time frozen: steps with no motion / all steps; fired: replans flagged as "
             "stalled; delta: the detector's "
             "chunk delta (median over all replans / over replans where the robot had not moved for one chunk).",
             "",
             "| perturbation sigma (when stalled) | success | mean episode time (s) | frozen | stuck at end "
             "| time frozen | fired | delta median (p10) | delta median, frozen |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        label = "none (detector off)" if row["sigma_stall"] == "off" else f"{row['sigma_stall']:g}"
        stats = (f" {row['frozen_rate']:.2f} | {row['frozen_at_end_rate']:.2f} | "
                 f"{row['frozen_time_fraction']:.1%} | {row['fired_rate']:.1%} | "
                 f"{_fmt(row['delta_median'])} ({_fmt(row['delta_p10'])}) | {_fmt(row['frozen_delta_median'])} "
                 f"(n={row['frozen_replans']}) |")
        lines.append(f"| {label} | {success_cell(row)} | {row['mean_episode_seconds']:.1f} |{stats}")
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
    ax.plot(sigmas, [r["frozen_rate"] for r in rows], "^-", color="C2", label="episodes with a freeze")
    ax.axhline(off["frozen_rate"], color="C2", ls="--", lw=0.8)
    ax.set_xlabel("perturbation scale sigma when stalled")
    ax.set_ylabel("success rate / freeze rate", color="C0")
    ax.set_ylim(-0.05, 1.05)
    twin = ax.twinx()
    twin.plot(sigmas, [r["mean_episode_seconds"] for r in rows], "s-", color="C1", label="episode time")
    twin.axhline(off["mean_episode_seconds"], color="C1", ls=":")
    twin.set_ylabel("mean episode time (s)", color="C1")
    ax.legend(loc="lower right", fontsize=8)
    env = report["env_kwargs"]
    suffix = f" {json.dumps(env)}" if env else ""
    ax.set_title(f"{report['task']}: {report['method']}, eps {report['eps']:g}{suffix}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""``step bench``: every method on the same seeds, success and latency side by side (the paper's Table 2).

Rollouts are batched (one network call for all envs per replan); latency is the batch-1 chunk time
from ``agents.latency`` with the bare one-NFE time measured in the same run. Writes
``results.json``, ``results.md`` and ``pareto.png`` (success against latency, log-scaled latency).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agents.checkpoint import default_checkpoint
from agents.config_files import option, validate_fields
from agents.distill import DISTILLED_NAMES
from agents.factory import DEFAULT_METHODS, make_agent, parse_method
from agents.latency import LatencyConfig, measure_latency
from agents.peers import PEER_NAMES
from step_envs.registry import get_task, make_env
from step_envs.rollout import rollout, summarize
from step_envs.safe_io import atomic_write, folder_lock
from step_envs.seeds import EVAL_SEEDS

METHOD_NAMES = {"ddpm": "Vanilla (DDPM)", "ddim": "DDIM", "dpmsolver": "DPM-Solver++", "step": "STEP",
                "step-spatial": "STEP, spatial only", "step-temporal": "STEP, temporal only",
                **PEER_NAMES, **DISTILLED_NAMES}


@dataclass
class BenchConfig:
    task: str = "pusht"
    methods: tuple[str, ...] = option(DEFAULT_METHODS, help="comma-separated method specs")
    episodes: int = option(50, min=1)
    seed_start: int = option(EVAL_SEEDS.start, min=0, help="first evaluation seed (step_envs/seeds.py)")
    num_envs: int | None = option(None, min=1, help="envs batched per wave (one agent call per step for all of "
                                                     "them; default 50, or the task's camera_num_envs for an image "
                                                     "policy: step_envs/registry.py)")
    checkpoint: str | None = option(None, help="policy checkpoint (default: the task's committed checkpoint, "
                                               "see agents/checkpoint.py:default_checkpoint)")
    predictor: str | None = option(None, help="STEP's predictor checkpoint (default <checkpoint>/predictor), e.g. "
                                              "the small one for the latency target")
    out: str | None = option(None, help="output folder (default results/<checkpoint folder name> with --checkpoint, "
                                        "else results/<task>)")
    # Two --merge lanes on two cores each need one thread: two lanes at torch's default (every core) oversubscribe
    # the cores and ran a DDPM-100 image row ~6x slower here.
    threads: int = option(0, min=0, help="torch threads for the rollouts (0: torch's default, OMP_NUM_THREADS or "
                                         "every core); 1 for each of two --merge lanes")
    latency_calls: int = option(50, min=1)
    latency_threads: int = option(1, min=1, help="batch-1 latency is measured with a fixed torch thread count")
    max_steps: int | None = option(None, min=1, help="cap episodes (smoke runs; not for reports)")
    # Re-measure only the latency of an existing results.json in ``out`` (e.g. on a quiet machine after
    # rollouts that ran beside other jobs); success rows are kept as they are.
    latency_only: bool = option(False, help="keep the success rows of OUT/results.json and re-measure only the latency")
    # Add these methods' rows to an existing OUT/results.json (same task, checkpoint and seeds): rows of the same
    # method and step count are replaced, the others kept with their own latency.
    merge: bool = option(False, help="merge the rows into OUT/results.json (same task, checkpoint, seeds) "
                                     "instead of replacing it")
    progress: bool = True

    def __post_init__(self):
        validate_fields(self)
        if not self.methods:
            raise ValueError("--methods is empty")
        if self.out is None:
            # One results folder per checkpoint: `--checkpoint checkpoints/pusht_image` must not overwrite the
            # state policy's results/pusht (and a later --merge would refuse the mix of checkpoints).
            name = Path(self.checkpoint).name if self.checkpoint else ""
            self.out = f"results/{name or self.task}"


def run_bench(cfg: BenchConfig) -> dict:
    from agents.checkpoint import find_predictor, load_policy, load_predictor

    spec = get_task(cfg.task)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else default_checkpoint(spec.name)
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"No policy checkpoint at {checkpoint}; train one with `step train-policy`.")
    methods = [parse_method(m) for m in cfg.methods]  # validate every spec before any work
    backbone, policy_cfg = load_policy(checkpoint, task=spec.name)
    predictor_path = Path(cfg.predictor) if cfg.predictor else find_predictor(checkpoint)
    predictor = load_predictor(predictor_path, backbone)[0] if predictor_path else None
    obs_type = policy_cfg["obs_type"]
    cfg = replace(cfg, num_envs=wave_width(cfg.num_envs, spec, obs_type))  # results.json records the width used
    seeds = list(range(cfg.seed_start, cfg.seed_start + cfg.episodes))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    if cfg.latency_only:
        previous = load_report(out)
        if previous["task"] != spec.name or Path(previous["checkpoint"]).resolve() != checkpoint.resolve():
            raise ValueError(f"{out}/results.json is for {previous['task']} / {previous['checkpoint']}, "
                             f"not {spec.name} / {checkpoint}.")
        rows = previous["rows"]
        # The rows' own methods: after --merge the report's config lists only the last merged run's methods.
        cfg = replace(cfg, methods=row_specs(rows))
    else:
        rows = _rollout_rows(cfg, spec, checkpoint, backbone, predictor, obs_type, seeds, methods)

    # Latency after the rollouts, with its own fixed thread count, one method after another.
    latency = bench_latency(cfg, spec.name, obs_type, backbone, predictor)
    # Read, merge and write under the folder's lock: two `--merge` runs into one folder (two lanes on two cores)
    # each keep their rows, the later one waiting for the other's write.
    with folder_lock(out, "bench", wait=True):
        if cfg.latency_only:
            # Read again under the lock: rows a `--merge` wrote while the latency was measured are kept (their
            # own latency with them); the rows measured here get the new latency, and nothing else changes.
            measured = {(row["method"], row["steps"]): lat for row, lat in zip(rows, latency)}
            rows = load_report(out)["rows"]
            for row in rows:
                if (row["method"], row["steps"]) in measured:
                    add_latency([row], [measured[row["method"], row["steps"]]])
            cfg = replace(cfg, methods=row_specs(rows))
        else:
            add_latency(rows, latency)
            if cfg.merge:
                rows = merge_rows(out, spec.name, checkpoint, cfg, rows)
                cfg = replace(cfg, methods=row_specs(rows))  # the report's config names every row it holds
        # a latency-only rerun keeps the wall time of the run that made the success rows
        wall_seconds = previous["wall_seconds"] if cfg.latency_only else time.perf_counter() - t_start
        # wall_seconds covers one run only: `merged` says so when the table holds rows of earlier runs
        merged = previous.get("merged", False) if cfg.latency_only else cfg.merge
        report = bench_report(cfg, spec.name, checkpoint, obs_type, rows, wall_seconds, merged)
        write_report(report, out)
    return report


DEFAULT_NUM_ENVS = 50


def camera_wave_cap(spec, obs_type: str) -> int | None:
    """The most envs per wave for this policy: the task's ``camera_num_envs`` for an image policy, else None."""
    return spec.camera_num_envs if obs_type != "state" else None


def wave_width(requested: int | None, spec, obs_type: str) -> int:
    """Envs per bench wave: ``requested``; else for an image policy the task's ``camera_num_envs``; else 50."""
    if requested is not None:
        return requested
    cap = camera_wave_cap(spec, obs_type)
    return DEFAULT_NUM_ENVS if cap is None else cap


# The pieces below are shared with `step sweep` (agents/sweep.py), so that its merged rows are bench rows.
def bench_latency(cfg, task: str, obs_type: str, backbone, predictor) -> list[dict]:
    """Batch-1 latency rows of ``cfg.methods`` with ``cfg.latency_threads`` torch threads (restored afterwards)."""
    env = make_env(task, obs_type=obs_type)
    try:
        return measure_latency(backbone, predictor, LatencyConfig(methods=tuple(cfg.methods), calls=cfg.latency_calls,
                                                                  threads=cfg.latency_threads), env.action_space)
    finally:
        env.close()


def add_latency(rows: list[dict], latency_rows: list[dict]) -> None:
    """Put each method's latency columns into its rollout row (same order)."""
    for row, lat in zip(rows, latency_rows):
        row.update({k: lat[k] for k in ("latency_ms", "nfe_ms_median", "encode_ms_median", "ratio", "ratio_with_encode",
                                        "nfe_per_replan", "actions_per_replan", "ms_per_action")})


def bench_report(cfg, task: str, checkpoint, obs_type: str, rows: list[dict], wall_seconds: float,
                 merged: bool = False) -> dict:
    """The content of results.json (merged: the rows come from several runs, wall_seconds from the last)."""
    return {
        "task": task,
        "checkpoint": str(checkpoint),
        "obs_type": obs_type,
        "latency_threads": cfg.latency_threads,
        "wall_seconds": wall_seconds,
        "latency_remeasured": cfg.latency_only,
        "merged": merged,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "rows": rows,
    }


def write_report(report: dict, out: Path) -> None:
    """results.json and results.md (each replaced atomically), then pareto.png."""
    atomic_write(out / "results.json", lambda path: path.write_text(json.dumps(report, indent=2)))
    atomic_write(out / "results.md", lambda path: path.write_text(markdown_table(report)))
    pareto_plot(report, out / "pareto.png")


def row_specs(rows: list[dict]) -> tuple[str, ...]:
    """The method spec each row was made with (rows written before "spec" was recorded: rebuilt from the method and
    its steps, bare for SDP / RNR-DP whose schedule is the method's)."""
    from agents.peers import FIXED_SCHEDULE_METHODS

    def spec(row: dict) -> str:
        if "spec" in row:
            return row["spec"]
        return row["method"] if row["method"] in FIXED_SCHEDULE_METHODS else f"{row['method']}:{row['steps']}"
    return tuple(spec(r) for r in rows)


def merge_rows(out: Path, task: str, checkpoint: Path, cfg, rows: list[dict]) -> list[dict]:
    """The rows of ``out/results.json`` with ``rows`` put in (same method and steps replaced, new ones appended)."""
    if not (out / "results.json").exists():
        return rows
    previous = load_report(out)
    old = previous["rows"]
    if previous["task"] != task or Path(previous["checkpoint"]).resolve() != checkpoint.resolve():
        raise ValueError(f"--merge: {out}/results.json is for {previous['task']} / {previous['checkpoint']}, "
                         f"not {task} / {checkpoint}.")
    if previous["config"].get("predictor") != cfg.predictor:
        raise ValueError(f"--merge: {out}/results.json was made with predictor {previous['config'].get('predictor')}"
                         f" (None: <checkpoint>/predictor), this run with {cfg.predictor}; use another --out.")
    if old and (old[0]["seed_start"], old[0]["episodes"]) != (cfg.seed_start, cfg.episodes):
        raise ValueError(f"--merge: {out}/results.json has seeds {seed_range(old[0])}, this run "
                         f"{cfg.seed_start}-{cfg.seed_start + cfg.episodes - 1}; merge only rows on the same seeds.")
    new = {(r["method"], r["steps"]): r for r in rows}
    merged = [new.pop((r["method"], r["steps"]), r) for r in old]
    return merged + [r for r in rows if (r["method"], r["steps"]) in new]


class _NFECounter:
    """Counts the U-Net's calls (one per batched denoising step) while an agent runs."""

    def __init__(self, agent):
        unet = getattr(getattr(getattr(agent, "backbone", None), "model", None), "unet", None)
        self.calls = 0
        self.handle = unet.register_forward_hook(self._hook) if unet is not None else None

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        if self.handle is not None:
            self.handle.remove()


class _CountingAgent:
    """The agent as it is, counting its ``act`` calls (control steps of the batch)."""

    def __init__(self, agent):
        self.agent, self.acts = agent, 0

    def reset(self):
        return self.agent.reset()

    def act(self, obs):
        self.acts += 1
        return self.agent.act(obs)

    def __getattr__(self, name):
        return getattr(self.agent, name)


def _rollout_rows(cfg, spec, checkpoint, backbone, predictor, obs_type, seeds, methods) -> list[dict]:
    from agents.compute import torch_threads

    with torch_threads(cfg.threads):
        return [rollout_row(cfg, spec_str, spec.name, checkpoint, backbone, predictor, obs_type, seeds,
                            num_envs=min(cfg.num_envs, len(seeds)))[0] for spec_str in cfg.methods]


def rollout_row(cfg, spec_str: str, task: str, checkpoint, backbone, predictor, obs_type: str, seeds: list[int],
                num_envs: int, agent_kwargs: dict | None = None) -> tuple[dict, list]:
    """One method's bench row on ``seeds`` (waves of ``num_envs``), with its per-episode results.

    ``step sweep`` runs it per seed block and merges the blocks' episodes; ``agent_kwargs`` go to ``make_agent``.
    """
    import torch

    name, _ = parse_method(spec_str)
    env = make_env(task, obs_type=obs_type, num_envs=num_envs)
    try:
        agent = make_agent(spec_str, env, task=task, checkpoint=str(checkpoint), backbone=backbone,
                           predictor_model=predictor, **(agent_kwargs or {}))
        counter, counted = _NFECounter(agent), _CountingAgent(agent)
        t0 = time.perf_counter()
        try:
            results = rollout(env, counted, seeds, progress=cfg.progress, max_steps=cfg.max_steps)
        finally:
            counter.close()
        rollout_seconds = time.perf_counter() - t0
    finally:
        env.close()
    summary = summarize(results)
    steps = agent.cfg.steps
    if cfg.progress:
        print(f"{spec_str}: success {summary['success_rate']:.2f}, mean max reward {summary['mean_max_reward']:.3f} "
              f"({rollout_seconds:.0f} s)")
    row = {
        "method": name, "steps": steps, "spec": spec_str, "episodes": len(seeds), "seed_start": cfg.seed_start,
        "success_rate": summary["success_rate"], "mean_max_reward": summary["mean_max_reward"],
        "rollout_seconds": rollout_seconds,
        # each row keeps its own: merged rows (and a sweep's cells) may come from runs with different counts
        "rollout_threads": torch.get_num_threads(),
        # measured in the rollouts, first calls of episodes included; a batched call counts once
        "nfe_per_action": counter.calls / counted.acts if counted.acts else None,
        **(agent.stats() if hasattr(agent, "stats") else {}),
    }
    return row, results


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


def method_name(method: str) -> str:
    """A row's method in words: "step@30" -> "STEP, warm start t=30"."""
    from agents.factory import split_warm_start

    base, warm_start_t = split_warm_start(method)
    name = METHOD_NAMES.get(base, base)
    return name if warm_start_t is None else f"{name}, warm start t={warm_start_t}"


def _label(row: dict) -> str:
    return f"{method_name(row['method'])}-{row['steps']}"


def markdown_table(report: dict) -> str:
    """The paper's Table 2 layout: per method and step count, score and time."""
    reward_name = "mean max coverage" if report["task"] == "pusht" else "mean max reward"
    # image policies: the encoder runs once per replan, so the chunk time is compared with encode + Step x NFE
    images = report["obs_type"] != "state"
    encode_head = "Encode (ms) | Time / (Encode + Step x NFE) | " if images else ""
    header = (f"| Method | Step | Success [95 % CI] | {reward_name} | Time (ms, median) | p90 (ms) | NFE (ms) | "
              f"Time / (Step x NFE) | {encode_head}NFE / replan | actions / replan | ms / action |")
    lines = [
        f"Task: {report['task']} ({report['obs_type']}), {report['rows'][0]['episodes']} episodes on seeds "
        f"{seed_range(report['rows'][0])}; success with its 95 % Wilson interval; latency: batch 1, "
        f"{report['latency_threads']} torch thread(s)" + (", image encoding included in Time." if images else "."),
        "",
        header,
        "|---" * (header.count("|") - 1) + "|",
    ]
    previous = None
    for row in report["rows"]:
        name = method_name(row["method"])
        shown = name if name != previous else ""
        previous = name
        lines.append(
            f"| {shown} | {row['steps']} | {success_cell(row)} | {row['mean_max_reward']:.3f} | "
            f"{row['latency_ms']['median']:.1f} | {row['latency_ms']['p90']:.1f} | {row['nfe_ms_median']:.2f} | "
            f"{row['ratio']:.2f} | "
            + (f"{row['encode_ms_median']:.2f} | {row['ratio_with_encode']:.2f} | " if images else "")
            + f"{_nfe_cell(row)} | {actions_per_replan(row)} | {ms_per_action(row):.2f} |")
    lines.append("")
    if any(r["method"] in ("rtidp", "falcon", "sdp", "rnrdp") for r in report["rows"]):
        lines.append("Time: ms per replan (one chunk for chunked methods, one streaming step for SDP / RNR-DP); "
                     "ms / action = Time / actions executed per replan. NFE / replan: steady state (latency run); "
                     "NFE / action in results.json: measured in the rollouts. Step: RTI-DP k, Falcon k, SDP / RNR-DP "
                     "their ladder's levels K (agents/rtidp.py, falcon.py, streaming.py).")
        lines.append("")
    if rollout_time_line(report):
        lines.append(rollout_time_line(report))
    lines.append(f"{'Last merged run' if report.get('merged') else 'Bench'} wall time: "
                 f"{report['wall_seconds']:.0f} s."
                 + (" Latency re-measured afterwards on its own (`--latency-only`)." if report.get("latency_remeasured") else ""))
    return "\n".join(lines) + "\n"


def rollout_time_line(report: dict) -> str:
    """Each row's own rollout seconds: after ``--merge`` the rows come from several runs (often two lanes at once),
    so no single wall time describes the table."""
    timed = [f"{_label(r)} {r['rollout_seconds']:.0f}" for r in report["rows"] if "rollout_seconds" in r]
    return f"Rollout seconds per row: {', '.join(timed)}." if timed else ""


def actions_per_replan(row: dict) -> int:
    """Actions a replan executes; rows written before issue 14 are chunked methods with Ta = 8."""
    return row.get("actions_per_replan", 8)


def ms_per_action(row: dict) -> float:
    return row.get("ms_per_action", row["latency_ms"]["median"] / actions_per_replan(row))


def _nfe_cell(row: dict) -> str:
    nfe = row.get("nfe_per_replan", row["steps"])
    return f"{nfe:.2f}".rstrip("0").rstrip(".")


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
    # a panel spanning under a decade gets labelled minor ticks (2x10^1, 3x10^1, ...) that run into each other
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
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


def column_label(report: dict) -> str:
    """A task's name in the combined table, "image" added for a camera policy (state and image side by side)."""
    return report["task"] + (" image" if report.get("obs_type") == "pixels" else "")


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
    tasks = [column_label(r) for r in reports]
    # ms per executed action beside ms per replan once methods execute different numbers of actions per replan
    # (streaming SDP / RNR-DP against chunked methods): the per-chunk and per-step costs then compare.
    per_action = len({actions_per_replan(r) for report in reports for r in report["rows"]}) > 1
    header = "| Method | Step | " + " | ".join(f"{t} success | {t} ms" + (f" | {t} ms/act" if per_action else "")
                                              for t in tasks) + " |"
    lines = [header, "|---|---|" + ("---|---|---|" if per_action else "---|---|") * len(tasks)]
    previous = None
    for method, steps in keys:
        name = method_name(method)
        shown, previous = (name if name != previous else ""), name
        values = []
        for column in range(len(reports)):
            row = cells[(method, steps)].get(column)
            if row is None:
                values += ["-"] * (3 if per_action else 2)
                continue
            values += [success_cell(row), f"{row['latency_ms']['median']:.1f}"]
            values += [f"{ms_per_action(row):.2f}"] if per_action else []
        lines.append(f"| {shown} | {steps} | " + " | ".join(values) + " |")
    episodes = ", ".join(f"{column_label(r)} {r['rows'][0]['episodes']} episodes on seeds {seed_range(r['rows'][0])}"
                         for r in reports)
    lines += ["", f"Success [95 % Wilson interval] over {episodes}; time: median batch-1 chunk latency on the CPU."
              + (" For SDP / RNR-DP the time is one streaming replan (5 actions / 1 action); ms/act: the time per "
                 "executed action." if per_action else "")]
    return "\n".join(lines) + "\n"


def combined_plot(reports: list[dict], path: Path) -> None:
    """One success-vs-latency panel per task, same colours per method, at most four panels a row (a single row of
    ten tasks is too wide to read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(4, len(reports))
    nrows = -(-len(reports) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.0 * nrows), dpi=110, squeeze=False)
    colours = {}
    for ax, report in zip(axes.flat, reports):
        _pareto_panel(ax, report, colours)
        ax.set_title(column_label(report))
    for ax in axes.flat[len(reports):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("success rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

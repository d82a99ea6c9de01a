"""Benchmark the scripted Push-T expert over a range of env seeds.

    python -m step_envs.experts.measure_pusht_expert --seeds 0-49 --workers 2

Prints per-episode lines to stderr and a JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool

import numpy as np


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


def parse_overrides(pairs: list[str]) -> dict:
    """`--set name=value` pairs for PushTExpertConfig, values parsed as Python literals."""
    import ast

    overrides = {}
    for pair in pairs:
        name, value = pair.split("=", 1)
        overrides[name] = ast.literal_eval(value)
    return overrides


def run_episode(seed: int, horizon: int = 300, overrides: dict | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from gym_pusht.envs.pusht import PushTEnv

    from step_envs.experts.pusht_expert import PushTExpert, PushTExpertConfig

    sim = PushTEnv(obs_type="state")
    sim.reset(seed=seed)
    expert = PushTExpert(sim, PushTExpertConfig(**(overrides or {})), seed=seed)
    expert.reset()
    start = time.perf_counter()
    max_coverage, success, steps = 0.0, False, 0
    for steps in range(1, horizon + 1):
        action = expert.act()
        assert action.shape == (2,) and np.all(np.isfinite(action)) and np.all((action >= 0) & (action <= 512))
        _, _, terminated, _, info = sim.step(action)
        max_coverage = max(max_coverage, float(info["coverage"]))
        if terminated:
            success = True
            break
    seconds = time.perf_counter() - start
    result = {"seed": seed, "success": success, "max_coverage": max_coverage, "steps": steps, "seconds": seconds}
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0-49", help="e.g. 0-49 or 1,5,7")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--good-coverage", type=float, default=0.9, help="max coverage of a usable demonstration")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="config override")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    seeds = parse_seeds(args.seeds)
    wall_start = time.perf_counter()
    if args.workers > 1:
        with Pool(args.workers) as pool:
            results = pool.starmap(run_episode, [(s, 300, overrides) for s in seeds], chunksize=1)
    else:
        results = [run_episode(s, 300, overrides) for s in seeds]
    wall = time.perf_counter() - wall_start
    coverage = np.array([r["max_coverage"] for r in results])
    seconds = np.array([r["seconds"] for r in results])
    good = coverage >= args.good_coverage
    summary = {
        "episodes": len(results),
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_max_coverage": float(coverage.mean()),
        "fraction_max_coverage_ge_good": float(good.mean()),
        "mean_seconds_per_episode": float(seconds.mean()),
        "mean_steps": float(np.mean([r["steps"] for r in results])),
        # Per core: usable demonstrations produced per hour of one CPU core.
        "good_demos_per_cpu_hour": float(good.sum() / seconds.sum() * 3600),
        "wall_seconds": wall,
        "workers": args.workers,
        "config_overrides": overrides,
        "failed_seeds": [r["seed"] for r in results if not r["success"]],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

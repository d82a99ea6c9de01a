"""``step analyze {lipschitz,contraction,kselect,mare,predictor-only,all} [--tasks pusht,lift] [--out DIR]``

The paper's Appendix E on the committed (or any) checkpoints; see ``agents/analysis.py`` for what each
analysis measures. Every sub-command writes results.json, results.md and a plot into ``--out``
(default ``results/analysis/<sub-command>``; ``all``: ``results/analysis`` with one folder per analysis).
The flags come from ``AnalyzeConfig``: the common fields on every sub-command, each group's on its own.
"""

from __future__ import annotations

import dataclasses

from agents.analysis import ANALYSES, AnalyzeConfig
from agents.config_files import add_config_arguments, config_from_args

HELP = {
    "lipschitz": "spectral norms per layer (Table 10) and the empirical Jacobian norm L_emp (Table 11)",
    "contraction": "distance ratios between consecutive DDIM steps, random vs warm start: rho (Table 11)",
    "kselect": "MSE of STEP-K' to DDPM-100 per K', predictor MSE, the paper's K' condition (Figs. 10-11)",
    "mare": "predictor error: STEP vs spatial-only vs temporal-only (Table 15)",
    "predictor-only": "step:0 (predictor alone) vs DDPM-100 vs STEP-k in closed loop, and sample spreads",
    "all": "every analysis, tasks side by side",
}
# AnalyzeConfig fields that only some sub-commands use (the others keep their defaults)
GROUPS = {
    "lipschitz": ("power_iters", "lip_windows", "lip_timesteps", "lip_iters"),
    "contraction": ("contraction_steps",),
    "kselect": ("contraction_steps", "ks", "eps_tol", "alpha", "rho", "kselect_windows"),
    "predictor-only": ("methods", "episodes", "max_steps", "spread_windows", "spread_samples"),
}


def add_arguments(parser) -> None:
    grouped = {name for names in GROUPS.values() for name in names}
    common = {f.name for f in dataclasses.fields(AnalyzeConfig)} - grouped
    sub = parser.add_subparsers(dest="analysis", required=True)
    for name in ANALYSES + ("all",):
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        own = grouped if name == "all" else set(GROUPS.get(name, ()))
        add_config_arguments(p, AnalyzeConfig, only=common | own)


def run(args) -> int:
    from agents.analysis import MARKDOWN, md_all, run_all, run_analysis, write_analysis

    cfg = config_from_args(AnalyzeConfig, args)
    if args.analysis == "all":
        out = cfg.out or "results/analysis"
        result = run_all(cfg, out)
        print(md_all(result["reports"], result["index"]))
        print(f"wrote {out}/results.json, results.md, overview.png and one folder per analysis")
        return 0
    out = cfg.out or f"results/analysis/{args.analysis}"
    report = run_analysis(args.analysis, cfg)
    write_analysis(report, out)
    print(MARKDOWN[args.analysis](report))
    print(f"wrote {out}/results.json, results.md and a plot")
    return 0

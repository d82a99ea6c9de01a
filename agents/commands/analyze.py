"""``step analyze {lipschitz,contraction,kselect,mare,predictor-only,all} [--tasks pusht,lift] [--out DIR]``

The paper's Appendix E on the committed (or any) checkpoints; see ``agents/analysis.py`` for what each
analysis measures. Every sub-command writes results.json, results.md and a plot into ``--out``
(default ``results/analysis/<sub-command>``; ``all``: ``results/analysis`` with one folder per analysis).
"""

from __future__ import annotations

from agents.analysis import ANALYSES, AnalyzeConfig

HELP = {
    "lipschitz": "spectral norms per layer (Table 10) and the empirical Jacobian norm L_emp (Table 11)",
    "contraction": "distance ratios between consecutive DDIM steps, random vs warm start: rho (Table 11)",
    "kselect": "MSE of STEP-K' to DDPM-100 per K', predictor MSE, the paper's K' condition (Figs. 10-11)",
    "mare": "predictor error: STEP vs spatial-only vs temporal-only (Table 15)",
    "predictor-only": "step:0 (predictor alone) vs DDPM-100 vs STEP-k in closed loop, and sample spreads",
    "all": "every analysis, tasks side by side",
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from err


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="analysis", required=True)
    for name in ANALYSES + ("all",):
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _add_options(p, name)


def _add_options(p, name: str) -> None:
    d = AnalyzeConfig()
    every = name == "all"
    common = p.add_argument_group("tasks, windows, output")
    common.add_argument("--tasks", default="pusht", help="comma-separated tasks, e.g. pusht,lift,can,square")
    common.add_argument("--checkpoint", default=None, help="policy checkpoint (one task only; default checkpoints/<task>)")
    common.add_argument("--out", default=None,
                        help="output folder (default results/analysis" + ("" if every else f"/{name}") + ")")
    common.add_argument("--seed-start", type=int, default=d.seed_start,
                        help="first evaluation seed of every rollout (windows and closed loop)")
    common.add_argument("--window-episodes", type=int, default=d.window_episodes,
                        help="episodes rolled out to record validation windows")
    common.add_argument("--window-source", default=d.window_source,
                        help="agent whose rollouts give the windows: expert (default) or a method spec")
    common.add_argument("--windows", type=int, default=d.windows, help="windows for contraction and mare")
    common.add_argument("--num-envs", type=int, default=d.num_envs, help="envs per rollout wave")
    common.add_argument("--batch", type=int, default=d.batch, help="rows per network call")
    common.add_argument("--seed", type=int, default=d.seed)
    common.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: every core)")
    common.add_argument("--no-progress", action="store_true")
    if every or name == "lipschitz":
        g = p.add_argument_group("lipschitz")
        g.add_argument("--power-iters", type=int, default=d.power_iters)
        g.add_argument("--lip-windows", type=int, default=d.lip_windows)
        g.add_argument("--lip-timesteps", default=",".join(map(str, d.lip_timesteps)))
        g.add_argument("--lip-iters", type=int, default=d.lip_iters)
    if every or name in ("contraction", "kselect"):
        g = p.add_argument_group("contraction")
        g.add_argument("--contraction-steps", default=",".join(map(str, d.contraction_steps)),
                       help="DDIM schedules to measure; the first gives kselect's rho")
    if every or name == "kselect":
        g = p.add_argument_group("kselect")
        g.add_argument("--ks", default=",".join(map(str, d.ks)), help="candidate K' (DDIM steps after the warm start)")
        g.add_argument("--eps-tol", type=float, default=d.eps_tol)
        g.add_argument("--alpha", type=float, default=d.alpha)
        g.add_argument("--rho", type=float, default=None, help="use this rho instead of the measured one")
        g.add_argument("--kselect-windows", type=int, default=d.kselect_windows)
    if every or name == "predictor-only":
        g = p.add_argument_group("predictor-only")
        g.add_argument("--methods", default=",".join(d.methods), help="closed-loop methods (step:0 = predictor alone)")
        g.add_argument("--episodes", type=int, default=d.episodes, help="closed-loop episodes per method")
        g.add_argument("--max-steps", type=int, default=None, help="cap closed-loop episodes (smoke runs only)")
        g.add_argument("--spread-windows", type=int, default=d.spread_windows)
        g.add_argument("--spread-samples", type=int, default=d.spread_samples)


def config_from_args(args) -> AnalyzeConfig:
    d = AnalyzeConfig()
    get = lambda key, default: getattr(args, key, default)  # noqa: E731  (options a sub-command lacks keep defaults)
    return AnalyzeConfig(
        tasks=_names(args.tasks), checkpoint=args.checkpoint, seed_start=args.seed_start,
        window_episodes=args.window_episodes, window_source=args.window_source, windows=args.windows,
        num_envs=args.num_envs, seed=args.seed, threads=args.threads, batch=args.batch, progress=not args.no_progress,
        power_iters=get("power_iters", d.power_iters), lip_windows=get("lip_windows", d.lip_windows),
        lip_timesteps=_ints(get("lip_timesteps", ",".join(map(str, d.lip_timesteps)))),
        lip_iters=get("lip_iters", d.lip_iters),
        contraction_steps=_ints(get("contraction_steps", ",".join(map(str, d.contraction_steps)))),
        ks=_ints(get("ks", ",".join(map(str, d.ks)))), eps_tol=get("eps_tol", d.eps_tol), alpha=get("alpha", d.alpha),
        rho=get("rho", None), kselect_windows=get("kselect_windows", d.kselect_windows),
        methods=_names(get("methods", ",".join(d.methods))), episodes=get("episodes", d.episodes),
        max_steps=get("max_steps", None), spread_windows=get("spread_windows", d.spread_windows),
        spread_samples=get("spread_samples", d.spread_samples),
    )


def run(args) -> int:
    from agents.analysis import MARKDOWN, md_all, run_all, run_analysis, write_analysis

    cfg = config_from_args(args)
    if args.analysis == "all":
        out = args.out or "results/analysis"
        result = run_all(cfg, out)
        print(md_all(result["reports"], result["index"]))
        print(f"wrote {out}/results.json, results.md, overview.png and one folder per analysis")
        return 0
    out = args.out or f"results/analysis/{args.analysis}"
    report = run_analysis(args.analysis, cfg)
    write_analysis(report, out)
    print(MARKDOWN[args.analysis](report))
    print(f"wrote {out}/results.json, results.md and a plot")
    return 0

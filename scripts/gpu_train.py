"""Train a policy and its predictor on a lent CUDA GPU inside a fixed time budget, then export the release.

For a machine that has torch but neither LeRobot's dataset stack nor the simulators (the project's lent H200):
the dataset travels as its ``raw/`` episode cache (``agents.training.load_raw_frames``), rollouts are off
(``--eval-every 0``; the bench runs afterwards on the CPU), and the result comes back as a float16 release
(``step export``) small enough to fetch. The number of steps is chosen from a short timed probe so that the
cosine schedule ends inside ``--budget-s``:

    python scripts/gpu_train.py --dataset .devdata/pusht --task pusht --obs-type pixels --preset image_w32 \\
        --init-from checkpoints/pusht_image --budget-s 330 --export $OUT/pusht_image
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def probe_seconds_per_step(args, probe_steps: int = 60) -> float:
    """Seconds per optimizer step of this run's settings, from a short run's loss-log timestamps."""
    from agents.training import TrainPolicyConfig, train_policy

    out = Path(args.work) / "probe"
    shutil.rmtree(out, ignore_errors=True)
    train_policy(TrainPolicyConfig(dataset=args.dataset, out=str(out), task=args.task, preset=args.preset,
                                   obs_type=args.obs_type, steps=probe_steps, batch_size=args.batch_size,
                                   lr=args.lr, warmup_steps=10, log_every=20, save_every=10**6, eval_every=0,
                                   init_from=args.init_from, device=args.device, progress=False))
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]  # the first window holds the warm-up (cuDNN autotuning, allocations)
    return (last["seconds"] - first["seconds"]) / (last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a `step collect` folder (its raw/ cache is enough)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--obs-type", default="state", choices=("state", "pixels"))
    parser.add_argument("--preset", required=True)
    parser.add_argument("--init-from", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--budget-s", type=float, required=True, help="seconds for the policy's optimizer steps")
    parser.add_argument("--predictor-steps", type=int, default=4000, help="0: no predictor")
    parser.add_argument("--no-predictor-ablation", action="store_true",
                        help="skip the spatial-only ablation (it doubles the predictor's time; metrics still written)")
    parser.add_argument("--predictor-config", default=None,
                        help="a predictor config.json whose train_config sizes this predictor (default: paper's)")
    parser.add_argument("--work", default="runs/gpu")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: to try the script on a small budget)")
    parser.add_argument("--export", required=True, help="release folder (float16), e.g. $OUT/pusht_image")
    args = parser.parse_args()

    import torch

    from agents.checkpoint import export_checkpoint
    from agents.training import TrainPolicyConfig, train_policy

    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {where}  torch {torch.__version__}", flush=True)
    per_step = probe_seconds_per_step(args)
    steps = max(100, int(args.budget_s / per_step) // 100 * 100)  # saves add a little: 205 s for 165 s here
    print(f"probe: {per_step * 1000:.1f} ms/step at batch {args.batch_size} -> {steps} steps", flush=True)
    run = Path(args.work) / "policy"
    t0 = time.time()
    train_policy(TrainPolicyConfig(dataset=args.dataset, out=str(run), task=args.task, preset=args.preset,
                                   obs_type=args.obs_type, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=args.warmup_steps, log_every=100, save_every=max(steps // 4, 100),
                                   eval_every=0, init_from=args.init_from, device=args.device, progress=False))
    print(f"policy: {steps} steps in {time.time() - t0:.0f} s", flush=True)
    # Export the policy before the predictor trains: a command killed at the device's time limit still leaves it.
    export_checkpoint(run, args.export, half=True, overwrite=True)
    print(f"exported the policy to {args.export}", flush=True)
    if args.predictor_steps:  # 0: a state task's predictor sees the backbone only through its normaliser, which
        train_gpu_predictor(args, run)  # --init-from keeps, so the old predictor is reused
        export_checkpoint(run, args.export, half=True, overwrite=True)
        print(f"exported the policy and its predictor to {args.export}", flush=True)


def train_gpu_predictor(args, run: Path) -> None:
    """The predictor of the run's policy, sized like ``--predictor-config``'s (default: the paper's sizes)."""
    from agents.training import TrainPredictorConfig, train_predictor

    sizes = {}
    if args.predictor_config:
        sizes = json.loads(Path(args.predictor_config).read_text())["train_config"]
        sizes = {k: sizes[k] for k in ("batch_size", "lr", "weight_decay", "warmup_steps", "prev_dropout",
                                       "prev_source", "d_model", "n_heads", "ff_dim", "n_encoder_layers",
                                       "n_cross_blocks") if k in sizes}
    t0 = time.time()
    report = train_predictor(TrainPredictorConfig(policy=str(run), dataset=args.dataset, steps=args.predictor_steps,
                                                  ablation=not args.no_predictor_ablation, device=args.device,
                                                  progress=False, **sizes))
    print(f"predictor: {args.predictor_steps} steps in {time.time() - t0:.0f} s; metrics "
          f"{json.dumps(report['metrics'])}", flush=True)


if __name__ == "__main__":
    main()

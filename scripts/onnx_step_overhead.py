"""Where STEP-1's time over DDIM-1 goes in the ONNX runtime: the chunk graphs alone against the agents' replans.

Times, in alternating blocks (``agents.latency.alternating_samples``: each block warmed first; medians over all
blocks), on one observation history:
  nfe         one bare ``unet.onnx`` call (the ratio's unit)
  ddim_graph  the DDIM-1 chunk graph's ``session.run`` alone (encoder, 1 U-Net call, update, unnormalise)
  step_graph  the STEP-1 chunk graph's ``session.run`` alone (the same + predictor + warm start)
  ddim_chunk  ``agent.chunk`` of the ONNX DDIM-1 agent (graph + the Python around it: feeds, noise)
  step_chunk  ``agent.chunk`` of the ONNX STEP-1 agent (graph + feeds, noise and xi, stall detector)

    taskset -c 1 .venv/bin/python scripts/onnx_step_overhead.py [--checkpoint checkpoints/pusht]
        [--predictor checkpoints/pusht/predictor_small] [--rounds 30] [--calls 30]

Batch 1, one thread. Measure on an idle machine: a busy one gives false ratios.
"""

from __future__ import annotations

import argparse
import statistics
from types import SimpleNamespace

import numpy as np
import torch

from agents.checkpoint import find_predictor, load_policy, load_predictor
from agents.factory import make_agent
from agents.latency import _random_history, alternating_samples
from agents.onnx_runtime import graph_name
from step_envs.registry import make_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/pusht")
    parser.add_argument("--predictor", default=None, help="default: <checkpoint>/predictor")
    parser.add_argument("--task", default="pusht")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=30, help="timed calls per block")
    args = parser.parse_args()
    torch.set_num_threads(1)

    backbone, _ = load_policy(args.checkpoint)
    predictor = load_predictor(args.predictor or find_predictor(args.checkpoint), backbone)[0]
    env = make_env(args.task, obs_type="state")
    spaces = SimpleNamespace(observation_space=None, action_space=env.action_space)
    env.close()
    history = _random_history(backbone, torch.Generator().manual_seed(0))
    ddim, step = (make_agent(spec, spaces, seed=0, backbone=backbone, predictor_model=predictor, runtime="onnx")
                  for spec in ("ddim:1", "step:1"))
    for agent in (ddim, step):
        agent.reset()
        for _ in range(5):  # STEP in steady state: a previous chunk exists
            agent.chunk(history)

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, *backbone.action_shape)).astype(np.float32)
    ddim_feeds = {**ddim._obs_feeds(history), "noise": noise}
    step_feeds = {**step._obs_feeds(history), "noise": noise, "xi": noise.copy(),
                  "prev": rng.standard_normal((1, *backbone.action_shape)).astype(np.float32),
                  "lam": np.ones((1, 1, 1), np.float32), "sigma": np.zeros((1, 1, 1), np.float32)}
    ddim_graph = ddim.graphs.session(graph_name("ddim", 1))
    step_graph = step.graphs.session(graph_name("step", 1))
    calls = {"nfe": ddim.nfe_call(history),
             "ddim_graph": lambda: ddim_graph.run(None, ddim_feeds),
             "step_graph": lambda: step_graph.run(None, step_feeds),
             "ddim_chunk": lambda: ddim.chunk(history),
             "step_chunk": lambda: step.chunk(history)}
    samples = alternating_samples([(name, call, args.calls * args.rounds) for name, call in calls.items()], args.rounds)
    median = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    for name, ms in median.items():
        print(f"{name:11s} {ms:7.3f} ms   / NFE {ms / median['nfe']:.3f}")


if __name__ == "__main__":
    main()

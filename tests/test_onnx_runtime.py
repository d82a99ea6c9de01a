"""ONNX Runtime path: same chunks as torch for the same noise, one-line errors for foreign files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from agents import make_agent  # noqa: E402
from agents.latency import _random_history  # noqa: E402

# Chunks are in the normalised action space ([-1, 1]); float32 kernels of two libraries differ by ~1e-6 per
# call, and a few DDIM steps amplify it a little. DDPM's 100 steps amplify more.
ATOL = 1e-4
ATOL_DDPM = 2e-3


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from _random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("onnx_ckpt") / "policy")


PARITY_SPECS = ("ddim:2", "step:2", "step:1", "step:0", "step-spatial:2", "step-temporal:2", "dpmsolver:2")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """Every graph the parity tests run, exported once (an export costs seconds; an agent reads the files in ms).
    An agent's own export path is covered by the tests that pass no onnx_dir (DDPM, the closed-loop episode)."""
    from agents.onnx_runtime import export_onnx

    out = tmp_path_factory.mktemp("onnx_graphs")
    export_onnx(tiny_checkpoint, out, methods=PARITY_SPECS)
    return out


def _chunks(agent, history, calls=3):
    agent.reset()
    return [agent.chunk(history).clone() for _ in range(calls)]  # STEP: calls 2.. warm-start from the last chunk


@pytest.mark.parametrize("spec", PARITY_SPECS)
def test_onnx_chunks_match_torch(tiny_checkpoint, exported, env, spec):
    torch_agent = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=3)
    onnx_agent = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=3, runtime="onnx", onnx_dir=str(exported))
    assert type(onnx_agent).__name__ == "OnnxDiffusionAgent"
    history = _random_history(torch_agent.backbone, torch.Generator().manual_seed(1))
    a, b = _chunks(torch_agent, history), _chunks(onnx_agent, history)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=ATOL), f"{spec}: max diff {(x - y).abs().max():.2e}"
    # the chunks really depend on the noise: another seed gives another chunk (not for step:0, which has none)
    if spec != "step:0":
        other = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=4, runtime="onnx", onnx_dir=str(exported))
        assert not torch.allclose(_chunks(other, history, 1)[0], a[0], atol=1e-3)
    assert onnx_agent.graphs._tmp is None  # every graph came from the shared folder, none re-exported


@pytest.mark.parametrize("spec", ("step:2", "step:0", "ddim:2"))
def test_onnx_agent_acts_before_any_reset(tiny_checkpoint, exported, env, spec):
    """make_agent then act(): no reset() in between (a user's first call), the torch agent's actions."""
    obs, _ = env.reset(seed=5)
    torch_agent = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=3)
    onnx_agent = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=3, runtime="onnx", onnx_dir=str(exported))
    for _ in range(3):
        a, b = torch_agent.act(obs), onnx_agent.act(obs)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)  # raw units (Push-T: pixels)
    assert onnx_agent.n_replans == 1


def test_onnx_noise_pool_keeps_the_torch_stream_across_refills_and_resets(tiny_checkpoint, exported, env):
    """The ONNX agent fetches its noise DRAW_BLOCK draws at a time: past a refill and after a reset its chunks are
    still the torch agent's (a shape whose block draw would differ falls back to one draw per call)."""
    from agents.onnx_runtime import DRAW_BLOCK, draws_match_in_blocks

    assert draws_match_in_blocks((16, 2)) and not draws_match_in_blocks((10, 3))
    agents = [make_agent("step:1", env, checkpoint=str(tiny_checkpoint), seed=3, runtime=runtime,
                         onnx_dir=str(exported)) for runtime in ("torch", "onnx")]
    assert agents[1]._block == DRAW_BLOCK
    history = _random_history(agents[0].backbone, torch.Generator().manual_seed(4))
    calls = DRAW_BLOCK // 2 + 3  # two draws per warm start (noise, xi): the pool refills once
    runs = []
    for agent in agents:
        chunks = _chunks(agent, history, calls)
        agent.reset()
        runs.append(chunks + [agent.chunk(history).clone()])  # after a reset: the seed's first draw again
    for i, (x, y) in enumerate(zip(*runs)):
        assert torch.allclose(x, y, atol=ATOL), f"chunk {i}: max diff {(x - y).abs().max():.2e}"
    assert torch.allclose(runs[1][-1], runs[1][0], atol=ATOL)


@pytest.mark.parametrize("eps", [1e9, 0.0, None])  # always stalled, never stalled, a threshold among the deltas
def test_onnx_stall_detector_matches_torch(tiny_checkpoint, exported, env, eps):
    """The ONNX agent's numpy stall detector: same deltas, same (lam, sigma) switch, same chunks as the torch agent."""
    history = _random_history(make_agent("ddim:1", env, checkpoint=str(tiny_checkpoint)).backbone,
                              torch.Generator().manual_seed(6))
    if eps is None:  # the median delta of an undisturbed run: a threshold inside the range the deltas take
        probe = make_agent("step:2", env, checkpoint=str(tiny_checkpoint), seed=2, stall={"sigma_stall": 0.5, "eps": 0.0})
        probe.reset()
        deltas = []
        for _ in range(5):
            probe.chunk(history)
            if probe.stall.delta is not None:
                deltas.append(float(probe.stall.delta[0]))
        eps = float(np.median(deltas))
    stall = {"eps": eps, "sigma_stall": 0.5, "lam_stall": 0.8}
    agents = [make_agent("step:2", env, checkpoint=str(tiny_checkpoint), seed=2, stall=stall, runtime=runtime,
                         onnx_dir=str(exported)) for runtime in ("torch", "onnx")]
    fired = []
    for agent in agents:
        agent.reset()
        fired.append([])
        for _ in range(5):
            fired[-1].append(bool(agent.stall.stalled(1)[0]))
            agent.chunk(history)
    assert fired[0] == fired[1]
    torch.testing.assert_close(agents[1].stall.delta, agents[0].stall.delta, atol=1e-5, rtol=0)
    assert torch.allclose(agents[0].prev_chunk, agents[1].prev_chunk, atol=ATOL)


def test_onnx_ddpm_matches_torch(tiny_checkpoint, env):
    history = _random_history(make_agent("ddim:1", env, checkpoint=str(tiny_checkpoint)).backbone,
                              torch.Generator().manual_seed(2))
    x = _chunks(make_agent("ddpm", env, checkpoint=str(tiny_checkpoint), seed=5), history, 1)[0]
    y = _chunks(make_agent("ddpm", env, checkpoint=str(tiny_checkpoint), seed=5, runtime="onnx"), history, 1)[0]
    assert torch.allclose(x, y, atol=ATOL_DDPM), f"max diff {(x - y).abs().max():.2e}"


def test_onnx_agent_acts_like_torch_agent_in_env(tiny_checkpoint, env):
    """A short closed-loop episode: the ONNX agent's actions equal the torch agent's (clipped, raw units)."""
    for spec in ("ddim:2", "step:2"):
        actions = []
        for runtime in ("torch", "onnx"):
            agent = make_agent(spec, env, checkpoint=str(tiny_checkpoint), seed=0, runtime=runtime)
            obs, _ = env.reset(seed=11)
            agent.reset()
            run = []
            for _ in range(20):  # 3 replans
                action = agent.act(obs)
                run.append(action)
                obs, *_ = env.step(action)
            actions.append(np.stack(run))
        assert actions[0].shape == (20, 2)
        np.testing.assert_allclose(actions[0], actions[1], atol=0.05)  # pixels on a 512 px board


def test_onnx_batch_agent(tiny_checkpoint, exported):
    """A VectorEnv batch runs through the same graphs (dynamic batch axis); row i equals a single agent seeded i."""
    from step_envs.registry import make_env

    venv = make_env("pusht", obs_type="state", num_envs=2)
    single = make_env("pusht", obs_type="state")
    try:
        batch_agent = make_agent("step:2", venv, checkpoint=str(tiny_checkpoint), seed=0, runtime="onnx",
                                 onnx_dir=str(exported))
        obs, _ = venv.reset(seed=[20, 21])
        batch_agent.reset()
        batch_actions = batch_agent.act(obs)
        assert batch_actions.shape == (2, 2)
        row_agent = make_agent("step:2", single, checkpoint=str(tiny_checkpoint), seed=1, runtime="onnx",
                               onnx_dir=str(exported))
        obs1, _ = single.reset(seed=21)
        row_agent.reset()
        np.testing.assert_allclose(row_agent.act(obs1), batch_actions[1], atol=1e-3)
    finally:
        venv.close()
        single.close()


def test_export_onnx_writes_files_with_metadata(tiny_checkpoint, tmp_path):
    from agents.onnx_runtime import export_onnx, read_metadata

    report = export_onnx(tiny_checkpoint, tmp_path / "onnx", methods=("ddim:2", "step:2"))
    names = sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx"))
    assert names == sorted(["encoder.onnx", "unet.onnx", "predictor.onnx", "predictor_noprev.onnx",
                            "chunk_ddim_2.onnx", "chunk_step_2.onnx", "chunk_step_2_noprev.onnx"])
    meta = read_metadata(tmp_path / "onnx" / "chunk_step_2.onnx")
    assert meta["format"] == "step-onnx" and meta["task"] == "pusht" and meta["steps"] == 2
    assert meta["policy_digest"] == report["policy_digest"]
    assert meta["inputs"] == ["state", "env_state", "prev", "noise", "xi", "lam", "sigma"]


def _copy_graphs(exported, folder, names=("unet", "chunk_ddim_2")) -> None:
    """The files DDIM-2 reads, copied from the shared export (the tests below tamper with them)."""
    import shutil

    for name in names:
        shutil.copy(exported / f"{name}.onnx", folder / f"{name}.onnx")


def _set_metadata(path, key: str, value) -> None:
    """Rewrite one metadata field of an exported ONNX file (to fake a file from another policy or task)."""
    import onnx

    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == key:
            p.value = json.dumps(value)
    onnx.save(model, str(path))


def test_foreign_onnx_file_is_refused(tiny_checkpoint, exported, env, tmp_path):
    """An ONNX file of another policy (or graph) in onnx_dir: a one-line ValueError naming the file."""
    _copy_graphs(exported, tmp_path)
    _set_metadata(tmp_path / "chunk_ddim_2.onnx", "policy_digest", "0123456789abcdef")
    with pytest.raises(ValueError, match="another policy") as err:
        make_agent("ddim:2", env, checkpoint=str(tiny_checkpoint), runtime="onnx", onnx_dir=str(tmp_path))
    assert "chunk_ddim_2.onnx" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "unet.onnx").write_bytes(b"not an onnx file")
    (tmp_path / "chunk_ddim_2.onnx").unlink()
    with pytest.raises(ValueError, match="not a readable ONNX file"):
        make_agent("ddim:2", env, checkpoint=str(tiny_checkpoint), runtime="onnx", onnx_dir=str(tmp_path))


def test_onnx_file_for_another_task_is_refused(tiny_checkpoint, exported, env, tmp_path):
    _copy_graphs(exported, tmp_path)
    _set_metadata(tmp_path / "chunk_ddim_2.onnx", "task", "lift")
    with pytest.raises(ValueError, match="exported for task 'lift', not 'pusht'"):
        make_agent("ddim:2", env, checkpoint=str(tiny_checkpoint), runtime="onnx", onnx_dir=str(tmp_path))


def test_unknown_runtime_refused(tiny_checkpoint, env):
    with pytest.raises(ValueError, match="Unknown runtime"):
        make_agent("ddim:2", env, checkpoint=str(tiny_checkpoint), runtime="tensorrt")


def test_latency_rows_side_by_side(tiny_checkpoint):
    """`step latency --runtime torch,onnx`: both runtimes' rows in one run, ONNX counting its graph's NFEs."""
    from agents.checkpoint import load_policy, load_predictor
    from agents.latency import LatencyConfig, measure_latency, runtime_comparison
    from step_envs.registry import make_env

    backbone, _ = load_policy(tiny_checkpoint)
    predictor, _ = load_predictor(tiny_checkpoint / "predictor", backbone)
    env = make_env("pusht", obs_type="state")
    cfg = LatencyConfig(methods=("ddim:2", "step:1"), calls=2, warmup=1, nfe_calls=2, runtime=("torch", "onnx"))
    rows = measure_latency(backbone, predictor, cfg, env.action_space)
    env.close()
    assert [(r["method"], r["steps"], r["runtime"]) for r in rows] == [
        ("ddim", 2, "torch"), ("ddim", 2, "onnx"), ("step", 1, "torch"), ("step", 1, "onnx")]
    assert [r["nfe_per_replan"] for r in rows] == [2, 2, 1, 1]
    comparison = runtime_comparison(rows)
    assert [(c["method"], c["steps"]) for c in comparison] == [("ddim", 2), ("step", 1)]
    with pytest.raises(ValueError, match="--runtime"):
        LatencyConfig(runtime=("tensorrt",))


def test_step_export_onnx_cli_then_agent_uses_the_files(tiny_checkpoint, env, tmp_path):
    """`step export --onnx`: the release folder's onnx/ serves make_agent(runtime='onnx') without re-exporting."""
    from agents.cli import main

    out = tmp_path / "release"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--onnx",
                 "--onnx-methods", "step:2"]) == 0
    assert (out / "onnx" / "chunk_step_2.onnx").exists() and (out / "onnx" / "encoder.onnx").exists()
    agent = make_agent("step:2", env, checkpoint=str(out), runtime="onnx")
    assert agent.graphs._tmp is None  # every graph came from <out>/onnx
    obs, _ = env.reset(seed=0)
    agent.reset()
    torch_agent = make_agent("step:2", env, checkpoint=str(out))
    torch_agent.reset()
    np.testing.assert_allclose(agent.act(obs), torch_agent.act(obs), atol=0.05)

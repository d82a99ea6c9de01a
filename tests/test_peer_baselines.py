"""Issue 14: RTI-DP, Falcon, SDP and RNR-DP as agents (agents/rtidp.py, falcon.py, streaming.py, per_position.py)."""

import json
import shutil

import pytest
import torch
from _episodes import assert_batched_rows_equal_single_runs, run_steps

from agents.factory import make_agent
from step_envs.registry import make_env


@pytest.fixture(scope="module")
def stream_checkpoint(tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """The tiny DDPM checkpoint with a streaming backbone fine-tuned from it in <ckpt>/streaming."""
    from agents.training import TrainPolicyConfig, train_policy

    root = tmp_path_factory.mktemp("stream") / "policy"
    shutil.copytree(tiny_checkpoint, root)
    train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(root / "streaming"), preset="tiny", steps=4,
                                   batch_size=8, warmup_steps=1, log_every=2, save_every=4, eval_every=0,
                                   noise_mode="streaming", init_from=str(tiny_checkpoint), threads=1, progress=False))
    return root


@pytest.mark.parametrize("method", ["rtidp:2", "falcon:2", "sdp", "rnrdp"])
def test_batched_rows_equal_single_env_runs(stream_checkpoint, method):
    # 18 steps: several replans of every method (RNR-DP replans every step, SDP every 5)
    assert_batched_rows_equal_single_runs(method, stream_checkpoint, steps=18)


def test_replans_and_costs(stream_checkpoint):
    env = make_env("pusht", obs_type="state")
    try:
        expected = {"rtidp": (17, 1), "falcon:4": (3, 8), "sdp": (4, 5), "rnrdp": (17, 1)}  # replans in 17 steps
        for spec, (replans, per) in expected.items():
            agent = make_agent(spec, env, task="pusht", checkpoint=str(stream_checkpoint))
            run_steps(env, agent, 0, 17)
            assert agent.n_replans == replans and agent.actions_per_replan == per, spec
        assert make_agent("rnrdp", env, task="pusht", checkpoint=str(stream_checkpoint)).nfe_per_replan == 1.0
        assert make_agent("sdp", env, task="pusht", checkpoint=str(stream_checkpoint)).nfe_per_replan == pytest.approx(16 / 3)
    finally:
        env.close()


def test_rtidp_zero_steps_returns_the_shifted_chunk(tiny_checkpoint):
    from agents.checkpoint import load_policy
    from agents.predictor import shift_chunk

    backbone, _ = load_policy(tiny_checkpoint)
    env = make_env("pusht", obs_type="state")
    try:
        agent = make_agent("rtidp:0", env, backbone=backbone)
        obs, _ = env.reset(seed=0)
        agent.reset()
        assert agent.actions_per_replan == 1  # the authors' one action per call
        obs, *_ = env.step(agent.act(obs))  # first call: full DDPM
        first = agent.last_chunk.clone()
        agent.act(obs)  # the second act replans
        assert agent.n_replans == 2
        expected = shift_chunk(first, 1)
        torch.testing.assert_close(agent.last_chunk, expected)
        assert torch.equal(expected[:, -1:], first[:, -1:])  # padding holds the last action
        # execute = 8: the shift follows the executed actions
        eight = make_agent("rtidp:0", env, backbone=backbone, rtidp={"execute": 8})
        obs, _ = env.reset(seed=0)
        eight.reset()
        eight.act(obs)
        first = eight.last_chunk.clone()
        for _ in range(8):
            obs, *_ = env.step(eight.act(obs))  # the 9th act replans
        expected = shift_chunk(first, 8)
        torch.testing.assert_close(eight.last_chunk, expected)
        assert torch.equal(expected[:, 8:], first[:, -1:].expand(-1, 8, -1))
        # with k >= 1 the refinement moves the guess
        moving = make_agent("rtidp:3", env, backbone=backbone)
        obs, _ = env.reset(seed=0)
        moving.reset()
        obs, *_ = env.step(moving.act(obs))
        guess = shift_chunk(moving.last_chunk.clone(), 1)
        moving.act(obs)
        assert not torch.allclose(moving.last_chunk, guess, atol=1e-3)
    finally:
        env.close()


def test_streaming_buffer_levels_after_each_step(stream_checkpoint):
    from agents.checkpoint import load_policy

    backbone, config = load_policy(stream_checkpoint / "streaming")
    assert config["per_position_timesteps"] and config["noise_mode"] == "streaming"
    env = make_env("pusht", obs_type="state")
    try:
        rnr = make_agent("rnrdp", env, backbone=backbone)
        obs, _ = env.reset(seed=0)
        rnr.reset()
        ladder = [0, 0] + list(range(1, 15))  # To-1 (=1) at level 0, +1 per position, position 0 shares To-1's level
        for _ in range(4):
            obs, *_ = env.step(rnr.act(obs))
            assert rnr.buffer_levels.tolist() == ladder  # after every step: the ladder again, fresh noise at 14
        sdp = make_agent("sdp", env, backbone=backbone)
        obs, _ = env.reset(seed=0)
        sdp.reset()
        seen = []
        for step in range(15):
            obs, *_ = env.step(sdp.act(obs))
            if step % 5 == 0:  # just replanned: chunk 0 executed, the rest moved up one chunk, new chunk at 15
                seen.append(sdp.buffer_levels.tolist())
        # start (4, 9, 15) -> 5 calls -> (4, 10, 15) -> 5 calls -> (5, 10, 15) -> 6 calls -> (4, 9, 15): SDP's cycle
        assert seen == [[4] * 6 + [10] * 5 + [15] * 5, [5] * 6 + [10] * 5 + [15] * 5, [4] * 6 + [9] * 5 + [15] * 5]
    finally:
        env.close()


@pytest.mark.parametrize("method", ["sdp", "rnrdp"])
def test_streaming_refuses_a_chunk_trained_checkpoint(tiny_checkpoint, method):
    env = make_env("pusht", obs_type="state")
    try:
        with pytest.raises(ValueError, match="per-position noise"):
            make_agent(method, env, task="pusht", checkpoint=str(tiny_checkpoint))
        from agents.checkpoint import load_policy

        with pytest.raises(ValueError, match="per-position noise"):
            from agents.streaming import StreamingAgent

            StreamingAgent(load_policy(tiny_checkpoint)[0], env.action_space, method)
    finally:
        env.close()


def test_streaming_refuses_a_mode_that_does_not_serve_it(tiny_dataset, tiny_checkpoint, tmp_path):
    from agents.training import TrainPolicyConfig, train_policy

    out = tmp_path / "sdp_only"
    train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=2, batch_size=4,
                                   warmup_steps=1, eval_every=0, noise_mode="sdp", progress=False))
    env = make_env("pusht", obs_type="state")
    try:
        make_agent("sdp", env, task="pusht", checkpoint=str(out))  # the checkpoint itself is a streaming one
        with pytest.raises(ValueError, match="rnrdp needs"):
            make_agent("rnrdp", env, task="pusht", checkpoint=str(out))
    finally:
        env.close()


def test_per_position_encoder_keeps_the_chunk_model(tiny_checkpoint):
    """Equal per-position timesteps give exactly the chunk model's output (the mixer starts as the mean)."""
    from agents.checkpoint import load_policy
    from agents.latency import _random_history
    from agents.per_position import enable_per_position

    backbone, _ = load_policy(tiny_checkpoint)
    with torch.no_grad():
        cond = backbone.global_cond(_random_history(backbone, torch.Generator().manual_seed(0))).repeat(3, 1)
    x, t = torch.randn(3, 16, 2), torch.tensor([3, 40, 99])
    with torch.no_grad():
        before = backbone.denoise(x, t, cond)
        enable_per_position(backbone)
        after_chunk = backbone.denoise(x, t, cond)
        after_pos = backbone.denoise(x, t[:, None].expand(3, 16), cond)
    torch.testing.assert_close(after_chunk, before)
    torch.testing.assert_close(after_pos, before, rtol=1e-5, atol=1e-5)


def test_training_noise_levels():
    from agents.backbone import PRESETS
    from agents.per_position import chunk_indices, training_levels

    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    assert chunk_indices(16, 2, 5).tolist() == [0] * 6 + [1] * 5 + [2] * 5
    for mode in ("sdp", "rnrdp", "streaming"):
        levels = training_levels(mode, 512, cfg, 5, 0.5)
        assert levels.shape == (512, 16) and levels.min() >= 0 and levels.max() <= 99
    sdp = training_levels("sdp", 4096, cfg, 5, 0.5)
    chunkwise = sdp[:, 1] != sdp[:, 15]
    assert 0.7 < chunkwise.float().mean() < 0.9  # SDP's 0.8 chunk-wise / 0.2 constant
    assert bool((sdp[chunkwise][:, 15] > sdp[chunkwise][:, 6]).all() and (sdp[chunkwise][:, 6] > sdp[chunkwise][:, 1]).all())
    with pytest.raises(ValueError, match="noise_mode"):
        training_levels("bogus", 2, cfg, 5, 0.5)


def test_train_policy_records_noise_mode_and_refuses_bad_options(tiny_dataset, tiny_checkpoint, stream_checkpoint, tmp_path):
    from agents.training import TrainPolicyConfig, train_policy

    config = json.loads((stream_checkpoint / "streaming" / "config.json").read_text())
    assert config["noise_mode"] == "streaming" and config["init_from"].endswith("policy")
    assert config["stream_chunk"] == 5
    plain = json.loads((tiny_checkpoint / "config.json").read_text())
    assert plain["noise_mode"] == "chunk" and not plain["per_position_timesteps"]
    with pytest.raises(ValueError, match="noise-mode"):
        train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(tmp_path / "a"), preset="tiny", steps=1,
                                       noise_mode="bogus", eval_every=0, progress=False))
    with pytest.raises(ValueError, match="init-from"):
        train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(tmp_path / "b"), preset="pusht_state", steps=1,
                                       init_from=str(tiny_checkpoint), eval_every=0, progress=False))


def test_falcon_reuses_when_the_threshold_allows_and_never_when_zero(tiny_checkpoint):
    from agents.checkpoint import load_policy

    backbone, _ = load_policy(tiny_checkpoint)
    env = make_env("pusht", obs_type="state")
    try:
        always = make_agent("falcon:2", env, backbone=backbone, falcon={"threshold": 1e9})
        never = make_agent("falcon:2", env, backbone=backbone, falcon={"threshold": 0.0})
        run_steps(env, always, 0, 24)
        run_steps(env, never, 0, 24)
        assert always.stats()["reuse_rate"] == pytest.approx(2 / 3)  # every replan but the first of the episode
        assert never.stats()["reuse_rate"] == 0.0
        with pytest.raises(ValueError, match="k must be"):
            make_agent("falcon:10", env, backbone=backbone)
        with pytest.raises(ValueError, match="step count"):
            make_agent("falcon", env, backbone=backbone)
    finally:
        env.close()


def test_peer_specs_in_bench_latency_and_table(stream_checkpoint, tmp_path):
    from agents.cli import main

    out = tmp_path / "bench"
    methods = "ddim:2,rtidp,falcon:2,sdp,rnrdp"
    assert main(["bench", "--task", "pusht", "--checkpoint", str(stream_checkpoint), "--methods", methods,
                 "--episodes", "2", "--num-envs", "2", "--out", str(out), "--latency-calls", "2",
                 "--max-steps", "20"]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["ddim", "rtidp", "falcon", "sdp", "rnrdp"]
    assert rows["rnrdp"]["actions_per_replan"] == 1 and rows["sdp"]["actions_per_replan"] == 5
    assert rows["ddim"]["nfe_per_action"] == pytest.approx(2 / 8, rel=0.2)
    for row in rows.values():
        assert row["ms_per_action"] == pytest.approx(row["latency_ms"]["median"] / row["actions_per_replan"])
    assert rows["falcon"]["reuse_rate"] is not None
    table = (out / "results.md").read_text()
    assert "| RTI-DP |" in table and "| RNR-DP |" in table and "ms / action" in table
    # a second run merges its rows into the same results folder
    assert main(["bench", "--task", "pusht", "--checkpoint", str(stream_checkpoint), "--methods", "falcon:4",
                 "--episodes", "2", "--num-envs", "2", "--out", str(out), "--latency-calls", "2",
                 "--max-steps", "20", "--merge"]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["steps"]) for r in merged["rows"]][-1] == ("falcon", 4)
    assert len(merged["rows"]) == 6
    assert main(["table", str(out)]) == 0
    # rows made with another STEP predictor (--predictor) are not mixed into these
    from types import SimpleNamespace

    from agents.bench import merge_rows

    other = SimpleNamespace(predictor="elsewhere/predictor", seed_start=merged["rows"][0]["seed_start"], episodes=2)
    with pytest.raises(ValueError, match="made with predictor None"):
        merge_rows(out, "pusht", stream_checkpoint, other, [])


def test_mare_falcon_row(tiny_checkpoint):
    from types import SimpleNamespace

    from agents.analysis import falcon_reuse_error
    from agents.checkpoint import load_policy
    from agents.latency import _random_history

    backbone, _ = load_policy(tiny_checkpoint)
    with torch.no_grad():
        cond = backbone.global_cond(_random_history(backbone, torch.Generator().manual_seed(0))).repeat(6, 1)
    target = torch.rand(6, 16, 2) * 2 - 1
    pairs = SimpleNamespace(has_prev=torch.tensor([True] * 5 + [False]), target=target, prev=target.roll(8, 1), cond=cond)
    row = falcon_reuse_error(backbone, pairs, seed=0)
    assert row["k"] == 4 and row["timestep"] == 30 and row["mare"] > 0 and row["mse"] > 0
    assert falcon_reuse_error(backbone, pairs, seed=0) == row  # fixed noise: deterministic


def test_streaming_configs_load():
    from pathlib import Path

    from agents.config_files import build_config
    from agents.training import TrainPolicyConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*_state_streaming.yaml"))
    assert {p.name.split("_")[0] for p in configs} >= {"pusht", "lift", "can", "square"}
    for path in configs:
        cfg = build_config(TrainPolicyConfig, path, dataset="d", out="o")
        task = path.name.split("_")[0]
        assert cfg.noise_mode == "streaming" and cfg.init_from == f"checkpoints/{task}" and cfg.task == task
        assert cfg.eval_seed_start >= 900_000


@pytest.mark.parametrize("base", [6, 10])
def test_falcon_without_reuse_is_ddim_n(tiny_checkpoint, base):
    """Reuse off (threshold 0): every replan is exactly DDIM-N from noise, the same chunks as DiffusionAgent('ddim', N)."""
    from agents.checkpoint import load_policy

    backbone, _ = load_policy(tiny_checkpoint)
    env = make_env("pusht", obs_type="state")
    try:
        falcon = make_agent("falcon:2", env, backbone=backbone, seed=3, falcon={"threshold": 0.0, "base_steps": base})
        ddim = make_agent(f"ddim:{base}", env, backbone=backbone, seed=3)
        for agent in (falcon, ddim):
            obs, _ = env.reset(seed=0)
            agent.reset()
            agent.chunks = []
            for _ in range(24):  # 3 replans
                a = agent.act(obs)
                if agent.cache_index == 1:
                    agent.chunks.append(agent.last_chunk.clone())
                obs, *_ = env.step(a)
        assert len(falcon.chunks) == len(ddim.chunks) == 3
        for f, d in zip(falcon.chunks, ddim.chunks):
            torch.testing.assert_close(f, d, rtol=0, atol=1e-6)
        assert falcon.stats()["reuse_rate"] == 0.0
    finally:
        env.close()


def test_falcon_reused_latent_is_shifted_with_fresh_tail_noise(tiny_checkpoint):
    """A reused entry: shifted by Ta, the freed tail is q(x_s | x_0 = held last action) with fresh noise, and the
    denoising resumes at the stored DDIM level (k network calls)."""
    from agents.checkpoint import load_policy

    backbone, _ = load_policy(tiny_checkpoint)
    env = make_env("pusht", obs_type="state")
    try:
        agent = make_agent("falcon:3", env, backbone=backbone, falcon={"threshold": 1e9})
        obs, _ = env.reset(seed=0)
        agent.reset()
        for _ in range(8):
            obs, *_ = env.step(agent.act(obs))
        entry = agent.buffer[0]
        seen = []
        denoise = agent.backbone.denoise

        def spy(x, t, cond):
            seen.append((x.clone(), t.clone()))
            return denoise(x, t, cond)

        agent.backbone.denoise = spy
        try:
            agent.act(obs)  # replans, reusing the entry
        finally:
            del agent.backbone.denoise
        assert bool(agent.last_reuse.all())
        ta, start = 8, agent.start
        # x_T's one-step estimate, then k = 3 calls from the stored level
        assert [int(t[0]) for _, t in seen] == [agent.ddim.timesteps[0]] + agent.ddim.timesteps[start:]
        resumed = seen[1][0]
        torch.testing.assert_close(resumed[:, :8], entry["latent"][:, ta:])
        a_s, b_s = float(agent.coef[start, 0]), float(agent.coef[start, 1])
        tail_noise = (resumed[:, 8:] - a_s * entry["final"][:, -1:]) / b_s
        assert tail_noise.std() > 0.5  # fresh Gaussian noise, not a copy of the last latent position
        assert not torch.allclose(resumed[:, 8:], entry["latent"][:, -1:].expand(-1, 8, -1))
    finally:
        env.close()

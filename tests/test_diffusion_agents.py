import json
import shutil

import numpy as np
import pytest
import torch
from _episodes import run_steps

from agents.checkpoint import load_policy, save_policy
from agents.factory import make_agent
from step_envs.registry import make_env


@pytest.fixture()
def env():
    e = make_env("pusht", obs_type="state")
    yield e
    e.close()


@pytest.mark.parametrize("method", ["ddim:2", "dpmsolver:2", "step:2"])
def test_cache_replans_every_8_steps(env, tiny_checkpoint, method):
    agent = make_agent(method, env, task="pusht", checkpoint=str(tiny_checkpoint))
    actions = run_steps(env, agent, 0, 17)
    assert actions.shape == (17, 2) and actions.dtype == np.float32
    assert agent.n_replans == 3  # steps 0, 8, 16
    assert np.all(actions >= 0) and np.all(actions <= 512)


def test_ddpm_agent_equals_diffusers_scheduler_chain(env, tiny_checkpoint):
    """DDPM-100's first chunk and action are diffusers' DDPMScheduler run on the backbone with the agent's seed."""
    from diffusers import DDPMScheduler

    agent = make_agent("ddpm", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=3)
    obs, _ = env.reset(seed=0)
    agent.reset()
    action = agent.act(obs)
    backbone, schedule = agent.backbone, agent.backbone.cfg.schedule
    reference = DDPMScheduler(**schedule.common_kwargs(), clip_sample=schedule.clip_sample,
                              clip_sample_range=schedule.clip_sample_range, timestep_spacing=schedule.timestep_spacing)
    reference.set_timesteps(100)
    generator = torch.Generator().manual_seed(3)  # row 0's generator: the initial noise, then one draw per t > 0
    with torch.inference_mode():
        cond = backbone.global_cond(agent.history)
        x = torch.randn((1, *backbone.action_shape), generator=generator)
        for t in reference.timesteps:
            x = reference.step(backbone.denoise(x, t.view(1), cond), t, x, generator=generator).prev_sample
        expected = backbone.unnormalize_action(x[:, backbone.cfg.n_obs_steps - 1])[0].numpy()
    assert len(reference.timesteps) == 100
    assert torch.allclose(agent.last_chunk, x, atol=1e-4)
    np.testing.assert_allclose(action, np.clip(expected, 0, 512), atol=1e-3)


@pytest.mark.parametrize("method", ["ddim:2", "step:2"])
def test_batched_equals_single(tiny_checkpoint, method):
    vec = make_env("pusht", obs_type="state", num_envs=2)
    single = make_env("pusht", obs_type="state")
    try:
        agent = make_agent(method, vec, task="pusht", checkpoint=str(tiny_checkpoint), seed=5)
        obs, _ = vec.reset(seed=[0, 1])
        agent.reset()
        batched = []
        for _ in range(12):
            a = agent.act(obs)
            assert a.shape == (2, 2)
            batched.append(a)
            obs, *_ = vec.step(a)
        batched = np.stack(batched)
        for row in range(2):
            one = make_agent(method, single, task="pusht", checkpoint=str(tiny_checkpoint), seed=5 + row)
            np.testing.assert_allclose(run_steps(single, one, row, 12), batched[:, row], atol=1e-2)
    finally:
        vec.close()
        single.close()


def test_same_seed_same_actions(env, tiny_checkpoint):
    agent = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=3)
    np.testing.assert_array_equal(run_steps(env, agent, 4, 10), run_steps(env, agent, 4, 10))


def test_step_first_call_noise_and_stall_options(env, tiny_checkpoint):
    agent = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), first_call="noise",
                       stall={"eps": 10.0, "sigma_stall": 0.5, "lam_stall": 0.5})
    run_steps(env, agent, 0, 9)
    assert agent.stall.stalled(1).all()  # eps=10 flags every chunk pair as stalled
    with pytest.raises(ValueError):
        make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), first_call="bogus")


def test_consistency_ablation_warm_sources(env, tiny_checkpoint):
    """Table 16's variants: temporal reuses the shifted previous chunk, spatial never sees it."""
    temporal = make_agent("step-temporal:2", env, task="pusht", checkpoint=str(tiny_checkpoint))
    assert temporal.predictor is None and temporal.cfg.warm_source == "temporal"
    warm_starts, sample = [], temporal.warm.sample
    temporal.warm.sample = lambda denoise, cond, pred, *a, **k: (warm_starts.append(pred), sample(denoise, cond, pred,
                                                                                                  *a, **k))[1]
    obs, _ = env.reset(seed=0)
    temporal.reset()
    first = None
    for _ in range(9):  # first chunk from noise, second warm-started from the first
        obs, *_ = env.step(temporal.act(obs))
        first = temporal.prev_chunk.clone() if first is None else first
    assert len(warm_starts) == 1
    # the warm start is the first chunk moved 8 steps forward, its tail holding the last action
    assert torch.equal(warm_starts[0][:, :8], first[:, 8:])
    assert torch.equal(warm_starts[0][:, 8:], first[:, -1:].expand(-1, 8, -1))
    seen = []
    spatial = make_agent("step-spatial:2", env, task="pusht", checkpoint=str(tiny_checkpoint), trace_predictor=False)
    original = spatial.predictor.forward
    spatial.predictor.forward = lambda cond, prev=None, **kw: (seen.append(prev), original(cond, prev, **kw))[1]
    run_steps(env, spatial, 0, 9)
    assert len(seen) == 2 and all(p is None for p in seen)
    step = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), trace_predictor=False)
    step.predictor.forward = lambda cond, prev=None, **kw: (seen.append(prev), original(cond, prev, **kw))[1]
    seen.clear()
    run_steps(env, step, 0, 9)
    assert seen[0] is None and seen[1] is not None


def test_warm_start_timestep_variant(env, tiny_checkpoint):
    """'step@30:2' enters at t=30 and spreads its two steps (30, 15); its noise starts keep the plain DDIM-2."""
    from agents.bench import method_name
    from agents.factory import needs_predictor, split_warm_start, warm_timesteps
    from agents.samplers import DDIMSampler

    agent = make_agent("step@30:2", env, task="pusht", checkpoint=str(tiny_checkpoint), first_call="noise", seed=2)
    assert agent.sampler.timesteps == [30, 15] and agent.noise_sampler.timesteps == [50, 0]
    assert agent.warm.sampler is agent.sampler and agent.cfg.warm_start_t == 30 and needs_predictor("step@30:2")
    obs, _ = env.reset(seed=0)
    agent.reset()
    agent.act(obs)  # the first chunk: plain DDIM-2 from noise, the same as ddim:2's with the same seed
    ddim = make_agent("ddim:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=2)
    ddim.act(obs)
    assert torch.equal(agent.last_chunk, ddim.last_chunk)
    # a warm start at t=30: x_30 = sqrt(abar_30) pred + sqrt(1 - abar_30) noise, then 30 -> 15 -> x0
    abar = DDIMSampler(2).scheduler.alphas_cumprod
    assert abs(agent.warm.sampler.start_alpha - float(abar[30].sqrt())) < 1e-6
    assert warm_timesteps(50, 4) == [50, 37, 25, 12] and warm_timesteps(7, 1) == [7]
    assert split_warm_start("step-spatial@40") == ("step-spatial", 40) and split_warm_start("ddim") == ("ddim", None)
    assert method_name("step@30") == "STEP, warm start t=30"
    for bad, match in (("ddim@30:2", "only STEP"), ("step@x:2", "integer"), ("step@1:2", "distinct"),
                       ("step@30:0", "only .step:0.")):
        with pytest.raises(ValueError, match=match):
            make_agent(bad, env, task="pusht", checkpoint=str(tiny_checkpoint))
    with pytest.raises(ValueError, match="runtime='torch'"):  # the ONNX step graphs bake in the paper's timesteps
        make_agent("step@30:2", env, task="pusht", checkpoint=str(tiny_checkpoint), runtime="onnx")


def test_traced_predictor_matches_eager(env, tiny_checkpoint):
    traced = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=1)
    eager = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=1, trace_predictor=False)
    np.testing.assert_allclose(run_steps(env, traced, 2, 25), run_steps(env, eager, 2, 25), atol=1e-3)
    assert traced._traced_predictor is not None and eager._traced_predictor is None


def test_bad_observations_raise(env, tiny_checkpoint):
    agent = make_agent("ddim:2", env, task="pusht", checkpoint=str(tiny_checkpoint))
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        agent.act({**obs, "agent_pos": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        agent.act({**obs, "environment_state": np.full(16, np.nan, np.float32)})
    with pytest.raises(ValueError, match="lacks"):
        agent.act({"agent_pos": obs["agent_pos"]})


def test_actions_are_clipped(env, tiny_checkpoint):
    backbone, _ = load_policy(tiny_checkpoint)
    backbone.normalizer.action_min.fill_(-5000.0)
    backbone.normalizer.action_max.fill_(5000.0)
    agent = make_agent("ddim:2", env, task="pusht", backbone=backbone)
    actions = run_steps(env, agent, 0, 8)
    assert np.all(actions >= 0) and np.all(actions <= 512)


def test_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    backbone, config = load_policy(tiny_checkpoint)
    save_policy(tmp_path / "copy", backbone, config["task"], config["obs_type"])
    again, _ = load_policy(tmp_path / "copy")
    for (k, a), (_, b) in zip(backbone.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "copy").glob("*.pt")) and not list((tmp_path / "copy").glob("*.pkl"))


def test_checkpoint_refusals(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="task"):
        load_policy(tiny_checkpoint, task="lift")
    pixels = make_env("pusht", obs_type="pixels")
    try:
        with pytest.raises(ValueError, match="expects"):
            make_agent("ddim:2", pixels, task="pusht", checkpoint=str(tiny_checkpoint))
    finally:
        pixels.close()
    # a checkpoint edited to another action shape is refused by an env with 2-D actions
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other, ignore=shutil.ignore_patterns("predictor", "training_state*"))
    cfg = json.loads((other / "config.json").read_text())
    cfg["features"]["action_dim"] = 7
    (other / "config.json").write_text(json.dumps(cfg))
    env = make_env("pusht", obs_type="state")
    try:
        with pytest.raises(ValueError, match="expects"):
            make_agent("ddim:2", env, task="pusht", checkpoint=str(other))
        with pytest.raises(ValueError, match="needs --checkpoint"):
            make_agent("ddim:2", env, task="pusht")
        assert make_agent("random", env).act(None).shape == (2,)
    finally:
        env.close()


def test_predictor_refuses_other_policy(tiny_checkpoint):
    from agents.checkpoint import load_predictor

    backbone, _ = load_policy(tiny_checkpoint)
    backbone.normalizer.action_max.add_(1.0)
    with pytest.raises(ValueError, match="another policy"):
        load_predictor(tiny_checkpoint / "predictor", backbone)


def test_stall_detector_that_never_fires_changes_nothing(env, tiny_checkpoint):
    """Detector on with eps=0 (delta < 0 never holds) must give exactly the actions of the detector off.

    The perturbation xi used to be drawn from the row's generator only when the detector was on, which
    shifted the denoising noise of every later chunk: "on but never firing" and "off" were then two
    different random samples (the SO-101 stall sweep's 0.60 vs 0.50).
    """
    off = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=2, stall={"enabled": False})
    on = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=2,
                    stall={"enabled": True, "eps": 0.0, "sigma_stall": 1.0, "lam_stall": 0.5})
    reference = run_steps(env, off, 1, 25)  # 4 chunks: the first warm start and 3 with a previous chunk
    np.testing.assert_array_equal(run_steps(env, on, 1, 25), reference)
    assert not on.stall.stalled(1).any()
    fires = make_agent("step:2", env, task="pusht", checkpoint=str(tiny_checkpoint), seed=2,
                       stall={"enabled": True, "eps": 1e9, "sigma_stall": 1.0, "lam_stall": 0.5})
    assert not np.array_equal(run_steps(env, fires, 1, 25), reference)  # firing does change the actions

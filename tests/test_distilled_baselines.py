"""Issue 15: Consistency Policy (cp:k) and OneDP (onedp) distilled from the DDPM backbone, and BRIDGeR (bridger:k)
trained from its weights (agents/consistency.py, agents/onedp.py, agents/bridger.py, agents/distill.py)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from _episodes import assert_batched_rows_equal_single_runs, run_steps

from agents.factory import make_agent
from step_envs.registry import make_env


def _config(method, teacher, dataset, out, **overrides):
    from agents.distill import TrainBaselineConfig

    values = dict(method=method, teacher=str(teacher), dataset=str(dataset), out=None if out is None else str(out),
                  steps=3, batch_size=8, warmup_steps=1, log_every=1, save_every=3, threads=1, progress=False)
    values.update(overrides)
    return TrainBaselineConfig(**values)


@pytest.fixture(scope="module")
def distilled(tiny_dataset, tiny_checkpoint, tmp_path_factory):
    """A copy of the tiny teacher with a 3-step cp/, onedp/ and bridger/ student in it (the layout make_agent looks
    for)."""
    from agents.distill import train_baseline

    root = tmp_path_factory.mktemp("distilled") / "policy"
    shutil.copytree(tiny_checkpoint, root)
    for method in ("cp", "onedp", "bridger"):
        report = train_baseline(_config(method, root, tiny_dataset, None))
        assert report["out"] == str(root / method) and report["step"] == 3
    return root


def _tiny_backbone():
    from agents.backbone import PRESETS, Backbone, FeatureSpec

    torch.manual_seed(0)
    return Backbone(PRESETS["tiny"], FeatureSpec(state_dim=2, action_dim=2, env_state_dim=16)).eval()


def _cond(backbone, rows, seed=0):
    from agents.latency import _random_history

    with torch.no_grad():
        return backbone.global_cond(_random_history(backbone, torch.Generator().manual_seed(seed))).repeat(rows, 1)


def test_cp_boundary_condition_holds_by_construction():
    from agents.consistency import boundary_coefficients, consistency_fn
    from agents.distill import schedule_tables

    backbone = _tiny_backbone()
    a, b = schedule_tables(backbone.cfg)
    x = torch.randn(3, 16, 2)
    cond = _cond(backbone, 3)
    with torch.no_grad():
        at_zero = consistency_fn(backbone, x, torch.zeros(3, dtype=torch.long), cond, a, b)
        assert torch.equal(at_zero, x)  # f(x, 0) = x exactly, whatever the network
        t = torch.tensor([1, 45, 90])
        c_skip, c_out = boundary_coefficients(t)
        assert float(c_skip.max()) < 3e-3 and float(c_out.min()) > 0.998  # t >= 1: the network's clean estimate
        x0 = (x - b[t].view(-1, 1, 1) * backbone.denoise(x, t, cond)) / a[t].view(-1, 1, 1)
        torch.testing.assert_close(consistency_fn(backbone, x, t, cond, a, b), c_skip * x + c_out * x0)


def _count_calls(agent):
    count = [0]
    handle = agent.backbone.model.unet.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count, handle


@pytest.mark.parametrize("spec,calls", [("cp:1", 1), ("cp:3", 3), ("onedp", 1), ("bridger", 2), ("bridger:3", 3)])
def test_shapes_calls_and_determinism(distilled, spec, calls):
    env = make_env("pusht", obs_type="state")
    try:
        agent = make_agent(spec, env, task="pusht", checkpoint=str(distilled), seed=3)
        assert agent.nfe_per_replan == calls and agent.actions_per_replan == 8
        count, handle = _count_calls(agent)
        first = run_steps(env, agent, 0, 9)  # two replans
        handle.remove()
        assert first.shape == (9, 2) and first.dtype == np.float32 and count[0] == 2 * calls
        assert agent.last_chunk.shape == (1, 16, 2) and float(agent.last_chunk.abs().max()) <= 1.0
        again = make_agent(spec, env, task="pusht", checkpoint=str(distilled), seed=3)
        np.testing.assert_array_equal(run_steps(env, again, 0, 9), first)  # same seed: the same actions
        other = make_agent(spec, env, task="pusht", checkpoint=str(distilled), seed=4)
        assert not np.allclose(run_steps(env, other, 0, 9), first)
    finally:
        env.close()


@pytest.mark.parametrize("method", ["cp", "bridger"])
def test_export_of_a_student_is_a_float16_copy_that_acts_alike(distilled, method, tmp_path):
    from agents.checkpoint import export_checkpoint

    out = tmp_path / method
    report = export_checkpoint(distilled / method, out)
    assert report["task"] == "pusht" and not report["predictor"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors"] + [n for n in ("loss.jsonl", "eval.jsonl", "train_config.json")
                                                if (distilled / method / n).exists()])  # no optimiser state
    assert json.loads((out / "config.json").read_text())["weights_dtype"] == "float16"
    env = make_env("pusht", obs_type="state")
    try:
        spec = f"{method}:2"
        original = run_steps(env, make_agent(spec, env, task="pusht", checkpoint=str(distilled), seed=5), 0, 9)
        exported = run_steps(env, make_agent(spec, env, task="pusht", checkpoint=str(out), seed=5), 0, 9)
        np.testing.assert_allclose(exported, original, rtol=5e-3)  # float16 weights, the same draws (raw units)
    finally:
        env.close()


def test_cp_sampling_times():
    from agents.consistency import sampling_times

    assert sampling_times(90, 1) == [90]
    assert sampling_times(90, 2) == [90, 45]
    assert sampling_times(90, 3) == [90, 60, 30]


@pytest.mark.parametrize("method", ["cp:2", "onedp", "bridger:2"])
def test_batched_rows_equal_single_env_runs(distilled, method):
    assert_batched_rows_equal_single_runs(method, distilled, steps=10)


def test_refusals(distilled, tiny_checkpoint, tmp_path):
    from agents.checkpoint import load_policy
    from agents.distill import load_distilled

    env = make_env("pusht", obs_type="state")
    try:
        with pytest.raises(ValueError, match="no cp/ folder"):  # the teacher alone
            make_agent("cp:2", env, task="pusht", checkpoint=str(tiny_checkpoint))
        with pytest.raises(ValueError, match="no onedp/ folder"):
            make_agent("onedp", env, task="pusht", checkpoint=str(tiny_checkpoint))
        with pytest.raises(ValueError, match="'onedp' checkpoint"):  # another method's checkpoint
            make_agent("cp:1", env, task="pusht", checkpoint=str(distilled / "onedp"))
        with pytest.raises(ValueError, match="'cp' checkpoint"):
            make_agent("onedp", env, task="pusht", checkpoint=str(distilled / "cp"))
        with pytest.raises(ValueError, match="no bridger/ folder"):
            make_agent("bridger:2", env, task="pusht", checkpoint=str(tiny_checkpoint))
        with pytest.raises(ValueError, match="'cp' checkpoint"):
            make_agent("bridger:2", env, task="pusht", checkpoint=str(distilled / "cp"))
        with pytest.raises(ValueError, match="'bridger' checkpoint"):
            make_agent("cp:2", env, task="pusht", checkpoint=str(distilled / "bridger"))
        with pytest.raises(ValueError, match="positive integer"):
            make_agent("bridger:0", env, task="pusht", checkpoint=str(distilled))
        other = tmp_path / "other_task"
        shutil.copytree(distilled / "cp", other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, "task": "lift"}))
        with pytest.raises(ValueError, match="distilled for task 'lift'"):  # another task's
            make_agent("cp:1", env, task="pusht", checkpoint=str(other))
        with pytest.raises(ValueError, match="expected 'step-policy'"):  # a student is no diffusion backbone
            load_policy(distilled / "cp")
        with pytest.raises(ValueError, match="onedp takes|one generator call"):
            make_agent("onedp:2", env, task="pusht", checkpoint=str(distilled))
        # a teacher backbone passed in (as step bench does) is never used as the student
        teacher, _ = load_policy(tiny_checkpoint)
        with pytest.raises(ValueError, match="needs --checkpoint"):
            make_agent("cp:1", env, task="pusht", backbone=teacher)
        student, _ = load_distilled(distilled / "cp", "cp")
        assert make_agent("cp:1", env, task="pusht", backbone=teacher, checkpoint=str(distilled)).backbone is not teacher
        assert make_agent("cp:1", env, backbone=student).backbone is student
    finally:
        env.close()


def test_cp_loss_falls_on_a_short_run(tiny_dataset, tiny_checkpoint):
    """A fixed batch, the same noise and timesteps every step: the consistency loss must fall."""
    from agents.checkpoint import load_policy
    from agents.consistency import ConsistencyDistiller
    from agents.training import WindowBank, load_frames, make_optimizer

    teacher, _ = load_policy(tiny_checkpoint)
    cfg = _config("cp", tiny_checkpoint, tiny_dataset, None, steps=25, lr=1e-3, warmup_steps=0)
    distiller = ConsistencyDistiller(teacher, cfg)
    distiller.optimizer, distiller.lr_schedule, _ = make_optimizer(distiller.student, cfg)
    obs, action, _ = WindowBank.for_policy(load_frames(tiny_dataset), teacher.cfg).batch(torch.arange(16))
    losses = [distiller.train_step(obs, action, torch.Generator().manual_seed(1))["loss"] for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_onedp_score_net_learns_and_generator_follows_the_score_difference(tiny_dataset, tiny_checkpoint):
    from agents.checkpoint import load_policy
    from agents.distill import gather
    from agents.onedp import OneDPDistiller, generate
    from agents.training import WindowBank, load_frames, make_optimizer

    teacher, _ = load_policy(tiny_checkpoint)
    cfg = _config("onedp", tiny_checkpoint, tiny_dataset, None, steps=25, lr=1e-3, onedp_score_lr=3e-3,
                  warmup_steps=0)
    distiller = OneDPDistiller(teacher, cfg)
    distiller.optimizer, distiller.lr_schedule, _ = make_optimizer(distiller.student, cfg)
    obs, action, _ = WindowBank.for_policy(load_frames(tiny_dataset), teacher.cfg).batch(torch.arange(16))
    # at initialisation the score network is the teacher: no score difference, no generator gradient
    first = distiller.train_step(obs, action, torch.Generator().manual_seed(1))
    assert first["loss"] == 0.0
    records = [distiller.train_step(obs, action, torch.Generator().manual_seed(1)) for _ in range(24)]
    scores = [first["score_loss"]] + [r["score_loss"] for r in records]
    assert np.mean(scores[-3:]) < 0.8 * np.mean(scores[:3]), scores  # psi fits the generator's samples
    assert records[-1]["loss"] > 0.0  # ... so the generator now gets a gradient
    # the generator's gradient is exactly the normalised difference of the two networks' clean estimates
    a, b = distiller.a, distiller.b
    z = torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(2))
    cond = distiller.student.global_cond({k: v[:4] for k, v in obs.items()})
    sample = generate(distiller.student, z, cond, distiller.t_g, a, b).detach().requires_grad_(True)
    t, noise = torch.tensor([5, 30, 60, 90]), torch.randn(4, 16, 2, generator=torch.Generator().manual_seed(3))
    x_t = gather(a, t) * sample.detach() + gather(b, t) * noise
    with torch.no_grad():
        x0_real = (x_t - gather(b, t) * teacher.denoise(x_t, t, cond)) / gather(a, t)
        x0_fake = (x_t - gather(b, t) * distiller.aux.denoise(x_t, t, cond)) / gather(a, t)
    g = (x0_fake - x0_real) / (sample.detach() - x0_real).abs().mean(dim=(1, 2), keepdim=True)
    loss = 0.5 * torch.nn.functional.mse_loss(sample, (sample.detach() - g).detach())
    loss.backward()
    torch.testing.assert_close(sample.grad, g / g.numel())
    assert float(g.abs().max()) > 0


def _resume_by_cli(distilled, tiny_dataset, tmp_path, method):
    """Copy the fixture's 3-step ``method`` run, resume it to step 5 through the CLI (a rollout of the EMA student
    at step 5); return the folder and its config."""
    from agents.cli import main
    from agents.distill import read_distilled_config

    out = tmp_path / method
    shutil.copytree(distilled / method, out)
    rc = main(["train-baseline", "--method", method, "--teacher", str(distilled), "--dataset", str(tiny_dataset),
               "--out", str(out), "--steps", "5", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1",
               "--threads", "1", "--eval-every", "5", "--eval-episodes", "1", "--eval-max-steps", "10"])
    assert rc == 0
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the resumed run appends after the saved step
    evaluation = json.loads((out / "eval.jsonl").read_text())
    assert evaluation["step"] == 5 and evaluation["episodes"] == 1
    return out, read_distilled_config(out)


def test_cli_resume_records_and_refuses_another_method(distilled, tiny_dataset, tmp_path):
    from agents.distill import read_distilled_config, train_baseline

    out, config = _resume_by_cli(distilled, tiny_dataset, tmp_path, "cp")
    assert config["method"] == "cp" and config["task"] == "pusht" and config["train_step"] == 5
    assert config["distilled"] == {"method": "cp", "top_t": 90, "sigma_data": 0.5, "time_scale": 10.0}
    assert config["teacher_fingerprint"] and config["trainable_parameters"] > 0
    with pytest.raises(ValueError, match="another method"):
        train_baseline(_config("onedp", distilled, tiny_dataset, out, steps=6))
    onedp = read_distilled_config(distilled / "onedp")
    assert onedp["distilled"] == {"method": "onedp", "generator_t": 90}
    # the generator and its score network both train: twice the student's parameters
    assert onedp["trainable_parameters"] == 2 * config["trainable_parameters"]


def test_latency_times_each_on_a_teacher_copy(tiny_checkpoint):
    from agents.checkpoint import load_policy
    from agents.factory import EnvSpaces
    from agents.peers import timing_backbone

    teacher, _ = load_policy(tiny_checkpoint)
    env = make_env("pusht", obs_type="state")
    try:
        spaces = EnvSpaces(env.observation_space, env.action_space)
        for spec, calls in (("cp:2", 2.0), ("onedp", 1.0), ("bridger:2", 2.0)):
            timed = timing_backbone(spec, teacher)
            assert timed is not teacher and not hasattr(teacher, "distilled")
            assert make_agent(spec, spaces, backbone=timed).nfe_per_replan == calls
    finally:
        env.close()


# ---------------------------------------------------------------- BRIDGeR (agents/bridger.py)
@pytest.mark.parametrize("kind", ["linear", "power3"])
def test_bridger_interpolant_endpoints_and_velocity(kind):
    from agents.bridger import interpolate

    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(3, 16, 2, generator=g) for _ in range(3))
    at_source, _ = interpolate(kind, 0.03, torch.zeros(3, 1, 1), x0, x1, z)
    at_data, _ = interpolate(kind, 0.03, torch.ones(3, 1, 1), x0, x1, z)
    assert torch.equal(at_source, x0) and torch.equal(at_data, x1)  # gamma(0) = gamma(1) = 0: exactly
    # the conditional velocity is d/dt of x_t for a fixed (x0, x1, z): central differences, float64
    x0, x1, z = x0.double(), x1.double(), z.double()
    t, h = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64).view(-1, 1, 1), 1e-6
    _, velocity = interpolate(kind, 0.03, t, x0, x1, z)
    ahead, _ = interpolate(kind, 0.03, t + h, x0, x1, z)
    behind, _ = interpolate(kind, 0.03, t - h, x0, x1, z)
    torch.testing.assert_close(velocity, (ahead - behind) / (2 * h), atol=1e-7, rtol=1e-6)


def test_bridger_euler_with_the_exact_velocity_lands_on_the_data():
    from agents.bridger import euler, interpolate

    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(4, 16, 2, generator=g), torch.randn(4, 16, 2, generator=g)

    def exact(kind):  # the conditional velocity of the pair, gamma = 0
        return lambda t, x: interpolate(kind, 0.0, torch.tensor(t), x0, x1, torch.zeros_like(x0))[1]

    for k in (1, 2, 5):  # linear: a constant velocity, so any grid is exact
        torch.testing.assert_close(euler(exact("linear"), x0, k, 1e-3), x1)
    # power3's velocity 3 (1-t)^2 (x1 - x0) varies with t: first-order Euler overshoots by (3/(2k) + 1/(2k^2)) |x1 - x0|
    errors = [float((euler(exact("power3"), x0, k, 1e-6) - x1).abs().max()) for k in (4, 40, 400)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.004 * float((x1 - x0).abs().max()), errors


def test_bridger_source_statistics_of_known_windows():
    from agents.bridger import fit_source

    backbone = _tiny_backbone()  # action_min 0, action_max 1: normalised = 2 a - 1
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(16, 2, generator=g), torch.rand(16, 2, generator=g)
    mean, std = fit_source(backbone, torch.stack([a, b, a, b]))
    torch.testing.assert_close(mean, a + b - 1)  # ((2a - 1) + (2b - 1)) / 2
    torch.testing.assert_close(std, (a - b).abs())  # population std of two values


def test_bridger_checkpoint_records_the_fitted_source(distilled, tiny_dataset):
    from agents.bridger import fit_source
    from agents.checkpoint import load_policy
    from agents.distill import read_distilled_config
    from agents.training import WindowBank, load_frames

    teacher, _ = load_policy(distilled)
    mean, std = fit_source(teacher, WindowBank.for_policy(load_frames(tiny_dataset), teacher.cfg).action)
    config = read_distilled_config(distilled / "bridger")
    settings = config["distilled"]
    assert config["method"] == "bridger" and settings["interpolant"] == "linear"
    assert settings["gamma_scale"] == 0.03 and settings["t_eps"] == 1e-3
    torch.testing.assert_close(torch.tensor(settings["source_mean"]), mean)
    torch.testing.assert_close(torch.tensor(settings["source_std"]), std)
    assert float(std.min()) >= 0 and float(std.max()) > 0
    assert config["trainable_parameters"] == sum(p.numel() for p in teacher.parameters())  # one network


def test_bridger_plan_is_the_source_draw_and_k_euler_steps(tiny_checkpoint):
    from agents.bridger import BridgerAgent, default_settings
    from agents.checkpoint import load_policy
    from agents.distill import mark_distilled

    teacher, _ = load_policy(tiny_checkpoint)
    g = torch.Generator().manual_seed(3)
    mean, std = 0.1 * torch.randn(16, 2, generator=g), 0.5 + torch.rand(16, 2, generator=g)
    student = mark_distilled(teacher, default_settings(teacher.cfg, 2, source_mean=mean, source_std=std))
    env = make_env("pusht", obs_type="state")
    try:
        agent = BridgerAgent(student, env.action_space, seed=7, steps=3)
        cond = _cond(student, 1)
        with torch.no_grad():
            chunk = agent.plan(cond)
            x = mean + std * torch.randn(1, 16, 2, generator=torch.Generator().manual_seed(7))
            for t in (1e-3, 1 / 3, 2 / 3):  # t = 0 clipped to t_eps; the U-Net's timestep is (1 - t) * 99
                x = x + student.denoise(x, torch.tensor([(1 - t) * 99]), cond) / 3
        torch.testing.assert_close(chunk, x.clamp(-1, 1))
    finally:
        env.close()


def test_bridger_loss_falls_on_a_short_run(tiny_dataset, tiny_checkpoint):
    """A fixed batch, the same source draw, times and noise every step: the velocity loss must fall."""
    from agents.bridger import BridgerDistiller
    from agents.checkpoint import load_policy
    from agents.training import WindowBank, load_frames, make_optimizer

    teacher, _ = load_policy(tiny_checkpoint)
    cfg = _config("bridger", tiny_checkpoint, tiny_dataset, None, steps=25, lr=1e-3, warmup_steps=0)
    bank = WindowBank.for_policy(load_frames(tiny_dataset), teacher.cfg)
    distiller = BridgerDistiller(teacher, cfg, bank)
    assert distiller.aux is None
    distiller.optimizer, distiller.lr_schedule, _ = make_optimizer(distiller.student, cfg)
    obs, action, _ = bank.batch(torch.arange(16))
    losses = [distiller.train_step(obs, action, torch.Generator().manual_seed(1))["loss"] for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_bridger_config_checks():
    from agents.bridger import INTERPOLANTS, SOURCES
    from agents.distill import TrainBaselineConfig

    fields = {f.name: f for f in dataclasses.fields(TrainBaselineConfig)}
    assert fields["bridger_interpolant"].metadata["choices"] == INTERPOLANTS
    assert fields["bridger_source"].metadata["choices"] == SOURCES
    with pytest.raises(ValueError, match="--bridger-t-eps"):
        _config("bridger", "t", "d", None, bridger_t_eps=0.0)
    with pytest.raises(ValueError, match="--bridger-interpolant"):
        _config("bridger", "t", "d", None, bridger_interpolant="cubic")
    with pytest.raises(ValueError, match="--bridger-gamma"):
        _config("bridger", "t", "d", None, bridger_gamma=-0.1)
    assert _config("bridger", "t", "d", None).eval_method == "bridger:2"


def test_bridger_cli_resume_and_refusals(distilled, tiny_dataset, tmp_path):
    from agents.distill import read_distilled_config, train_baseline

    out, config = _resume_by_cli(distilled, tiny_dataset, tmp_path, "bridger")
    assert config["train_step"] == 5
    assert config["distilled"] == read_distilled_config(distilled / "bridger")["distilled"]  # the same source
    with pytest.raises(ValueError, match="another method"):
        train_baseline(_config("cp", distilled, tiny_dataset, out, steps=6))
    with pytest.raises(ValueError, match="another method"):  # another setting
        train_baseline(_config("bridger", distilled, tiny_dataset, out, steps=6, bridger_interpolant="power3"))
    cp_out = tmp_path / "cp"
    shutil.copytree(distilled / "cp", cp_out)
    with pytest.raises(ValueError, match="another method"):
        train_baseline(_config("bridger", distilled, tiny_dataset, cp_out, steps=6))


def test_bridger_cvae_kl_weight_and_the_fit_learns_the_chunks_of_each_observation(tiny_dataset, tiny_checkpoint):
    from agents.bridger import CVAE_SIZES, CVAESource, cvae_kl_weight, fit_cvae
    from agents.checkpoint import load_policy
    from agents.training import WindowBank, load_frames

    assert [cvae_kl_weight(i) for i in (0, 1, 500, 1000, 5000)] == [0.0, 1e-4, 0.05, 0.1, 0.1]
    teacher, _ = load_policy(tiny_checkpoint)
    bank = WindowBank.for_policy(load_frames(tiny_dataset), teacher.cfg)
    obs, action, _ = bank.batch(torch.arange(len(bank)))
    with torch.no_grad():
        cond, x = teacher.global_cond(obs), teacher.normalize_action(action)

    def reconstruction(source):  # the decoder at the posterior mean, against the demonstrated chunks
        with torch.no_grad():
            return float(((source.decode(cond, source.posterior(cond, x)[0]) - x) ** 2).mean())

    torch.manual_seed(0)
    untrained = CVAESource(cond.shape[-1], *teacher.action_shape, **CVAE_SIZES)
    source = fit_cvae(teacher, bank, steps=150, batch_size=32, seed=0, progress=False)
    assert not source.training and not any(p.requires_grad for p in source.parameters())
    assert reconstruction(source) < 0.3 * reconstruction(untrained), (reconstruction(source), reconstruction(untrained))
    again = fit_cvae(teacher, bank, steps=150, batch_size=32, seed=0, progress=False)  # deterministic from its seed
    for a, b in zip(source.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bridger_with_a_cvae_source_saves_exports_resumes_and_samples_from_it(tiny_dataset, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from agents.bridger import SOURCE_FILE, BridgerAgent, euler, unet_time
    from agents.checkpoint import export_checkpoint, load_policy
    from agents.distill import load_distilled, read_distilled_config, train_baseline

    out = tmp_path / "bridger_cvae"
    cfg = _config("bridger", tiny_checkpoint, tiny_dataset, out, bridger_source="cvae", bridger_source_steps=20)
    assert train_baseline(cfg)["step"] == 3
    settings = read_distilled_config(out)["distilled"]
    assert settings["source"] == "cvae" and settings["cvae"]["fit_steps"] == 20
    assert settings["cvae"]["latent_dim"] == 64 and settings["cvae"]["hidden"] == 512
    source_parameters = sum(v.numel() for v in load_file(str(out / SOURCE_FILE)).values())
    teacher_parameters = sum(p.numel() for p in load_policy(tiny_checkpoint)[0].parameters())
    assert read_distilled_config(out)["trainable_parameters"] == teacher_parameters + source_parameters
    # A resumed run trains against the source it saved, never a new fit: mark the saved one, resume, find the mark.
    saved = load_file(str(out / SOURCE_FILE))
    saved["decoder.0.bias"] = saved["decoder.0.bias"] + 1.0
    save_file(saved, str(out / SOURCE_FILE))
    train_baseline(dataclasses.replace(cfg, steps=5))
    assert read_distilled_config(out)["train_step"] == 5
    for key, value in load_file(str(out / SOURCE_FILE)).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    student, _ = load_distilled(out, "bridger", task="pusht")
    source = student.distilled_parts["source"]
    env = make_env("pusht", obs_type="state")
    try:
        agent = BridgerAgent(student, env.action_space, seed=4, steps=2)
        cond = _cond(student, 1)
        with torch.no_grad():
            chunk = agent.plan(cond)
            z = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))  # the row generator's first draw
            velocity = lambda t, x: student.denoise(x, torch.tensor([unet_time(t, 100)]), cond)  # noqa: E731
            expected = euler(velocity, source.decode(cond, z), 2, settings["t_eps"]).clamp(-1, 1)
        torch.testing.assert_close(chunk, expected)
        release = tmp_path / "release"
        export_checkpoint(out, release)
        assert load_file(str(release / SOURCE_FILE))["decoder.0.weight"].dtype == torch.float16
        original = run_steps(env, make_agent("bridger:2", env, task="pusht", checkpoint=str(out), seed=5), 0, 9)
        exported = run_steps(env, make_agent("bridger:2", env, task="pusht", checkpoint=str(release), seed=5), 0, 9)
        np.testing.assert_allclose(exported, original, rtol=5e-3, atol=1e-3)
        (release / SOURCE_FILE).unlink()
        with pytest.raises(FileNotFoundError, match=SOURCE_FILE):
            make_agent("bridger:2", env, task="pusht", checkpoint=str(release))
        student.distilled_parts = {}
        with pytest.raises(ValueError, match="CVAE source"):
            BridgerAgent(student, env.action_space)
    finally:
        env.close()


def test_cost_table_reads_what_the_trainings_recorded(distilled, tmp_path):
    from safetensors.torch import load_file

    from agents.cost import CostConfig, run_cost

    rows = [{"method": m, "steps": k, "episodes": 4, "seed_start": 0, "success_rate": rate}
            for m, k, rate in [("ddpm", 100, 0.75), ("step", 2, 0.5), ("cp", 1, 0.25), ("bridger", 2, 1.0)]]
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"task": "pusht", "rows": rows}))
    report = run_cost(CostConfig(task="pusht", checkpoint=str(distilled), results=str(results), out=str(tmp_path / "o")))
    by = {r["method"]: r for r in report["rows"]}
    assert list(by) == ["ddpm", "step", "cp", "onedp", "bridger"]
    weights = load_file(str(distilled / "model.safetensors"))
    assert by["ddpm"]["trainable_parameters"] == sum(v.numel() for k, v in weights.items() if not k.startswith("normalizer."))
    assert by["ddpm"]["steps"] == 6 and by["cp"]["steps"] == 3 and by["bridger"]["steps"] == 3
    predictor = json.loads((distilled / "predictor" / "config.json").read_text())
    assert by["step"]["trainable_parameters"] == predictor["parameters"] and by["step"]["steps"] == 5
    assert by["step"]["wall_seconds"] == predictor["train_seconds"] and by["step"]["threads"] == predictor["train_threads"]
    assert by["cp"]["threads"] == 1 and by["cp"]["core_hours"] == pytest.approx(by["cp"]["wall_seconds"] / 3600)
    assert by["step"]["success"] == {"step:2": 0.5} and by["onedp"]["success"] == {}
    assert "seeds 0-3" in report["table"] and (tmp_path / "o" / "cost.png").stat().st_size > 0
    with pytest.raises(ValueError, match="not 'lift'"):
        run_cost(CostConfig(task="lift", checkpoint=str(distilled), results=str(results)))

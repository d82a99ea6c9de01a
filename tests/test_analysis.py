"""`step analyze` (agents/analysis.py): the measuring tools on maps whose answer is known, the CLI on the tiny
checkpoint, and the predictor-only agent ``step:0``. No timing assertions."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from agents import analysis as A
from agents.cli import main
from agents.samplers import DDIMSampler


def _dense(forward, input_shape) -> torch.Tensor:
    """The matrix of a linear map, column j = the map applied to the j-th impulse."""
    n = int(np.prod(input_shape))
    cols = []
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = 1.0
        cols.append(forward(e.view(1, *input_shape)).flatten())
    return torch.stack(cols, dim=1)


def test_spectral_norm_of_a_known_linear_map():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6))
    v, _ = torch.linalg.qr(torch.randn(4, 4))
    s = torch.tensor([3.5, 2.0, 0.5, 0.1])
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight.copy_(u[:, :4] @ torch.diag(s) @ v.T)
    assert A.spectral_norm_linear(layer.weight) == pytest.approx(3.5, rel=1e-5)
    w = layer.weight.detach().double()
    sigma = A.power_iteration(lambda x: x @ w.T, lambda y: y @ w, (1, 4), iters=500, tol=1e-12)
    assert sigma == pytest.approx(3.5, rel=1e-5)


@pytest.mark.parametrize("layer, length", [
    (nn.Conv1d(3, 5, kernel_size=5, padding=2), 16),
    (nn.Conv1d(4, 4, kernel_size=3, stride=2, padding=1), 16),  # the U-Net's downsample
    (nn.ConvTranspose1d(4, 4, kernel_size=4, stride=2, padding=1), 8),  # the U-Net's upsample
    (nn.Conv1d(4, 6, kernel_size=3, padding=1, groups=2), 7),
    (nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1), (6, 5)),
])
def test_conv_operator_norm_matches_the_dense_matrix(layer, length):
    torch.manual_seed(1)
    layer.reset_parameters()  # weights from this seed, not from whatever ran before at collection time
    spatial = length if isinstance(length, tuple) else (length,)
    channels = layer.in_channels
    shape = (1, channels, *spatial)
    forward, adjoint = A.conv_operator(layer, shape)
    # the adjoint really is the adjoint: <A x, y> = <x, A^T y>
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(forward(x).shape, dtype=torch.float64)
    assert adjoint(y).shape == x.shape
    assert float((forward(x) * y).sum()) == pytest.approx(float((x * adjoint(y)).sum()), rel=1e-9)
    dense = _dense(forward, shape[1:])
    exact = float(torch.linalg.matrix_norm(dense, ord=2))
    assert A.power_iteration(forward, adjoint, shape, iters=2000, tol=1e-12) == pytest.approx(exact, rel=1e-4)
    # the layer's bias is not part of the operator
    with torch.no_grad():
        bare = layer(x.float()) - (layer.bias.view(1, -1, *[1] * len(spatial)) if layer.bias is not None else 0)
    np.testing.assert_allclose(bare.double().numpy(), forward(x).numpy(), atol=1e-5)


def test_reshaped_kernel_is_not_the_operator_norm():
    """Why the docstring insists on the operator: for a constant kernel they differ by sqrt(taps)."""
    layer = nn.Conv1d(1, 1, kernel_size=5, padding=2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    forward, adjoint = A.conv_operator(layer, (1, 1, 64))
    op = A.power_iteration(forward, adjoint, (1, 1, 64), iters=3000, tol=1e-14)
    assert A.spectral_norm_linear(layer.weight) == pytest.approx(math.sqrt(5))
    # a moving sum of 5 taps: gain just under 5 on smooth inputs (zero padding at the ends)
    assert 2 * math.sqrt(5) < op <= 5.0


def test_jacobian_norm_of_a_linear_map_per_row():
    torch.manual_seed(2)
    m = torch.randn(2, 5, 3)  # one matrix per row
    fn = lambda x: torch.einsum("bij,bj->bi", m, x)  # noqa: E731
    norms = A.jacobian_spectral_norm(fn, torch.randn(2, 3), iters=200)
    expected = torch.linalg.matrix_norm(m, ord=2)
    np.testing.assert_allclose(norms.numpy(), expected.numpy(), rtol=1e-4)


def test_layer_groups():
    assert A.layer_group("unet.down_modules.0.0.conv1.block.0") == "down"
    assert A.layer_group("unet.mid_modules.1.conv2.block.0") == "mid"
    assert A.layer_group("unet.up_modules.1.2") == "up"
    assert A.layer_group("unet.final_conv.1") == "other"
    assert A.layer_group("rgb_encoder.backbone.0") == "other"


def _contractive_denoiser(sampler: DDIMSampler, mu: torch.Tensor):
    """The exact noise predictor for data concentrated at mu: eps(x, t) = (x - a_t mu) / b_t.

    One DDIM step then maps x to a_prev mu + (b_prev / b_t)(x - a_t mu): the difference of two trajectories
    shrinks by exactly b_prev / b_t, and with mu = 0 so does the distance to the final sample (0)."""
    abar = sampler.scheduler.alphas_cumprod.double()

    def denoise(x, t, cond):
        a = abar[t].sqrt().float().view(-1, 1, 1)
        b = (1 - abar[t]).sqrt().float().view(-1, 1, 1)
        return (x - a * mu) / b

    return denoise


def test_contraction_ratio_of_an_exactly_contractive_toy():
    sampler = DDIMSampler(5)  # t = 80, 60, 40, 20, 0
    expected = [b_prev / b_t for (_, b_t, _, b_prev) in sampler.coef]
    cond = torch.zeros(3, 1)
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.3
    denoise = _contractive_denoiser(sampler, torch.zeros(4, 2))
    r = A.contraction_ratios(A.ddim_trajectory(sampler, denoise, cond, x))
    assert r["to_final"].shape == (3, 4)
    np.testing.assert_allclose(r["to_final"].numpy(), np.tile(expected[:4], (3, 1)), rtol=1e-4)
    # pairwise against a reference trajectory, with data away from 0 (clipping inactive: |mu| < 1)
    mu = torch.full((4, 2), 0.4)
    denoise = _contractive_denoiser(sampler, mu)
    traj = A.ddim_trajectory(sampler, denoise, cond, x)
    ref = A.ddim_trajectory(sampler, denoise, cond, x + 0.2)
    r = A.contraction_ratios(traj, ref)
    # the last step (to t = -1, b_prev = 0) lands both exactly on mu: ratio 0
    np.testing.assert_allclose(r["pair"].numpy(), np.tile(expected, (3, 1)), rtol=1e-4, atol=1e-6)
    summary = A._ratio_summary(r["pair"][:, :4], sampler.timesteps[:4])
    assert summary["rho"] == pytest.approx(float(np.mean(expected[:4])), rel=1e-4)
    assert summary["frac_below_1"] == 1.0 and [p["t"] for p in summary["per_step"]] == [80, 60, 40, 20]


def test_kselect_picks_the_known_step():
    # rho = 0.5, eps = 0.1, alpha = 1: bound(K') = 0.01 * 4^K' = 0.04, 0.16, 0.64, 2.56
    assert A.convergence_bound(2, 0.5) == pytest.approx(0.16)
    assert A.select_k(0.1, 0.5, [1, 2, 3, 4]) == 2
    assert A.select_k(0.01, 0.5, [1, 2, 3]) == 1  # already within tolerance
    assert A.select_k(1.0, 0.5, [1, 2, 3]) is None  # needs K' = 4, not a candidate
    assert A.select_k(1.0, 0.5, [4, 1, 2, 3]) == 4
    assert A.select_k(0.1, 1.2, [1, 2, 3]) is None  # expanding: never
    assert A.continuous_k(0.1, 0.5) == pytest.approx(math.log(0.1) / (2 * math.log(0.5)))
    assert A.continuous_k(0.1, 1.2) is None
    # the paper's own numbers (Lift: predictor MSE 0.041, rho 0.67 -> K' = 2)
    assert A.select_k(0.041, 0.67, [1, 2, 3, 4]) == 2


def test_chunk_consistency():
    a = torch.arange(16.0).view(16, 1)
    shifted = torch.cat([a[8:], a[-1:].expand(8, 1)])
    assert A.chunk_consistency([a, shifted], 8) == [0.0]
    assert A.chunk_consistency([a, shifted + 1.0], 8) == [1.0]


# ----------------------------------------------------------------- the predictor-only agent (step:0)
def test_step0_agent_executes_the_predictors_chunk(tiny_checkpoint):
    from agents.checkpoint import load_policy, load_predictor
    from agents.factory import make_agent, parse_method
    from step_envs.registry import make_env

    assert parse_method("step:0") == ("step", 0)
    for bad in ("ddim:0", "ddpm:0", "step-temporal:0"):
        with pytest.raises(ValueError, match="step:0"):
            parse_method(bad)
    env = make_env("pusht", obs_type="state")
    try:
        agent = make_agent("step:0", env, task="pusht", checkpoint=str(tiny_checkpoint))
        assert agent.cfg.steps == 0 and agent.sampler is None
        backbone, _ = load_policy(tiny_checkpoint)
        predictor, _ = load_predictor(tiny_checkpoint / "predictor", backbone)
        obs, _ = env.reset(seed=0)
        agent.reset()
        chunks = []
        for step in range(9):
            action = agent.act(obs)
            if step in (0, 8):  # the two replans
                with torch.inference_mode():
                    cond = backbone.global_cond(agent.history)
                    expected = predictor(cond, chunks[-1] if chunks else None)
                torch.testing.assert_close(agent.last_chunk, expected, atol=1e-5, rtol=1e-5)
                chunks.append(expected)
                raw = backbone.normalizer.unnormalize_action(expected[0, 1]).numpy()
                np.testing.assert_allclose(action, np.clip(raw, env.action_space.low, env.action_space.high), atol=1e-4)
            obs, *_ = env.step(action)
        assert agent.n_replans == 2
        with pytest.raises(ValueError, match="first call"):
            make_agent("step:0", env, task="pusht", checkpoint=str(tiny_checkpoint), first_call="noise")
    finally:
        env.close()


def test_step0_latency_row(tiny_checkpoint):
    from agents.checkpoint import load_policy, load_predictor
    from agents.latency import LatencyConfig, measure_latency
    from step_envs.registry import make_env

    backbone, _ = load_policy(tiny_checkpoint)
    predictor, _ = load_predictor(tiny_checkpoint / "predictor", backbone)
    env = make_env("pusht", obs_type="state")
    threads = torch.get_num_threads()
    try:
        rows = measure_latency(backbone, predictor, LatencyConfig(methods=("step:0",), calls=2, warmup=1, nfe_calls=2),
                               env.action_space)
    finally:
        env.close()
        torch.set_num_threads(threads)
    assert rows[0]["method"] == "step" and rows[0]["steps"] == 0 and rows[0]["ratio"] > 0


# ----------------------------------------------------------------- the command line
TINY = ["--tasks", "pusht", "--window-episodes", "1", "--windows", "8", "--num-envs", "1", "--threads", "1",
        "--no-progress"]


def test_cli_all_writes_every_analysis(tiny_checkpoint, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["analyze", "all", *TINY, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path),
                     "--lip-windows", "2", "--lip-timesteps", "0,50", "--lip-iters", "2", "--power-iters", "20",
                     "--contraction-steps", "3,2", "--ks", "1,2", "--kselect-windows", "3",
                     "--methods", "step:2,step:0", "--episodes", "1", "--max-steps", "10",
                     "--spread-windows", "2", "--spread-samples", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    for name, plot in A.PLOT_NAMES.items():
        folder = tmp_path / name
        assert (folder / "results.json").exists() and (folder / "results.md").exists() and (folder / plot).exists()
        report = json.loads((folder / "results.json").read_text())
        assert report["analysis"] == name and "pusht" in report["tasks"]
        assert "evaluation seeds 0-0" in (folder / "results.md").read_text()  # the seed range is named
    for name in ("results.json", "results.md", "overview.png"):
        assert (tmp_path / name).exists()
    lip = json.loads((tmp_path / "lipschitz" / "results.json").read_text())["tasks"]["pusht"]
    assert set(lip["spectral"]["groups"]) == {"down", "mid", "up", "other"}
    assert all(r["sigma"] > 0 for r in lip["layers"])
    ks = json.loads((tmp_path / "kselect" / "results.json").read_text())["tasks"]["pusht"]
    assert [r["k"] for r in ks["rows"]] == [1, 2] and ks["rho"] is not None
    loop = json.loads((tmp_path / "predictor-only" / "results.json").read_text())["tasks"]["pusht"]["closed_loop"]
    assert [r["method"] for r in loop] == ["step:2", "step:0"]
    assert "Predictor only (step:0)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nosuchtask"], "Unknown task"),
    (["--tasks", "pusht", "--checkpoint", "/nonexistent/ckpt"], "No policy checkpoint"),
    (["--tasks", "pusht,lift", "--checkpoint", "x"], "one policy"),
    (["--tasks", "pusht", "--seed-start", "100000"], "evaluation block"),
])
def test_cli_bad_input_one_line_errors(args, message, capsys, tmp_path):
    assert main(["analyze", "mare", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("step analyze: error:") and message in err and "\n" not in err


def test_cli_refuses_a_checkpoint_of_another_task(tiny_checkpoint, capsys, tmp_path):
    assert main(["analyze", "lipschitz", "--tasks", "lift", "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert "trained for task 'pusht', not 'lift'" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (dict(windows=0), "--windows must be at least 1"),
    (dict(spread_samples=1), "--spread-samples must be at least 2"),
    (dict(tasks=("nope",)), "nope"),
    (dict(seed_start=99_990), "evaluation block"),
    (dict(methods=("ddim:x",)), "ddim:x"),
])
def test_bad_analyze_config_is_refused_when_made(bad, message):
    # validation lives in AnalyzeConfig.__post_init__: a bad value never reaches a run
    with pytest.raises(ValueError, match=message):
        A.AnalyzeConfig(**bad)

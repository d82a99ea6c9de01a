import pytest
import torch

from agents.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler, ScheduleConfig, WarmStart

SCHED = ScheduleConfig()


def toy_eps(x, t, cond):  # a smooth fixed "network"
    return torch.tanh(0.5 * x + 0.01 * t.view(-1, 1, 1).float())


def test_ddim_update_equals_diffusers_step():
    s = DDIMSampler(4, SCHED)
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for t in s.scheduler.timesteps:
        ref = s.scheduler.step(toy_eps(ref, t.expand(3), None), t, ref).prev_sample
    ours = s.run(toy_eps, torch.zeros(3, 1), x)
    assert s.timesteps == [75, 50, 25, 0]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_ddim_explicit_timesteps():
    """Explicit timesteps: the default list gives the default sampler; each step lands on the next listed timestep."""
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(1))
    default, same = DDIMSampler(2, SCHED), DDIMSampler(2, SCHED, timesteps=[50, 0])
    assert torch.equal(default.run(toy_eps, None, x), same.run(toy_eps, None, x))
    s = DDIMSampler(2, SCHED, timesteps=[50, 25])
    abar = s.scheduler.alphas_cumprod.double()
    assert s.start_timestep == 50 and abs(s.coef[0][2] - abar[25].sqrt().item()) < 1e-9 and s.coef[1][2] == 1.0
    for bad in ([25, 50], [50], [100, 0], [50, -1]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            DDIMSampler(2, SCHED, timesteps=bad)


def test_ddpm_update_equals_diffusers_step():
    s = DDPMSampler(100, SCHED)
    x = torch.randn(2, 16, 2)
    eps = toy_eps(x, torch.tensor([60, 60]), None)
    index = s.timesteps.index(60)
    ref = s.scheduler.step(eps, 60, x, generator=torch.Generator().manual_seed(3)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(s.step(eps, index, x, noise), ref, atol=1e-5)


def test_warm_start_at_full_noise_equals_noise_start():
    s = DDIMSampler(100, SCHED)
    assert s.start_timestep == 99 and s.start_alpha < 1e-3
    gen = torch.Generator().manual_seed(0)  # seeded: an unseeded draw failed the 2e-3 tolerance now and then
    noise = torch.randn(4, 16, 2, generator=gen)
    pred = torch.rand(4, 16, 2, generator=gen) * 2 - 1
    warm = WarmStart(s).initial(pred, noise)
    cond = torch.zeros(4, 1)
    assert torch.allclose(s.run(toy_eps, cond, warm), s.run(toy_eps, cond, noise), atol=2e-3)


def test_warm_start_is_add_noise():
    s = DDIMSampler(2, SCHED)
    assert s.start_timestep == 50
    pred, noise = torch.rand(2, 16, 2), torch.randn(2, 16, 2)
    ref = s.scheduler.add_noise(pred, noise, torch.tensor([50]))
    assert torch.allclose(WarmStart(s).initial(pred, noise), ref, atol=1e-6)
    xi = torch.randn(2, 16, 2)
    perturbed = WarmStart(s).initial(pred, noise, lam=0.5, sigma=0.2, xi=xi)
    assert torch.allclose(perturbed, 0.5 * s.start_alpha * pred + s.start_sigma * noise + 0.2 * xi, atol=1e-6)


def test_ddim_every_step_tracks_ddpm_mean_path():
    """Gaussian data N(m, s^2) with its exact epsilon: both samplers keep E[x_t] = sqrt(abar_t) m."""
    sched = ScheduleConfig(clip_sample=False)
    m, s2 = 0.4, 0.05
    ddim, ddpm = DDIMSampler(100, sched), DDPMSampler(100, sched)
    abar = ddim.scheduler.alphas_cumprod

    def exact_eps(x, t, cond):
        ab = abar[t].view(-1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s2 + 1 - ab)

    torch.manual_seed(0)
    noise = torch.randn(4000, 16, 1)
    cond = torch.zeros(4000, 1)
    path_ddim, path_ddpm = [], []
    out_ddim = ddim.run(exact_eps, cond, noise, trace=path_ddim)
    out_ddpm = ddpm.sample(exact_eps, cond, noise.shape, x_init=noise, trace=path_ddpm)
    for a, b in zip(path_ddim, path_ddpm):
        assert abs(a.mean() - b.mean()) < 0.03
    assert abs(out_ddim.mean() - m) < 0.01 and abs(out_ddpm.mean() - m) < 0.01
    assert abs(out_ddim.std() - s2**0.5) < 0.02 and abs(out_ddpm.std() - s2**0.5) < 0.02


def test_dpmsolver_state_is_reset_between_chunks():
    s = DPMSolverSampler(2, SCHED)
    x = torch.randn(2, 16, 2)
    a = s.sample(toy_eps, torch.zeros(2, 1), x.shape, x_init=x)
    b = s.sample(toy_eps, torch.zeros(2, 1), x.shape, x_init=x)
    assert torch.equal(a, b) and a.abs().max() <= 1.0 + 1e-6

import torch

from agents.stall import StallConfig, StallDetector, chunk_delta


def moving_chunks(velocity: float, n: int = 4, horizon: int = 16, shift: int = 8):
    """Chunks of a robot moving at constant velocity, re-planned every ``shift`` steps."""
    steps = torch.arange(horizon, dtype=torch.float32)
    return [(velocity * (k * shift + steps)).view(1, horizon, 1).repeat(1, 1, 2) for k in range(n)]


def test_delta_index_measures_motion():
    a, b = moving_chunks(0.01)[:2]
    assert torch.allclose(chunk_delta(a, b, 8), torch.tensor([0.08]))
    still = torch.zeros(1, 16, 2)
    assert chunk_delta(still, still.clone(), 8).item() == 0.0


def test_delta_time_aligned_compares_overlap():
    a, b = moving_chunks(0.05)[:2]
    assert chunk_delta(a, b, 8, align="time").abs().item() < 1e-6  # consistent plan -> no change


def test_switching_on_synthetic_sequence():
    cfg = StallConfig(eps=0.01, lam=1.0, sigma=0.0, lam_stall=0.5, sigma_stall=0.3)
    det = StallDetector(cfg, shift=8)
    lam, sigma, stalled = det.coefficients(1)
    assert not stalled.any() and lam.item() == 1.0 and sigma.item() == 0.0  # no history yet
    moving = moving_chunks(0.05)
    det.update(None, moving[0])
    det.update(moving[0], moving[1])
    assert not det.stalled(1).any()
    still = torch.full((1, 16, 2), 0.3)
    det.update(still, still + 1e-4)
    lam, sigma, stalled = det.coefficients(1)
    assert stalled.all() and lam.item() == 0.5 and abs(sigma.item() - 0.3) < 1e-6
    det.reset()
    assert not det.stalled(1).any()


def test_per_row_and_disabled():
    det = StallDetector(StallConfig(eps=0.01), shift=8)
    prev = torch.zeros(2, 16, 2)
    cur = torch.stack([torch.zeros(16, 2), torch.ones(16, 2)])
    det.update(prev, cur)
    assert det.stalled(2).tolist() == [True, False]
    off = StallDetector(StallConfig(enabled=False), shift=8)
    off.update(prev, prev)
    assert not off.stalled(2).any()

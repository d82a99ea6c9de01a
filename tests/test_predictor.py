import torch

from agents.backbone import count_parameters
from agents.predictor import Predictor, PredictorConfig, shift_chunk


def test_shapes_and_param_count():
    model = Predictor(PredictorConfig(cond_dim=36)).eval()
    assert count_parameters(model) < 1_000_000
    cond, prev = torch.randn(3, 36), torch.randn(3, 16, 2)
    assert model(cond, prev).shape == (3, 16, 2)
    assert model(cond, None).shape == (3, 16, 2)  # first call: no history
    mixed = model(cond, prev, torch.tensor([True, False, True]))
    assert torch.allclose(mixed[1], model(cond[1:2], None)[0], atol=1e-5)
    spatial = Predictor(PredictorConfig(cond_dim=36, use_prev=False))
    assert spatial(cond).shape == (3, 16, 2) and count_parameters(spatial) < 1_000_000


def test_untrained_predictor_starts_at_shifted_previous_chunk():
    model = Predictor(PredictorConfig(cond_dim=36)).eval()
    prev = torch.randn(2, 16, 2)
    assert torch.allclose(model(torch.randn(2, 36), prev), shift_chunk(prev, 8))


def test_shift_chunk():
    prev = torch.arange(16.0).view(1, 16, 1)
    out = shift_chunk(prev, 8)[0, :, 0]
    assert out.tolist() == list(range(8, 16)) + [15.0] * 8


def test_training_pairs_are_truly_shifted(tiny_dataset, tiny_checkpoint):
    """The input chunk is the action window Ta=8 frames earlier, never a slice of the target window."""
    from agents.checkpoint import load_policy
    from agents.training import TrainPredictorConfig, build_predictor_pairs, load_frames

    backbone, _ = load_policy(tiny_checkpoint)
    data = load_frames(tiny_dataset)
    index = torch.tensor([20, 12, 3])  # episode 0 starts at frame 0
    pairs = build_predictor_pairs(backbone, data, index, TrainPredictorConfig(policy="", dataset=""))
    raw_prev = backbone.normalizer.unnormalize_action(pairs.prev)
    # window of frame i covers actions i-1 .. i+14; the previous one covers i-9 .. i+6
    assert torch.allclose(raw_prev[0], data.action[11:27], atol=1e-3)
    assert torch.allclose(raw_prev[1], data.action[3:19], atol=1e-3)
    assert pairs.has_prev.tolist() == [True, True, False]
    assert not torch.allclose(pairs.prev[0], pairs.target[0])


def test_small_predictor_without_self_attention():
    import pytest

    small = Predictor(PredictorConfig(cond_dim=36, n_encoder_layers=0, n_cross_blocks=1)).eval()
    default = Predictor(PredictorConfig(cond_dim=36))
    assert isinstance(small.encoder, torch.nn.Identity) and len(small.blocks) == 1
    assert count_parameters(small) < 0.4 * count_parameters(default)
    cond, prev = torch.randn(3, 36), torch.randn(3, 16, 2)
    assert torch.allclose(small(cond, prev), shift_chunk(prev, 8))  # the same residual start
    with torch.no_grad():
        small.head.weight.normal_()
    mixed = small(cond, prev, torch.tensor([True, False, True]))
    assert torch.allclose(mixed[1], small(cond[1:2], None)[0], atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of n_heads"):
        Predictor(PredictorConfig(cond_dim=36, d_model=30, n_heads=4))

"""Post-hoc STEP for a LeRobot DiffusionPolicy: import parity with LeRobot's own sampling, and the CLI path.

The LeRobot checkpoint is built here (tiny config, random weights, saved with ``save_pretrained`` and its
processors, as ``lerobot-train`` writes them); nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from agents import make_agent  # noqa: E402

# Parity tolerance in raw action units (Push-T: pixels on a 512 px board, action range ~480 px here). Both sides
# run the same float32 network; the samplers' update arithmetic differs in rounding only (our DDIM/DDPM
# updates are written out with float64-derived coefficients, diffusers indexes its tables), ~1e-6 relative.
ATOL_PX = 1e-2


def _lerobot_diffusion_folder(path, seed: int = 0):
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.diffusion.processor_diffusion import make_diffusion_pre_post_processors

    cfg = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
                        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(16,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        n_obs_steps=2, horizon=16, n_action_steps=8, down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4,
        device="cpu", push_to_hub=False,
        # a non-default mode for the state, to check every mode maps onto our normaliser
        normalization_mapping={"VISUAL": NormalizationMode.MEAN_STD, "STATE": NormalizationMode.MEAN_STD,
                               "ACTION": NormalizationMode.MIN_MAX},
    )
    torch.manual_seed(seed)
    policy = DiffusionPolicy(cfg)
    stats = {
        "observation.state": {"mean": torch.tensor([250.0, 260.0]), "std": torch.tensor([90.0, 80.0]),
                              "min": torch.tensor([20.0, 25.0]), "max": torch.tensor([490.0, 480.0])},
        "observation.environment_state": {"mean": torch.full((16,), 256.0), "std": torch.full((16,), 60.0),
                                          "min": torch.zeros(16), "max": torch.full((16,), 512.0)},
        "action": {"min": torch.tensor([15.0, 20.0]), "max": torch.tensor([495.0, 490.0]),
                   "mean": torch.tensor([250.0, 250.0]), "std": torch.tensor([100.0, 100.0])},
    }
    pre, post = make_diffusion_pre_post_processors(cfg, dataset_stats=stats)
    policy.save_pretrained(path)
    pre.save_pretrained(path)
    post.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lerobot_policy(tmp_path_factory):
    return _lerobot_diffusion_folder(tmp_path_factory.mktemp("lerobot") / "pretrained_model")


@pytest.fixture(scope="module")
def imported(lerobot_policy, tmp_path_factory):
    from agents.lerobot_import import import_lerobot_policy

    out = tmp_path_factory.mktemp("imported") / "policy"
    report = import_lerobot_policy(lerobot_policy, out, task="pusht")
    assert report["obs_type"] == "state"
    return out


def _lerobot_chunk(folder, obs, seed: int, ddim_steps: int | None = None) -> np.ndarray:
    """LeRobot's own select_action path: preprocessor -> DiffusionPolicy -> postprocessor, 8 executed actions."""
    from diffusers import DDIMScheduler
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    policy = DiffusionPolicy.from_pretrained(folder, local_files_only=True).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(folder))
    if ddim_steps is not None:  # LeRobot's DDIM option (noise_scheduler_type="DDIM"), built as LeRobot builds it
        c = policy.config
        policy.diffusion.noise_scheduler = DDIMScheduler(
            num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
            beta_schedule=c.beta_schedule, clip_sample=c.clip_sample, clip_sample_range=c.clip_sample_range,
            prediction_type=c.prediction_type)
        policy.diffusion.num_inference_steps = ddim_steps
    batch = {"observation.state": torch.as_tensor(obs["agent_pos"], dtype=torch.float32),
             "observation.environment_state": torch.as_tensor(obs["environment_state"], dtype=torch.float32)}
    policy.reset()
    torch.manual_seed(seed)  # LeRobot samples from the global generator: the same stream as Generator(seed)
    actions = [post(policy.select_action(pre(batch)))]
    while policy._queues["action"]:
        actions.append(post(policy._queues["action"].popleft()))
    return torch.cat(actions).numpy()


def _our_chunk(checkpoint, env, spec, obs, seed):
    agent = make_agent(spec, env, checkpoint=str(checkpoint), seed=seed)
    agent.reset()
    agent.act(obs)
    return agent.cache[0]


@pytest.mark.parametrize("spec", ["ddpm", "ddim:2", "ddim:10"])
def test_imported_policy_matches_lerobot_sampling(lerobot_policy, imported, env, spec):
    obs, _ = env.reset(seed=4)
    steps = None if spec == "ddpm" else int(spec.split(":")[1])
    theirs = _lerobot_chunk(lerobot_policy, obs, seed=7, ddim_steps=steps)
    ours = _our_chunk(imported, env, spec, obs, seed=7)
    assert theirs.shape == ours.shape == (8, 2)
    np.testing.assert_allclose(ours, theirs, atol=ATOL_PX)
    # the comparison can fail: other noise gives another chunk
    assert np.abs(_our_chunk(imported, env, spec, obs, seed=8) - theirs).max() > 100 * ATOL_PX


def test_imported_policy_keeps_lerobot_weights_and_stats(lerobot_policy, imported):
    from safetensors.torch import load_file

    from agents.checkpoint import load_policy

    backbone, config = load_policy(imported, task="pusht")
    theirs = load_file(str(lerobot_policy / "model.safetensors"))
    ours = backbone.model.state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours[key[len("diffusion."):]], value), key
    assert config["imported_from"]["lerobot_type"] == "diffusion"
    # environment_state has no entry in the policy's normalization_mapping: LeRobot leaves it as it is
    x = torch.tensor([[3.0, 500.0]]).repeat(1, 8)
    assert torch.allclose(backbone.normalizer.env_state(x), x)
    # STATE is MEAN_STD here: (x - mean) / (std + eps)
    s = torch.tensor([[340.0, 180.0]])
    assert torch.allclose(backbone.normalizer.state(s), torch.tensor([[1.0, -1.0]]), atol=1e-5)


def test_not_a_diffusion_policy_is_refused(tmp_path):
    from agents.lerobot_import import import_lerobot_policy

    (tmp_path / "act").mkdir()
    (tmp_path / "act" / "config.json").write_text(json.dumps({"type": "act"}))
    with pytest.raises(ValueError, match="LeRobot 'act' policy, not a DiffusionPolicy"):
        import_lerobot_policy(tmp_path / "act", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a LeRobot pretrained policy folder"):
        import_lerobot_policy(tmp_path / "nothing", tmp_path / "out")


def test_wrong_task_is_refused(lerobot_policy, tmp_path):
    from agents.lerobot_import import import_lerobot_policy

    with pytest.raises(ValueError, match="do not match task 'lift'"):
        import_lerobot_policy(lerobot_policy, tmp_path / "out", task="lift")


def test_train_predictor_cli_on_lerobot_policy(lerobot_policy, tiny_dataset, env, tmp_path):
    """`step train-predictor --lerobot-policy DIR --dataset DIR`: a checkpoint make_agent('step:2') loads."""
    from agents.cli import main

    out = tmp_path / "lerobot-step"
    rc = main(["train-predictor", "--lerobot-policy", str(lerobot_policy), "--dataset", str(tiny_dataset),
               "--policy", str(out), "--steps", "5", "--batch-size", "16", "--warmup-steps", "1", "--no-ablation"])
    assert rc == 0
    assert (out / "config.json").exists() and (out / "predictor" / "config.json").exists()
    agent = make_agent("step:2", env, checkpoint=str(out), seed=0)
    obs, _ = env.reset(seed=1)
    agent.reset()
    action = agent.act(obs)
    assert action.shape == (2,) and np.all(np.isfinite(action))
    # the imported backbone's DDPM still equals LeRobot's sampling (the predictor training did not touch it)
    theirs = _lerobot_chunk(lerobot_policy, obs, seed=2, ddim_steps=4)
    np.testing.assert_allclose(_our_chunk(out, env, "ddim:4", obs, seed=2), theirs, atol=ATOL_PX)

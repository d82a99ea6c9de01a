"""Image policies end to end on tiny data: the narrow ResNet-18 encoder, training on camera frames, an image STEP
agent in a pixels env, and the encoder running once per replan (never once per denoising step)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.backbone import PRESETS, Backbone, FeatureSpec, count_parameters, narrow_resnet18


def test_narrow_resnet18_is_resnet18_at_width_64_and_keeps_the_condition_size():
    import torchvision

    trunk = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2])
    ours = narrow_resnet18(64, use_group_norm=False)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in trunk.parameters()]
    features = FeatureSpec(state_dim=2, action_dim=2, cameras={"top": [96, 96, 3]})
    obs = {"observation.state": torch.zeros(1, 2, 2),
           "observation.images.top": torch.randint(0, 255, (1, 2, 3, 96, 96), dtype=torch.uint8)}
    sizes = {}
    for name in ("image", "image_w32", "image_w16"):
        backbone = Backbone(PRESETS[name], features).eval()
        sizes[name] = (count_parameters(backbone.model.rgb_encoder[0]), backbone.global_cond(obs).shape)
    # the encoder shrinks about with the square of the width; the U-Net's condition does not change
    assert sizes["image_w16"][0] * 10 < sizes["image_w32"][0] * 3 < sizes["image"][0]
    cond = (1, 2 * (2 + 2 * 32))  # (state + 32 keypoints' x, y) x 2 history frames
    assert sizes["image"][1] == sizes["image_w32"][1] == sizes["image_w16"][1] == cond


def test_an_nhwc_encoder_saves_and_loads_as_the_same_weights_and_condition(tmp_path):
    """Training may lay the encoder out NHWC (channels_last, agents/compute.py); the checkpoint must not know."""
    from agents.checkpoint import load_policy, save_policy
    from agents.compute import use_channels_last

    features = FeatureSpec(state_dim=2, action_dim=2, cameras={"top": [96, 96, 3]})
    obs = {"observation.state": torch.rand(1, 2, 2),
           "observation.images.top": torch.randint(0, 255, (1, 2, 3, 96, 96), dtype=torch.uint8)}
    torch.manual_seed(0)
    backbone = Backbone(PRESETS["tiny_image"], features).eval()
    with torch.no_grad():
        for param in backbone.model.parameters():  # asymmetric weights, so that a transposed layout would show
            param.add_(torch.randn_like(param) * 0.1)
    reference = backbone.global_cond(obs)
    use_channels_last(backbone.model)
    assert any(p.ndim == 4 and not p.is_contiguous() for p in backbone.model.parameters())  # really NHWC
    assert torch.allclose(backbone.global_cond(obs), reference, atol=1e-4)  # other kernels, same maths
    save_policy(tmp_path / "nhwc", backbone, task="pusht", obs_type="pixels")
    loaded, _ = load_policy(tmp_path / "nhwc")
    for (name, a), b in zip(backbone.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.allclose(loaded.eval().global_cond(obs), reference, atol=1e-4)


def test_robomimic_image_preset_crops_its_84x84_cameras_at_random_in_training_and_centrally_in_eval():
    features = FeatureSpec(state_dim=2, action_dim=2, cameras={"agentview": [84, 84, 3], "wrist": [84, 84, 3]})
    frame = torch.rand(1, 3, 84, 84)
    for name, augments in (("robomimic_image", True), ("image_w32", False)):
        encoder = Backbone(PRESETS[name], features).model.rgb_encoder[0]
        torch.manual_seed(0)
        encoder.train()
        first, second = encoder(frame), encoder(frame)
        # a random crop smaller than the frame sees another window each call; at 84x84 the crop is the whole frame
        assert (not torch.allclose(first, second)) == augments, name
        encoder.eval()
        assert torch.equal(encoder(frame), encoder(frame))


def random_pixel_episodes(env, seeds_and_lengths, rng_seed: int, spread: float = 40.0) -> list[dict]:
    """Short pixels_state Push-T episodes of random pusher moves around the pusher, as LeRobot frame dicts."""
    from step_envs.dataset import frame_from_obs

    rng = np.random.default_rng(rng_seed)
    episodes = []
    for seed, length in seeds_and_lengths:
        obs, _ = env.reset(seed=seed)
        frames = []
        for _ in range(length):
            action = np.clip(obs["agent_pos"] + rng.uniform(-spread, spread, 2), 0, 512).astype(np.float32)
            frames.append(frame_from_obs(obs, action))
            obs, *_ = env.step(action)
        episodes.append({key: np.stack([f[key] for f in frames]) for key in frames[0]})
    return episodes


@pytest.fixture(scope="module")
def pixels_checkpoint(tmp_path_factory):
    """A tiny image backbone + predictor trained for a few steps on two short pixels_state episodes."""
    from agents.training import TrainPolicyConfig, TrainPredictorConfig, train_policy, train_predictor
    from step_envs.dataset import lerobot_features, write_dataset
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="pixels_state")
    episodes = random_pixel_episodes(env, ((0, 20), (1, 20)), rng_seed=0, spread=20.0)
    root = tmp_path_factory.mktemp("data") / "pusht_pixels_tiny"
    write_dataset(root, fps=10, features=lerobot_features(env.observation_space, env.action_space, use_videos=False),
                  episodes=episodes, task_text="push the T", progress=False)
    env.close()
    out = tmp_path_factory.mktemp("ckpt") / "image_policy"
    train_policy(TrainPolicyConfig(dataset=str(root), out=str(out), preset="tiny_image", obs_type="pixels", steps=3,
                                   batch_size=4, warmup_steps=1, eval_every=0, progress=False))
    train_predictor(TrainPredictorConfig(policy=str(out), dataset=str(root), steps=2, batch_size=4, warmup_steps=1,
                                         ablation=False, progress=False))
    return out


@pytest.mark.parametrize("method, obs_type", [("step:2", "pixels_state"), ("ddim:4", "pixels")])
def test_image_agent_encodes_once_per_replan(pixels_checkpoint, method, obs_type):
    import gymnasium as gym

    from agents.factory import make_agent

    env = gym.make("step/PushT-v0", obs_type=obs_type)  # the README quickstart's way; extra state keys are ignored
    agent = make_agent(method, env, task="pusht", checkpoint=str(pixels_checkpoint))
    (encoder,) = agent.backbone.model.rgb_encoder  # one camera, one encoder (separate_camera_encoders)
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    unet_calls = []
    agent.backbone.model.unet.register_forward_hook(lambda module, args, out: unet_calls.append(1))
    obs, _ = env.reset(seed=3)
    agent.reset()
    n_action_steps = agent.backbone.cfg.n_action_steps
    for _ in range(2 * n_action_steps):
        action = agent.act(obs)
        assert action.shape == (2,) and np.isfinite(action).all()
        obs, *_ = env.step(action)
    env.close()
    # two replans: one encoder call each over both history frames, while the U-Net ran 2 x k times
    assert len(calls) == 2 and calls == [agent.backbone.cfg.n_obs_steps] * 2
    assert len(unet_calls) == 2 * int(method.split(":")[1])


def test_eval_and_bench_read_the_obs_type_from_an_image_checkpoint(pixels_checkpoint, tmp_path, capsys):
    """`step eval --video` and `step bench` on an image checkpoint with no --obs-type: camera frames reach it."""
    import imageio.v2 as imageio

    from agents.cli import main

    assert main(["eval", "--task", "pusht", "--agent", "step:2", "--checkpoint", str(pixels_checkpoint),
                 "--episodes", "2", "--num-envs", "2", "--video", str(tmp_path / "videos"), "--num-videos", "1"]) == 0
    frames = imageio.mimread(tmp_path / "videos" / "episode_0.mp4")
    assert len(frames) == 301 and "video:" in capsys.readouterr().out  # a full Push-T episode + the reset frame
    assert main(["bench", "--task", "pusht", "--checkpoint", str(pixels_checkpoint), "--methods", "ddim:2,step:2",
                 "--episodes", "2", "--num-envs", "2", "--max-steps", "16", "--latency-calls", "2",
                 "--out", str(tmp_path / "bench"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert report["obs_type"] == "pixels"
    assert all(row["encode_ms_median"] > 0 for row in report["rows"])
    assert "Encode (ms)" in (tmp_path / "bench" / "results.md").read_text()


def test_video_frames_load_per_episode_exactly_as_lerobot_reads_them(tmp_path):
    """load_frames decodes a video camera one episode at a time: every frame must equal LeRobot's own per-item read
    (which seeks the video once per frame), in dataset row order across episodes of different lengths."""
    from agents.training import load_frames
    from step_envs.dataset import lerobot_features, load_dataset, write_dataset
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="pixels_state")
    episodes = random_pixel_episodes(env, ((0, 9), (1, 14), (2, 5)), rng_seed=1)
    root = tmp_path / "pusht_video_tiny"
    write_dataset(root, fps=10, features=lerobot_features(env.observation_space, env.action_space, use_videos=True),
                  episodes=episodes, task_text="push the T", progress=False)
    env.close()
    data = load_frames(root, use_images=True, progress=False)
    ds = load_dataset(root)
    key = next(k for k in ds.meta.video_keys)
    expected = torch.stack([(ds[i][key] * 255).round().to(torch.uint8) for i in range(len(ds))])
    frames = data.images[key.split(".")[-1]]
    assert frames.dtype == torch.uint8 and frames.shape == expected.shape == (28, 3, 96, 96)
    assert torch.equal(frames, expected)
    assert not torch.equal(frames[8], frames[9])  # episode boundary: different scenes
    for video in (root / "videos").rglob("*.mp4"):
        video.unlink()
    with pytest.raises(ValueError, match=r"has lost its camera videos \(no videos/observation.images.top/\*.mp4\)"):
        load_frames(root, use_images=True, progress=False)


def test_a_raw_episode_cache_alone_loads_as_its_dataset(tmp_path):
    """A `step collect` folder reduced to raw/ (what travels to a lent GPU, scripts/gpu_train.py) reads back as the
    same frames, episode bounds and (lossless) images as the LeRobot dataset built from those episodes."""
    import json

    from agents.training import load_frames
    from step_envs.dataset import lerobot_features, write_dataset
    from step_envs.registry import make_env

    env = make_env("pusht", obs_type="pixels_state")
    seeds = (100_000, 100_001)
    episodes = random_pixel_episodes(env, zip(seeds, (7, 4)), rng_seed=2)
    (tmp_path / "cache" / "raw").mkdir(parents=True)
    for seed, episode in zip(seeds, episodes):  # the raw cache's layout (step_envs/collect.py)
        np.savez_compressed(tmp_path / "cache" / "raw" / f"seed_{seed:07d}.npz",
                            summary=json.dumps({"seed": seed, "kept": True}), **episode)
    root = tmp_path / "dataset"
    write_dataset(root, fps=10, features=lerobot_features(env.observation_space, env.action_space, use_videos=False),
                  episodes=episodes, task_text="push the T", progress=False)
    env.close()
    want = load_frames(root, use_images=True, progress=False)
    got = load_frames(tmp_path / "cache", use_images=True, progress=False)
    assert got.images["top"].shape == (11, 3, 96, 96) and got.images["top"].dtype == torch.uint8
    for name in ("state", "action", "episode", "start", "end"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.images["top"], want.images["top"])
    assert got.features() == want.features()
    with pytest.raises(FileNotFoundError, match="holds no seed_"):
        (tmp_path / "empty" / "raw").mkdir(parents=True)
        load_frames(tmp_path / "empty")
    (tmp_path / "cache" / "raw" / "seed_0100002.npz").write_bytes(b"cut short by a kill")
    with pytest.raises(ValueError, match="seed_0100002.npz is not a readable episode"):
        load_frames(tmp_path / "cache")

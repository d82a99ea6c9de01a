"""The diffusion backbone: LeRobot's Diffusion Policy network behind a small adapter.

What we take from LeRobot 0.6.1 (``lerobot.policies.diffusion``):
  * ``DiffusionModel``: the 1-D conditional U-Net with FiLM (``.unet``), the RGB encoder, the
    observation -> global-condition code (``_prepare_global_conditioning``) and the training loss
    (``compute_loss``, epsilon prediction on LeRobot's DDPM noise scheduler).

What we do not take, and why:
  * ``DiffusionPolicy.select_action`` / ``predict_action_chunk``: they hide the sampling loop inside
    the model (one scheduler, one start from pure noise). Our samplers drive ``unet(x, t, cond)``
    themselves (warm starts at intermediate timesteps, DPM-Solver++), so we call the U-Net directly.
  * LeRobot's normaliser processor pipeline: the samplers, the STEP predictor and the stall detector
    all work in the normalised action space and need the affine map itself, and the per-call dict
    pipeline costs time at batch 1 that would show up in every latency number. ``Normalizer`` below is
    the same min-max / mean-std maths as LeRobot's defaults (STATE and ACTION min-max to [-1, 1],
    VISUAL mean-std), kept as buffers so it is saved in our safetensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from step_envs.dataset import ACTION_KEY, ENV_STATE_KEY, IMAGE_PREFIX, STATE_KEY

OBS_IMAGES = "observation.images"  # LeRobot's stacked-camera key inside DiffusionModel


@dataclass
class FeatureSpec:
    """Shapes the backbone was built for; a checkpoint refuses envs that do not match."""

    state_dim: int
    action_dim: int
    env_state_dim: int | None = None
    cameras: dict[str, list[int]] = field(default_factory=dict)  # name -> [H, W, 3]


@dataclass
class PolicyConfig:
    """Diffusion Policy hyper-parameters (Chi et al.), sized for CPU by the presets below."""

    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 64
    use_film_scale_modulation: bool = True
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # image encoder (image variants only); never pretrained: nothing may be downloaded
    vision_backbone: str = "resnet18"
    # Stage widths of the ResNet-18 layout are (w, 2w, 4w, 8w): 64 is torchvision's ResNet-18 itself; a smaller w
    # builds the same 18-layer layout narrower (FLOPs ~ w^2), the encoder a CPU can train from scratch.
    vision_width: int = 64
    resize_shape: tuple[int, int] | None = None  # resize before the crop (a smaller image: FLOPs ~ pixels)
    # one encoder per camera (Diffusion Policy's RoboMimic image recipe: agentview and wrist see different scenes)
    separate_camera_encoders: bool = True
    crop_shape: tuple[int, int] | None = (84, 84)
    spatial_softmax_num_keypoints: int = 32
    use_group_norm: bool = True

    @property
    def schedule(self):
        """The noise schedule (``agents.samplers.ScheduleConfig``) derived from these fields."""
        from agents.samplers import ScheduleConfig

        return ScheduleConfig.from_policy(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("down_dims", "crop_shape", "resize_shape"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


# The CPU-sized state U-Net (4.2 M parameters with Push-T's shapes), small enough for batch-1 CPU inference in a
# few ms: any low-dimensional task (Push-T keypoints, RoboMimic state, SO-101 twin state).
STATE_UNET = PolicyConfig(down_dims=(64, 128, 256))
PRESETS: dict[str, PolicyConfig] = {
    "state": STATE_UNET,
    # The same preset under the name the Push-T configs and runs recorded before "state" existed; an alias, not
    # a copy, so the two can never drift apart.
    "pusht_state": STATE_UNET,
    # Push-T image: ResNet-18 from scratch with GroupNorm, as Diffusion Policy does without pretraining.
    "pusht_image": PolicyConfig(down_dims=(128, 256, 512), diffusion_step_embed_dim=128),
    # Any image task on the CPU: the same encoder with the state tasks' U-Net (a quarter of the U-Net's
    # FLOPs); `step train-bench --obs-type pixels --preset image` against pusht_image.
    "image": PolicyConfig(down_dims=(64, 128, 256)),
    # The same layout at half and a quarter of ResNet-18's width (stage widths 32-256 / 16-128): timed by
    # `step train-bench --obs-type pixels --preset image_w32 / image_w16` (results/train_bench/pusht_pixels_*_xeon);
    # configs/pusht_pixels_policy.yaml uses image_w32. Not yet compared by rollout score per CPU-hour.
    "image_w32": PolicyConfig(down_dims=(64, 128, 256), vision_width=32),
    "image_w16": PolicyConfig(down_dims=(64, 128, 256), vision_width=16),
    # RoboMimic's 84x84 cameras: image_w32 with Diffusion Policy's random 76x76 crop (centre crop at inference);
    # at 84x84 the default crop would keep the whole frame and augment nothing.
    "robomimic_image": PolicyConfig(down_dims=(64, 128, 256), vision_width=32, crop_shape=(76, 76)),
    # Timing only (`step latency --preset`, untrained): the state U-Net at the sizes the papers use, to show how
    # STEP's fixed cost (predictor + bookkeeping, ~0.3-0.6 ms on this CPU) compares with one NFE of a larger net.
    # Diffusion Policy's default CNN U-Net (62.5 M parameters with Push-T's shapes):
    "dp_state": PolicyConfig(down_dims=(256, 512, 1024)),
    # The STEP paper's "256M parameter version for DDPM" (its Appendix; 246.8 M with Push-T's shapes):
    "paper_state": PolicyConfig(down_dims=(512, 1024, 2048)),
    # Tests only: the smallest network that still has every part.
    "tiny": PolicyConfig(down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4),
    "tiny_image": PolicyConfig(down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4, vision_width=8,
                               spatial_softmax_num_keypoints=8),
}


def lerobot_config(cfg: PolicyConfig, features: FeatureSpec):
    """Translate our config into LeRobot's ``DiffusionConfig`` (network + noise schedule only)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    inputs = {STATE_KEY: PolicyFeature(type=FeatureType.STATE, shape=(features.state_dim,))}
    if features.env_state_dim:
        inputs[ENV_STATE_KEY] = PolicyFeature(type=FeatureType.ENV, shape=(features.env_state_dim,))
    for cam, (h, w, c) in features.cameras.items():
        inputs[IMAGE_PREFIX + cam] = PolicyFeature(type=FeatureType.VISUAL, shape=(c, h, w))
    outputs = {ACTION_KEY: PolicyFeature(type=FeatureType.ACTION, shape=(features.action_dim,))}
    return DiffusionConfig(
        input_features=inputs,
        output_features=outputs,
        device="cpu",
        n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon,
        n_action_steps=cfg.n_action_steps,
        down_dims=tuple(cfg.down_dims),
        kernel_size=cfg.kernel_size,
        n_groups=cfg.n_groups,
        diffusion_step_embed_dim=cfg.diffusion_step_embed_dim,
        use_film_scale_modulation=cfg.use_film_scale_modulation,
        # the noise schedule, as the samplers see it (agents/samplers.py ScheduleConfig)
        **{k: v for k, v in dataclasses.asdict(cfg.schedule).items() if k != "timestep_spacing"},
        vision_backbone=cfg.vision_backbone,
        pretrained_backbone_weights=None,
        resize_shape=tuple(cfg.resize_shape) if (features.cameras and cfg.resize_shape) else None,
        crop_shape=tuple(cfg.crop_shape) if (features.cameras and cfg.crop_shape) else None,
        spatial_softmax_num_keypoints=cfg.spatial_softmax_num_keypoints,
        use_separate_rgb_encoder_per_camera=cfg.separate_camera_encoders,
        use_group_norm=cfg.use_group_norm,
        push_to_hub=False,
    )


class Normalizer(nn.Module):
    """Affine maps into the network's space: min-max to [-1, 1] (state, action), mean-std (images).

    Stats are buffers (saved with the weights). Constant dimensions get a unit range so they map to -1
    instead of dividing by zero.
    """

    def __init__(self, features: FeatureSpec):
        super().__init__()
        self.register_buffer("state_min", torch.zeros(features.state_dim))
        self.register_buffer("state_max", torch.ones(features.state_dim))
        self.register_buffer("action_min", torch.zeros(features.action_dim))
        self.register_buffer("action_max", torch.ones(features.action_dim))
        env_dim = features.env_state_dim or 0
        self.register_buffer("env_min", torch.zeros(env_dim))
        self.register_buffer("env_max", torch.ones(env_dim))
        self.register_buffer("image_mean", torch.full((3, 1, 1), 0.5))
        self.register_buffer("image_std", torch.full((3, 1, 1), 0.5))

    def fit(self, state: Tensor, action: Tensor, env_state: Tensor | None = None, images: Tensor | None = None):
        """Set stats from data (rows = frames). ``images``: uint8 (N, 3, H, W), a sample is enough."""
        self.state_min.copy_(state.amin(0)), self.state_max.copy_(state.amax(0))
        self.action_min.copy_(action.amin(0)), self.action_max.copy_(action.amax(0))
        if env_state is not None and env_state.shape[-1]:
            self.env_min.copy_(env_state.amin(0)), self.env_max.copy_(env_state.amax(0))
        if images is not None:
            x = images.float() / 255.0
            self.image_mean.copy_(x.mean(dim=(0, 2, 3)).view(3, 1, 1))
            self.image_std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(3, 1, 1))

    @staticmethod
    def _to(x, lo, hi):
        span = torch.where(hi - lo > 1e-6, hi - lo, torch.ones_like(hi))
        return (x - lo) / span * 2.0 - 1.0

    @staticmethod
    def _from(x, lo, hi):
        span = torch.where(hi - lo > 1e-6, hi - lo, torch.ones_like(hi))
        return (x + 1.0) / 2.0 * span + lo

    def state(self, x: Tensor) -> Tensor:
        return self._to(x, self.state_min, self.state_max)

    def env_state(self, x: Tensor) -> Tensor:
        return self._to(x, self.env_min, self.env_max)

    def image(self, x: Tensor) -> Tensor:
        """uint8 (..., 3, H, W) -> float, mean-std normalised."""
        return (x.float() / 255.0 - self.image_mean) / self.image_std

    def action(self, x: Tensor) -> Tensor:
        return self._to(x, self.action_min, self.action_max)

    def unnormalize_action(self, x: Tensor) -> Tensor:
        return self._from(x, self.action_min, self.action_max)


class Backbone(nn.Module):
    """LeRobot's DiffusionModel + our normaliser, with the entry points our samplers and agents need.

    * ``global_cond(obs)``: obs history dict (raw units, (B, To, ...)) -> (B, cond_dim) condition.
    * ``denoise(x, t, cond)``: one network evaluation (NFE) of the U-Net in normalised action space.
    * ``normalize_action`` / ``unnormalize_action``: the action space both ways (the backbone owns its
      normalisation; nothing else reaches into ``normalizer``).
    """

    def __init__(self, cfg: PolicyConfig, features: FeatureSpec):
        super().__init__()
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionModel

        self.cfg = cfg
        self.features = features
        self.lerobot_cfg = lerobot_config(cfg, features)
        self.model = DiffusionModel(self.lerobot_cfg)
        if features.cameras and cfg.vision_width != 64:
            _narrow_rgb_encoders(self.model, cfg)
        self.normalizer = Normalizer(features)

    @property
    def action_shape(self) -> tuple[int, int]:
        return (self.cfg.horizon, self.features.action_dim)

    def normalize_obs(self, obs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw history batch (LeRobot keys, (B, To, ...)) -> the batch DiffusionModel expects."""
        out = {STATE_KEY: self.normalizer.state(obs[STATE_KEY].float())}
        if self.features.env_state_dim:
            out[ENV_STATE_KEY] = self.normalizer.env_state(obs[ENV_STATE_KEY].float())
        if self.features.cameras:
            # (B, To, n_cams, 3, H, W), the layout LeRobot's RGB encoder reads
            out[OBS_IMAGES] = torch.stack(
                [self.normalizer.image(obs[IMAGE_PREFIX + cam]) for cam in self.features.cameras], dim=2
            )
        return out

    def normalize_action(self, action: Tensor) -> Tensor:
        """Raw env units -> the normalised action space the samplers, the predictor and the loss work in."""
        return self.normalizer.action(action.float())

    def unnormalize_action(self, action: Tensor) -> Tensor:
        """Normalised action space -> raw env units (what agents execute)."""
        return self.normalizer.unnormalize_action(action)

    def global_cond(self, obs: dict[str, Tensor]) -> Tensor:
        return self.model._prepare_global_conditioning(self.normalize_obs(obs))

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.model.unet(x, t, global_cond=cond)

    def loss(self, obs: dict[str, Tensor], action: Tensor, action_is_pad: Tensor | None = None) -> Tensor:
        """Diffusion training loss (LeRobot's compute_loss) on a raw-unit batch."""
        batch = self.normalize_obs(obs)
        batch[ACTION_KEY] = self.normalize_action(action)
        if action_is_pad is None:
            action_is_pad = torch.zeros(action.shape[:2], dtype=torch.bool, device=action.device)
        batch["action_is_pad"] = action_is_pad
        return self.model.compute_loss(batch)


def narrow_resnet18(width: int, use_group_norm: bool = True) -> nn.Sequential:
    """ResNet-18's layout (7x7 stem, max-pool, four stages of two basic blocks, strides 1-2-2-2) with stage widths
    (w, 2w, 4w, 8w), without the average pool and classifier: the feature map the spatial softmax reads. Built from
    torchvision's BasicBlock; GroupNorm with 16 channels a group (LeRobot's rule) unless ``use_group_norm`` is off."""
    from torchvision.models.resnet import BasicBlock

    def norm(channels: int) -> nn.Module:
        return nn.GroupNorm(max(1, channels // 16), channels) if use_group_norm else nn.BatchNorm2d(channels)

    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), norm(width),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    inplanes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if stage == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), norm(planes))
        layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm),
                                    BasicBlock(planes, planes, norm_layer=norm)))
        inplanes = planes
    return nn.Sequential(*layers)


def _narrow_rgb_encoders(model: nn.Module, cfg: PolicyConfig) -> None:
    """Swap the ResNet-18 inside LeRobot's RGB encoder(s) for ``narrow_resnet18(cfg.vision_width)`` and rebuild the
    spatial softmax for its feature map; the encoder's output size (2 x keypoints) and so the U-Net stay as they are."""
    from lerobot.policies.diffusion.modeling_diffusion import SpatialSoftmax

    encoders = model.rgb_encoder if isinstance(model.rgb_encoder, nn.ModuleList) else [model.rgb_encoder]
    for encoder in encoders:
        encoder.backbone = narrow_resnet18(cfg.vision_width, cfg.use_group_norm)
        # same strides as ResNet-18, so the same feature-map height and width; 8w channels instead of 512
        feature_map = (8 * cfg.vision_width, encoder.pool._in_h, encoder.pool._in_w)
        encoder.pool = SpatialSoftmax(feature_map, num_kp=cfg.spatial_softmax_num_keypoints)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

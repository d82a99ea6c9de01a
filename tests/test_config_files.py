"""YAML configs: file values, command-line overrides, and clear errors."""

from pathlib import Path

import pytest

from agents.config_files import build_config
from agents.training import TrainPolicyConfig, TrainPredictorConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_committed_configs_load():
    policy = build_config(TrainPolicyConfig, CONFIGS / "pusht_state_policy.yaml", dataset="d", out="o")
    assert policy.preset == "pusht_state" and policy.batch_size == 256 and policy.lr == pytest.approx(5e-4)
    assert policy.threads == 0 and policy.precision == "auto"  # the fast path: every core, bf16 only where it pays
    for path in sorted(CONFIGS.glob("*_policy.yaml")):
        cfg = build_config(TrainPolicyConfig, path, dataset="d", out="o")
        assert cfg.eval_seed_start >= 900_000, path  # never a demonstration or bench seed
    predictor = build_config(TrainPredictorConfig, CONFIGS / "pusht_state_predictor.yaml", policy="p", dataset="d")
    assert predictor.prev_source == "dataset"


def test_command_line_overrides_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nbatch_size: 3\n")
    cfg = build_config(TrainPolicyConfig, path, dataset="d", out="o", steps=9, lr=None)
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (9, 3, TrainPolicyConfig.lr)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="Unknown TrainPolicyConfig field"):
        build_config(TrainPolicyConfig, bad, dataset="d", out="o")
    with pytest.raises(ValueError, match="needs \\['out'\\]"):
        build_config(TrainPolicyConfig, None, dataset="d")
    with pytest.raises(FileNotFoundError):
        build_config(TrainPolicyConfig, tmp_path / "missing.yaml", dataset="d", out="o")


def test_flags_and_yaml_override_the_same_fields(tmp_path):
    """Flags are generated from the config dataclass; --config FILE and a flag set the same field, the flag wins."""
    from agents.bench import BenchConfig
    from agents.cli import build_parser
    from agents.config_files import config_from_args

    path = tmp_path / "bench.yaml"
    path.write_text("methods: [ddim:2, step:2]\nepisodes: 7\nnum_envs: 3\n")
    args = build_parser().parse_args(["bench", "--task", "lift", "--config", str(path), "--episodes", "9",
                                      "--latency-only", "--no-progress"])
    cfg = config_from_args(BenchConfig, args)
    assert (cfg.methods, cfg.episodes, cfg.num_envs) == (("ddim:2", "step:2"), 9, 3)
    assert cfg.latency_only and not cfg.progress and cfg.out == "results/lift"  # derived from the task
    # With --checkpoint the folder is the checkpoint's: an image policy never overwrites the state results
    assert BenchConfig(task="pusht", checkpoint="checkpoints/pusht_image/").out == "results/pusht_image"
    assert BenchConfig(task="pusht", checkpoint="checkpoints/pusht_image", out="results/x").out == "results/x"
    with pytest.raises(ValueError, match="--num-envs must be at least 1"):
        BenchConfig(num_envs=0)

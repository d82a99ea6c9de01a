import json
import shutil

from agents.cli import main


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_policy_smoke_and_resume(tiny_dataset, tiny_checkpoint, tmp_path):
    for name in ("config.json", "model.safetensors", "training_state.safetensors", "training_state.json", "loss.jsonl"):
        assert (tiny_checkpoint / name).exists(), name
    assert read_jsonl(tiny_checkpoint / "loss.jsonl")[-1]["step"] == 6
    # resume: a copy of the finished 6-step run continued to 8 steps through the CLI
    out = tmp_path / "resumed"
    shutil.copytree(tiny_checkpoint, out, ignore=shutil.ignore_patterns("predictor"))
    rc = main(["train-policy", "--dataset", str(tiny_dataset), "--out", str(out), "--preset", "tiny", "--steps", "8",
               "--batch-size", "8", "--warmup-steps", "1", "--eval-every", "0"])
    assert rc == 0
    steps = [r["step"] for r in read_jsonl(out / "loss.jsonl")]
    assert steps[-1] == 8 and steps == sorted(steps)
    assert json.loads((out / "config.json").read_text())["train_step"] == 8


def test_train_policy_periodic_rollout(tiny_dataset, tmp_path):
    from agents.training import TrainPolicyConfig, train_policy

    out = tmp_path / "ck"
    result = train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=2, batch_size=4,
                                            warmup_steps=1, eval_every=2, eval_episodes=1, eval_max_steps=10,
                                            eval_method="ddim:2", progress=False))
    assert result["eval"]["episodes"] == 1
    assert read_jsonl(out / "eval.jsonl")[0]["step"] == 2


def test_train_predictor_smoke_with_ablation(tiny_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "pred"
    rc = main(["train-predictor", "--policy", str(tiny_checkpoint), "--dataset", str(tiny_dataset), "--out", str(out),
               "--steps", "3", "--batch-size", "8"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    metrics = config["metrics"]
    for name in ("predictor", "temporal_only", "spatial_only", "predictor_no_history"):
        assert set(metrics[name]) == {"mse", "mare"}
    assert config["parameters"] < 1_000_000
    assert (out / "predictor.safetensors").exists()


def test_export_halves_weights_and_keeps_the_predictor_link(tiny_checkpoint, tmp_path):
    import torch

    from agents.checkpoint import export_checkpoint, load_policy, load_predictor
    from agents.cli import main

    out = tmp_path / "release"
    report = export_checkpoint(tiny_checkpoint, out)
    assert report["predictor"] and not (out / "training_state.safetensors").exists()
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tiny_checkpoint / "model.safetensors").stat().st_size
    original, _ = load_policy(tiny_checkpoint)
    exported, config = load_policy(out)
    assert config["weights_dtype"] == "float16"
    load_predictor(out / "predictor", exported)  # the fingerprint (normaliser stats) survived the export
    for (name, a), b in zip(original.state_dict().items(), exported.state_dict().values()):
        assert b.dtype == a.dtype  # agents still run in float32
        torch.testing.assert_close(b, a, rtol=2e-3, atol=1e-4, msg=name)
    # A second export into the same folder is refused unless asked for.
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--overwrite"]) == 0

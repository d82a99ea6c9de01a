import json
import shutil

import pytest

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


def test_extra_datasets_are_trained_on_together(tiny_dataset, tmp_path):
    import torch

    from agents.backbone import PRESETS
    from agents.training import FrameData, WindowBank, concat_frames, load_frames

    data = load_frames(tiny_dataset, progress=False)
    both = concat_frames([data, data], ["a", "b"])
    n, episodes = len(data.episode), data.num_episodes
    assert both.num_episodes == 2 * episodes and len(both.episode) == 2 * n
    # the second copy's windows stay inside its own episodes, shifted by n frames
    assert torch.equal(both.start[n:], data.start + n) and torch.equal(both.end[n:], data.end + n)
    assert len(WindowBank.for_policy(both, PRESETS["tiny"])) == 2 * len(WindowBank.for_policy(data, PRESETS["tiny"]))
    other = FrameData(data.state[:, :1], data.action, data.env_state, {}, data.episode, data.start, data.end)
    with pytest.raises(ValueError, match="does not match"):
        concat_frames([data, other], ["a", "b"])
    rc = main(["train-policy", "--dataset", str(tiny_dataset), "--extra-datasets", str(tiny_dataset),
               "--out", str(tmp_path / "ck"), "--preset", "tiny", "--steps", "2", "--batch-size", "8",
               "--warmup-steps", "1", "--eval-every", "0"])
    assert rc == 0
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["train_step"] == 2


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
    # Re-exporting the backbone keeps the release's side folders (a streaming fine-tune, distilled students),
    # but not unrelated ones.
    (out / "cp").mkdir()
    (out / "cp" / "marker").write_text("student")
    (out / "scratch").mkdir()
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert (out / "cp" / "marker").read_text() == "student" and not (out / "scratch").exists()
    assert export_checkpoint(tiny_checkpoint, out, overwrite=True)["kept"] == ["cp"]


# ------------------------------------------------------------------ fast path: precision, threads, exact resume
def _tiny_backbone_and_batch(tiny_dataset, batch=32):
    import torch

    from agents.backbone import PRESETS, Backbone
    from agents.training import WindowBank, fit_normalizer, load_frames

    data = load_frames(tiny_dataset)
    backbone = Backbone(PRESETS["tiny"], data.features())
    fit_normalizer(backbone, data)
    bank = WindowBank.for_policy(data, backbone.cfg)

    return backbone, bank.batch(torch.arange(batch) % len(bank))


def test_bf16_loss_agrees_with_fp32_on_the_same_batch(tiny_dataset):
    import torch

    from agents.training import policy_step_loss

    backbone, (obs, action, pad) = _tiny_backbone_and_batch(tiny_dataset)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(7)  # the same noise and timesteps for both
        losses[precision] = policy_step_loss(backbone, obs, action, pad, precision)
    assert losses["bf16"].dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (~0.4 % per operation); the mean over the batch stays within 3 %.
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=0.03, atol=1e-3)
    assert losses["bf16"].item() != losses["fp32"].item()  # it really ran in bf16


def test_short_bf16_run_learns(tiny_dataset, tmp_path):
    from agents.training import TrainPolicyConfig, train_policy

    out = tmp_path / "bf16"
    train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=120, batch_size=32,
                                   lr=3e-3, warmup_steps=5, log_every=10, save_every=120, eval_every=0, threads=1,
                                   precision="bf16", progress=False))
    losses = [r["loss"] for r in read_jsonl(out / "loss.jsonl")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert json.loads((out / "training_state.json").read_text())["precision"] in ("bf16", "fp32")


def test_bf16_resume_continues_the_same_run_exactly(tiny_dataset, tmp_path):
    """A run stopped at step 4 and resumed to 8 equals the uninterrupted run: weights, EMA, lr, log."""
    from safetensors.torch import load_file

    from agents.training import TrainPolicyConfig, train_policy

    def config(out, **kw):
        return TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=8, batch_size=8,
                                 warmup_steps=2, log_every=2, save_every=100, eval_every=0, threads=1,
                                 precision="bf16", progress=False, **kw)

    train_policy(config(tmp_path / "whole"))
    train_policy(config(tmp_path / "split", stop_at=4))
    state = json.loads((tmp_path / "split" / "training_state.json").read_text())
    assert state["step"] == 4
    train_policy(config(tmp_path / "split"))
    whole = load_file(str(tmp_path / "whole" / "training_state.safetensors"))
    split = load_file(str(tmp_path / "split" / "training_state.safetensors"))
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch_equal(whole[name], split[name]), name  # model, optimizer moments, EMA, both RNGs
    meta = {k: json.loads((tmp_path / d / "training_state.json").read_text()) for k, d in (("w", "whole"), ("s", "split"))}
    assert meta["w"]["lr_schedule"] == meta["s"]["lr_schedule"] and meta["w"]["ema_step"] == meta["s"]["ema_step"] == 8
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "split" / "loss.jsonl")) == strip(read_jsonl(tmp_path / "whole" / "loss.jsonl"))


def test_resume_of_an_older_save_whose_log_window_holds_bare_losses(tiny_dataset, tmp_path):
    """Saves before TrainingRun kept the log window as floats; such a run resumes with the same loss records."""
    from agents.training import TrainPolicyConfig, train_policy

    def config(out, **kw):
        return TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=6, batch_size=8,
                                 warmup_steps=2, log_every=2, save_every=100, eval_every=0, threads=1,
                                 progress=False, **kw)

    train_policy(config(tmp_path / "whole"))
    train_policy(config(tmp_path / "split", stop_at=3))  # saved mid-record: one loss in the window
    state_path = tmp_path / "split" / "training_state.json"
    state = json.loads(state_path.read_text())
    assert len(state["log_window"]) == 1
    state["log_window"] = [w["loss"] for w in state["log_window"]]
    state_path.write_text(json.dumps(state))
    train_policy(config(tmp_path / "split"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "split" / "loss.jsonl")) == strip(read_jsonl(tmp_path / "whole" / "loss.jsonl"))


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def test_resume_drops_log_records_of_lost_steps(tiny_dataset, tmp_path):
    """A kill between saves leaves loss records past the saved step; the resumed run must not log them twice."""
    from agents.training import TrainPolicyConfig, train_policy

    out = tmp_path / "killed"
    cfg = TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), preset="tiny", steps=8, batch_size=8,
                            warmup_steps=2, log_every=2, save_every=100, eval_every=0, threads=1, progress=False)
    cfg.stop_at = 4
    train_policy(cfg)
    with (out / "loss.jsonl").open("a") as f:  # what steps 5-6 of the killed run had written
        f.write(json.dumps({"step": 6, "loss": 123.0, "lr": 0.0, "seconds": 1.0}) + "\n")
    cfg.stop_at = None
    train_policy(cfg)
    rows = read_jsonl(out / "loss.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and 123.0 not in [r["loss"] for r in rows]
    assert rows[-1]["seconds"] >= rows[1]["seconds"]  # the timer continues instead of restarting


def test_train_bench_rows_and_outputs(tmp_path):
    from agents.cli import main

    out = tmp_path / "tb.json"
    assert main(["train-bench", "--task", "pusht", "--preset", "tiny", "--precisions", "fp32,bf16", "--threads", "1",
                 "--batch-sizes", "8", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"task", "obs_type", "preset", "rows"} <= set(result) and result["preset"] == "tiny"
    settings = {(r["precision"], r["threads"], r["batch_size"]) for r in result["rows"]}
    assert {("fp32", 1, 8), ("bf16", 1, 8), ("fp32", 1, 64)} <= settings  # the grid plus the baseline row
    assert sum(r["baseline"] for r in result["rows"]) == 1
    for r in result["rows"]:
        assert r["samples_per_s"] > 0 and r["step_ms"] > 0
        assert r["channels_last"] is False  # no image encoder: nothing to lay out
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert main(["train-bench", "--task", "pusht", "--precisions", "fp16", "--steps", "1"]) == 2


def test_precision_and_threads_are_checked():
    from agents.compute import resolve_precision, resolve_threads

    assert resolve_precision("fp32", has_images=True) == "fp32"
    assert resolve_precision("auto", has_images=False) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", has_images=False)
    assert resolve_threads(0) >= 1 and resolve_threads(1) == 1
    with pytest.raises(ValueError):
        resolve_threads(-1)


def test_channels_last_is_auto_on_or_off_and_auto_follows_amx_and_bf16(monkeypatch):
    import agents.compute as compute
    from agents.training import TrainPolicyConfig

    for amx in (True, False):
        monkeypatch.setattr(compute, "cpu_has_amx", lambda amx=amx: amx)
        assert compute.resolve_channels_last("auto", "bf16") is amx
        assert compute.resolve_channels_last("auto", "fp32") is False
        assert compute.resolve_channels_last("auto", "bf16", device_type="cuda") is False
        assert compute.resolve_channels_last("on", "fp32") is True and compute.resolve_channels_last("off", "bf16") is False
    assert compute.resolve_channels_last(True, "fp32") is True  # a YAML boolean means on / off
    with pytest.raises(ValueError, match="channels_last"):
        compute.resolve_channels_last("nhwc", "bf16")
    assert TrainPolicyConfig(dataset="d", out="o", channels_last=True).channels_last == "on"
    assert TrainPolicyConfig(dataset="d", out="o", channels_last=False).channels_last == "off"
    with pytest.raises(ValueError, match="--channels-last"):
        TrainPolicyConfig(dataset="d", out="o", channels_last="sometimes")


def test_training_device_is_chosen_with_a_clear_error():
    import torch

    from agents.compute import resolve_device, resolve_precision

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
            resolve_device("cuda")
    # on a GPU, bf16 autocast for image encoders (auto) and where asked; fp32 for the 1-D U-Net of state tasks
    assert resolve_precision("auto", has_images=True, device_type="cuda") == "bf16"
    assert resolve_precision("auto", has_images=False, device_type="cuda") == "fp32"
    assert resolve_precision("fp32", has_images=True, device_type="cuda") == "fp32"


def test_gpu_train_script_trains_exports_and_reads_a_raw_cache_on_the_cpu(tmp_path, monkeypatch):
    """scripts/gpu_train.py (the lent-GPU recipe) end to end on the CPU: raw/ cache in, a float16 release with its
    predictor out, which load_policy / load_predictor accept."""
    import runpy
    import sys

    import numpy as np
    from conftest import scripted_episodes

    from agents.checkpoint import load_policy, load_predictor

    episodes, env = scripted_episodes(num_episodes=3, steps=30)
    env.close()
    (tmp_path / "data" / "raw").mkdir(parents=True)
    for seed, episode in enumerate(episodes):
        np.savez_compressed(tmp_path / "data" / "raw" / f"seed_{100_000 + seed:07d}.npz", **episode)
    release = tmp_path / "release"
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--dataset", str(tmp_path / "data"), "--task", "pusht",
                                      "--preset", "tiny", "--batch-size", "16", "--budget-s", "1",
                                      "--predictor-steps", "5", "--no-predictor-ablation",
                                      "--work", str(tmp_path / "work"), "--export", str(release), "--device", "cpu"])
    runpy.run_path("scripts/gpu_train.py", run_name="__main__")
    backbone, config = load_policy(release, task="pusht")
    assert config["train_step"] == 100 and config["weights_dtype"] == "float16"  # the probe's floor of 100 steps
    load_predictor(release / "predictor", backbone)
    metrics = json.loads((release / "predictor" / "config.json").read_text())["metrics"]
    assert "predictor" in metrics and "temporal_only" in metrics and "spatial_only" not in metrics

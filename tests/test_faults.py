"""Fault injection (issue 12): bad inputs, kills and concurrent runs never lose or mislabel data.

Every case of the issue, run the way a user meets it (mostly through ``agents.cli.main``). Kills are exact,
never timed: ``STEP_FAULT=<point>:<n>`` (``step_envs.safe_io.fault_point``) SIGKILLs a process the n-th time it
reaches a named point. The fast in-process variants make that point raise instead, which leaves the same
files on disk; the ``slow`` test kills real ``step train-policy`` subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.checkpoint import load_policy
from agents.cli import main
from agents.training import TrainPolicyConfig, train_policy
from step_envs import safe_io
from step_envs.collect import CollectConfig, collect
from step_envs.dataset import load_dataset, resolve_root
from step_envs.registry import make_env

REPO = Path(__file__).resolve().parents[1]
SEED = 100_200  # demonstration seeds of these tests (step_envs/seeds.py)


# ------------------------------------------------------------------ helpers
def one_line_error(capsys, command: str) -> str:
    """The CLI's error line; fails on a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"step {command}: error: "), err
    return last


def litter(folder: Path) -> list[str]:
    """What an interrupted transactional write could leave: staged files, commit records, swap copies, locks."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".new-" in p.name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ import-robomimic
BAD_HDF5 = {
    "not_hdf5.hdf5": "cannot be read as HDF5",
    "truncated.hdf5": "cannot be read as HDF5",
    "no_actions.hdf5": "has no 'actions'",
    "broken_third_demo.hdf5": "demo_10/actions has shape",
}


@pytest.fixture(scope="module")
def hdf5_files(tmp_path_factory):
    import h5py
    from test_robomimic import write_robomimic_hdf5

    folder = tmp_path_factory.mktemp("hdf5")
    write_robomimic_hdf5(folder / "good.hdf5")
    shutil.copy(folder / "good.hdf5", folder / "broken_third_demo.hdf5")
    with h5py.File(folder / "broken_third_demo.hdf5", "a") as f:  # the first two demos import, the third fails
        del f["data/demo_10/actions"]
        f["data/demo_10"].create_dataset("actions", data=np.zeros((6, 3)))
    shutil.copy(folder / "good.hdf5", folder / "no_actions.hdf5")
    with h5py.File(folder / "no_actions.hdf5", "a") as f:
        for name in list(f["data"]):
            del f[f"data/{name}/actions"]
    (folder / "not_hdf5.hdf5").write_text("this is not an HDF5 file\n")
    data = (folder / "good.hdf5").read_bytes()
    (folder / "truncated.hdf5").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def good_import(hdf5_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("import") / "lift"
    assert main(["import-robomimic", "--hdf5", str(hdf5_files / "good.hdf5"), "--out", str(out)]) == 0
    return out


def test_overwrite_import_survives_a_bad_input(hdf5_files, good_import, tmp_path, capsys):
    out = tmp_path / "lift"
    shutil.copytree(good_import, out)
    before = snapshot(out)
    for name, message in {**BAD_HDF5, "typo.hdf5": "No RoboMimic dataset"}.items():
        rc = main(["import-robomimic", "--hdf5", str(hdf5_files / name), "--out", str(out), "--overwrite"])
        line = one_line_error(capsys, "import-robomimic")
        assert rc == 2 and message in line and name in line, line
        assert snapshot(out) == before, name  # the old import, byte for byte
        assert litter(out) == [] and litter(tmp_path) == []
    assert load_dataset(out).num_episodes == 3


@pytest.mark.parametrize("name", sorted(BAD_HDF5))
def test_bad_hdf5_is_one_line_and_leaves_nothing_to_load(hdf5_files, tmp_path, capsys, name):
    out = tmp_path / "lift"
    assert main(["import-robomimic", "--hdf5", str(hdf5_files / name), "--out", str(out)]) == 2
    line = one_line_error(capsys, "import-robomimic")
    assert BAD_HDF5[name] in line and str(hdf5_files / name) in line, line
    assert not (out / "lerobot").exists() and litter(tmp_path) == []
    if name == "broken_third_demo.hdf5":  # no partial two-demo import blocks the rerun with a fixed file
        assert main(["import-robomimic", "--hdf5", str(hdf5_files / "good.hdf5"), "--out", str(out)]) == 0
        assert load_dataset(out).num_episodes == 3


# ------------------------------------------------------------------ collect
def collect_config(out: Path, **kw) -> CollectConfig:
    values = dict(task="pusht", agent="random", obs_type="state", out=str(out), workers=1, seed_start=SEED,
                  min_max_reward=0.0, episodes=1, max_seeds=10)
    return CollectConfig(**{**values, **kw})


def fake_collect_folder(out: Path, episodes: dict[int, tuple[float, int, bool]]) -> None:
    """A collect folder whose raw cache holds seed -> (best reward, length, frames stored?)."""
    raw = out / "raw"
    raw.mkdir(parents=True)
    (out / "collect_config.json").write_text(json.dumps(asdict(collect_config(out))))
    for seed, (max_reward, length, frames) in episodes.items():
        summary = {"seed": seed, "success": False, "max_reward": max_reward, "length": length, "seconds": 0.1,
                   "kept": frames}
        if not frames:
            (raw / f"seed_{seed:07d}.json").write_text(json.dumps(summary))
            continue
        rng = np.random.default_rng(seed)
        arrays = {"observation.state": rng.uniform(0, 512, (length, 2)), "action": rng.uniform(0, 512, (length, 2)),
                  "observation.environment_state": rng.uniform(0, 512, (length, 16))}
        with open(raw / f"seed_{seed:07d}.npz", "wb") as f:
            np.savez_compressed(f, summary=json.dumps(summary), **{k: v.astype(np.float32) for k, v in arrays.items()})


def test_collect_into_another_tasks_folder_changes_nothing(tmp_path, capsys):
    out = tmp_path / "pusht"
    fake_collect_folder(out, {SEED: (0.5, 7, True)})
    (out / "lerobot").mkdir()
    (out / "lerobot" / "data.parquet").write_text("the Push-T dataset")
    before = snapshot(out)
    for extra in (["--task", "lift"], ["--task", "pusht", "--obs-type", "pixels"],
                  ["--task", "pusht", "--agent", "expert"]):
        argv = ["collect", "--agent", "random", "--obs-type", "state", "--episodes", "1", "--out", str(out)] + extra
        assert main(argv) == 2
        assert "holds 'pusht' episodes" in one_line_error(capsys, "collect")
        assert snapshot(out) == before and litter(tmp_path) == []


def test_changed_threshold_never_reuses_old_decisions(tmp_path):
    out = tmp_path / "demos"
    # Kept by an earlier run at threshold 0: best rewards 0.6, 0.05, 0.3.
    fake_collect_folder(out, {SEED: (0.6, 7, True), SEED + 1: (0.05, 8, True), SEED + 2: (0.3, 9, True)})
    report = collect(collect_config(out, episodes=2, min_max_reward=0.25, max_seeds=3), progress=False)
    assert report["episodes_in_dataset"] == 2 and report["frames"] == 7 + 9  # seed + 1 is dropped now
    assert report["seeds_tried"] == 3 and report["min_max_reward"] == 0.25
    with pytest.raises(RuntimeError, match=r"Only 1 episodes reach --min-max-reward 0.5 in 3 seeds"):
        collect(collect_config(out, episodes=2, min_max_reward=0.5, max_seeds=3), progress=False)
    assert load_dataset(out).num_episodes == 2 and litter(out) == []  # the refused run left the dataset as it was
    assert json.loads((out / "collect_config.json").read_text())["min_max_reward"] == 0.25  # and its settings


def test_collect_dataset_is_the_first_good_seeds_and_reruns_dropped_frames(tmp_path):
    """A stopped run left seed+0, a later finisher seed+3 and seed+1 rejected (without frames) under an older,
    stricter threshold; seed+2 never finished. Asked for 3 episodes at threshold 0, collect must run seed+1 and
    seed+2 for real and build the dataset from seeds +0, +1, +2, whatever finished first."""
    out = tmp_path / "demos"
    fake_collect_folder(out, {SEED: (0.6, 7, True), SEED + 1: (0.3, 300, False), SEED + 3: (0.6, 5, True)})
    report = collect(collect_config(out, episodes=3), progress=False)
    raw = out / "raw"
    assert not (raw / f"seed_{SEED + 1:07d}.json").exists()  # replaced by the rerun's frames
    rerun = [np.load(raw / f"seed_{s:07d}.npz")["action"].shape[0] for s in (SEED + 1, SEED + 2)]
    assert report["frames"] == 7 + sum(rerun) and report["seeds_tried"] == 3  # seed+3's 5 frames are not in it
    assert (raw / f"seed_{SEED + 3:07d}.npz").exists()  # kept in the cache for a later, larger run


def test_unusable_raw_episode_leaves_the_previous_dataset(tmp_path, capsys):
    out = tmp_path / "demos"
    fake_collect_folder(out, {SEED: (0.6, 7, True), SEED + 1: (0.6, 8, True)})
    assert collect(collect_config(out, episodes=1), progress=False)["episodes_in_dataset"] == 1
    before = snapshot(out / "lerobot")
    with np.load(out / "raw" / f"seed_{SEED + 1:07d}.npz") as data:  # an episode of another obs_type
        summary = str(data["summary"])
    with open(out / "raw" / f"seed_{SEED + 1:07d}.npz", "wb") as f:
        np.savez_compressed(f, summary=summary, action=np.zeros((8, 2), np.float32))
    argv = ["collect", "--task", "pusht", "--agent", "random", "--obs-type", "state", "--episodes", "2",
            "--seed-start", str(SEED), "--min-max-reward", "0", "--out", str(out)]
    assert main(argv) == 2
    assert f"seed_{SEED + 1:07d}.npz is damaged" in one_line_error(capsys, "collect")
    assert snapshot(out / "lerobot") == before and litter(out) == []


# ------------------------------------------------------------------ locks
HOLD = """
import sys
from contextlib import ExitStack
from step_envs.safe_io import folder_lock
with ExitStack() as stack:
    for folder in sys.argv[1:]:
        stack.enter_context(folder_lock(folder, "test-holder"))
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lock_holder():
    procs = []

    def start(*folders) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, folders)], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"  # synchronised on its output, not on a delay
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_second_writer_is_refused_naming_the_holder(lock_holder, tiny_dataset, tiny_checkpoint, hdf5_files, tmp_path,
                                                    capsys):
    outs = {name: tmp_path / name for name in ("collect", "import", "policy", "predictor", "export")}
    holder = lock_holder(*outs.values())
    commands = {
        "collect": ["collect", "--task", "pusht", "--agent", "random", "--obs-type", "state", "--episodes", "1",
                    "--out", outs["collect"]],
        "import-robomimic": ["import-robomimic", "--hdf5", hdf5_files / "good.hdf5", "--out", outs["import"]],
        "train-policy": ["train-policy", "--dataset", tiny_dataset, "--out", outs["policy"], "--preset", "tiny",
                         "--steps", "2", "--eval-every", "0"],
        "train-predictor": ["train-predictor", "--policy", tiny_checkpoint, "--dataset", tiny_dataset,
                            "--out", outs["predictor"], "--steps", "2"],
        "export": ["export", "--checkpoint", tiny_checkpoint, "--out", outs["export"]],
    }
    for command, argv in commands.items():
        assert main([str(a) for a in argv]) == 2, command
        line = one_line_error(capsys, command)
        assert f"pid {holder.pid}" in line and "test-holder" in line, line
    assert not any(out.exists() for out in outs.values())  # refused before writing anything


def test_stale_lock_of_a_killed_run_is_taken_over(lock_holder, tmp_path):
    out = tmp_path / "run"
    holder = lock_holder(out)
    holder.kill()
    holder.wait()
    lock = safe_io.lock_path(out)
    assert json.loads(lock.read_text())["pid"] == holder.pid  # the kill left its lock file behind
    with safe_io.folder_lock(out, "test"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ------------------------------------------------------------------ one-line errors
@pytest.fixture(scope="module")
def broken_checkpoints(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    truncated, garbage = root / "truncated", root / "garbage"
    for folder in (truncated, garbage):
        shutil.copytree(tiny_checkpoint, folder)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (garbage / "config.json").write_text('{"format": "step-policy", oops')
    return {"truncated": truncated, "garbage": garbage}


CHECKPOINT_COMMANDS = {
    "bench": ["bench", "--task", "pusht", "--checkpoint", "{ckpt}", "--methods", "ddim:2", "--episodes", "1",
              "--max-steps", "2", "--out", "{tmp}/bench"],
    "eval": ["eval", "--task", "pusht", "--agent", "ddim:2", "--checkpoint", "{ckpt}", "--episodes", "1"],
    "latency": ["latency", "--task", "pusht", "--checkpoint", "{ckpt}", "--methods", "ddim:2", "--calls", "1"],
    "export": ["export", "--checkpoint", "{ckpt}", "--out", "{tmp}/release"],
}


@pytest.mark.parametrize("command", sorted(CHECKPOINT_COMMANDS))
@pytest.mark.parametrize("damage, message", [("truncated", "model.safetensors is not a readable safetensors file"),
                                             ("garbage", "config.json is not valid JSON")])
def test_damaged_checkpoint_is_one_line_naming_the_file(broken_checkpoints, tmp_path, capsys, command, damage, message):
    argv = [a.format(ckpt=broken_checkpoints[damage], tmp=tmp_path) for a in CHECKPOINT_COMMANDS[command]]
    assert main(argv) == 2
    line = one_line_error(capsys, command)
    assert message in line and str(broken_checkpoints[damage]) in line, line


def test_export_overwrite_keeps_the_old_release_when_the_source_is_broken(tiny_checkpoint, broken_checkpoints,
                                                                          tmp_path, capsys):
    dst = tmp_path / "release"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(dst)]) == 0
    before = snapshot(dst)
    assert main(["export", "--checkpoint", str(broken_checkpoints["truncated"]), "--out", str(dst), "--overwrite"]) == 2
    assert snapshot(dst) == before and litter(tmp_path) == []
    (dst / "stale.txt").write_text("left by hand")  # a good overwrite replaces the whole folder
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(dst), "--overwrite"]) == 0
    assert not (dst / "stale.txt").exists() and load_policy(dst)[1]["weights_dtype"] == "float16"


INVALID_NUMBERS = [
    (["train-policy", "--dataset", "{data}", "--out", "{out}", "--save-every", "0"], "--save-every"),
    (["train-policy", "--dataset", "{data}", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["train-policy", "--dataset", "{data}", "--out", "{out}", "--eval-every", "-1"], "--eval-every"),
    (["train-predictor", "--policy", "{ckpt}", "--dataset", "{data}", "--out", "{out}", "--val-fraction", "1.5"],
     "--val-fraction"),
    (["collect", "--task", "pusht", "--out", "{out}", "--workers", "0"], "--workers"),
    (["import-robomimic", "--hdf5", "{hdf5}", "--out", "{out}", "--max-episodes", "0"], "--max-episodes"),
    (["bench", "--task", "pusht", "--episodes", "0", "--out", "{out}"], "--episodes"),
    (["eval", "--task", "pusht", "--num-envs", "0", "--json", "{out}/eval.json"], "--num-envs"),
    (["latency", "--task", "pusht", "--warmup", "-1", "--json", "{out}/latency.json"], "--warmup"),
]


@pytest.mark.parametrize("argv, flag", INVALID_NUMBERS, ids=[f"{a[0]} {f}" for a, f in INVALID_NUMBERS])
def test_invalid_numbers_are_refused_before_any_work(tiny_dataset, tiny_checkpoint, hdf5_files, tmp_path, capsys,
                                                     argv, flag):
    out = tmp_path / "out"
    values = dict(data=tiny_dataset, out=out, ckpt=tiny_checkpoint, hdf5=hdf5_files / "good.hdf5")
    assert main([a.format(**values) for a in argv]) == 2
    assert flag in one_line_error(capsys, argv[0])
    assert not out.exists()


def test_unknown_env_kwargs_are_named(capsys):
    argv = ["eval", "--task", "pusht", "--agent", "random", "--episodes", "1", "--env-kwargs", '{"nosuch_option": 1}']
    assert main(argv) == 2
    line = one_line_error(capsys, "eval")
    assert "nosuch_option" in line and "image_size" in line, line  # what is wrong and what is accepted


def test_half_written_dataset_is_named_not_a_hub_error(tiny_dataset, tmp_path, capsys):
    half = tmp_path / "half"
    shutil.copytree(tiny_dataset, half)
    shutil.rmtree(half / "meta" / "episodes")  # what a writer killed before finalize() leaves
    argv = ["train-policy", "--dataset", str(half), "--out", str(tmp_path / "ckpt"), "--preset", "tiny", "--steps", "1",
            "--eval-every", "0"]
    assert main(argv) == 2
    line = one_line_error(capsys, "train-policy")
    assert "half-written" in line and str(half) in line and "offline" not in line, line


def test_garbage_yaml_config_is_named(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("steps: [1, 2\n")
    argv = ["train-policy", "--config", str(config), "--dataset", str(tiny_dataset), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"{config} is not valid YAML" in one_line_error(capsys, "train-policy")


def test_datasets_are_written_and_read_without_probing_torchcodec(monkeypatch, tmp_path):
    """LeRobot's torchcodec probe prints a page of FFmpeg loading tracebacks where FFmpeg is missing; every
    dataset this library writes or reads names its video backend (pyav), so the probe never runs."""
    import lerobot.datasets.lerobot_dataset as lerobot_dataset
    from conftest import scripted_episodes

    from step_envs.dataset import lerobot_features, write_dataset

    def probe():
        raise AssertionError("LeRobot probed torchcodec")

    monkeypatch.setattr(lerobot_dataset, "get_safe_default_video_backend", probe)
    episodes, env = scripted_episodes(num_episodes=1, steps=5)
    features = lerobot_features(env.observation_space, env.action_space, use_videos=False)
    env.close()
    write_dataset(tmp_path / "ds", fps=10, features=features, episodes=episodes, task_text="t", progress=False)
    assert len(load_dataset(tmp_path / "ds")) == 5


# ------------------------------------------------------------------ env contract
@pytest.mark.parametrize("action", [["100", "200"], np.array([True, False]), np.array([100 + 1j, 200 + 0j]),
                                    np.array([None, 1.0], dtype=object)],
                         ids=["strings", "bools", "complex", "objects"])
def test_non_numeric_actions_are_refused(action):
    env = make_env("pusht")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="this env expects real numbers"):
        env.step(action)
    env.step(np.array([100, 200]))  # integers are numbers
    env.close()


# ------------------------------------------------------------------ transactional file sets and folder swaps
COMMIT = """
import sys
from pathlib import Path
from step_envs.safe_io import commit_files
commit_files(Path(sys.argv[1]), {n: (lambda p, n=n: p.write_text("new " + n)) for n in ("a", "b", "c")})
"""


@pytest.mark.parametrize("point, survivor", [("commit-staged:1", "old"), ("commit-rename:1", "new"),
                                             ("commit-rename:2", "new")])
def test_a_killed_commit_leaves_one_whole_set(tmp_path, point, survivor):
    for name in "abc":
        (tmp_path / name).write_text("old " + name)
    proc = subprocess.run([sys.executable, "-c", COMMIT, str(tmp_path)], cwd=REPO,
                          env={**os.environ, safe_io.FAULT_ENV: point})
    assert proc.returncode == -signal.SIGKILL
    safe_io.finish_commits(tmp_path)  # what every reader does first
    safe_io.discard_staged(tmp_path)  # what the next writer does
    assert {n: (tmp_path / n).read_text() for n in "abc"} == {n: f"{survivor} {n}" for n in "abc"}
    assert litter(tmp_path) == []


SWAP = """
import sys
from pathlib import Path
from step_envs.safe_io import replacing_folder
with replacing_folder(Path(sys.argv[1])) as new:
    new.mkdir()
    (new / "data").write_text("new")
"""


def test_a_folder_swap_killed_half_way_is_rolled_back(tmp_path):
    final = tmp_path / "lerobot"
    final.mkdir()
    (final / "data").write_text("old")
    proc = subprocess.run([sys.executable, "-c", SWAP, str(final)], cwd=REPO,
                          env={**os.environ, safe_io.FAULT_ENV: "folder-swap:1"})
    assert proc.returncode == -signal.SIGKILL and not final.exists()  # between the two renames
    with pytest.raises(FileNotFoundError, match="killed half-way; the previous dataset is in"):
        resolve_root(tmp_path)  # a reader says what happened instead of "no dataset"
    safe_io.recover_folder(final)  # what the next writer does
    assert (final / "data").read_text() == "old" and litter(tmp_path) == []


# ------------------------------------------------------------------ training: killed, resumed, identical
TRAIN = dict(preset="tiny", steps=8, batch_size=8, warmup_steps=2, log_every=2, save_every=3, eval_every=0, threads=1,
             precision="fp32", progress=False)  # saves at steps 3, 6 and 8; each save renames 4 files


class SimulatedKill(BaseException):
    """Raised at a fault point in-process: nothing after it runs, as after SIGKILL (locks aside: see the slow test)."""


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    train_policy(TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), **TRAIN))
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    for name in ("model.safetensors", "training_state.safetensors"):
        got, want = load_file(str(run / name)), load_file(str(reference / name))
        assert got.keys() == want.keys(), name
        for key in want:  # weights, EMA, optimiser moments, every RNG
            assert torch.equal(got[key], want[key]), f"{name}: {key}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    rows = read_jsonl(run / "loss.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # each step once
    assert strip(rows) == strip(read_jsonl(reference / "loss.jsonl"))
    assert json.loads((run / "config.json").read_text())["train_step"] == 8
    assert litter(run) == [] and litter(run.parent) == []


@pytest.mark.parametrize("point, saved_step", [("train-step:5", 3), ("commit-staged:2", 3), ("commit-rename:5", 6)],
                         ids=["between-saves", "in-save-before-commit", "in-save-between-renames"])
def test_killed_training_resumes_to_the_same_weights(tiny_dataset, uninterrupted, tmp_path, monkeypatch, point,
                                                     saved_step):
    out = tmp_path / "run"
    cfg = TrainPolicyConfig(dataset=str(tiny_dataset), out=str(out), **TRAIN)

    def kill():
        raise SimulatedKill(point)

    monkeypatch.setenv(safe_io.FAULT_ENV, point)
    monkeypatch.setattr(safe_io, "_fault_counts", {})
    monkeypatch.setattr(safe_io, "_kill", kill)
    with pytest.raises(SimulatedKill):
        train_policy(cfg)
    monkeypatch.delenv(safe_io.FAULT_ENV)
    # A reader in between sees one whole save: never weights of one step under another step's config.
    _, config = load_policy(out)
    assert config["train_step"] == json.loads((out / "training_state.json").read_text())["step"] == saved_step
    train_policy(cfg)
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_sigkilled_training_subprocess_resumes_to_the_same_weights(tiny_dataset, uninterrupted, tmp_path):
    """Real SIGKILLs: after step 5 (between the saves of steps 3 and 6), then inside the resumed run's first save
    (step 6, after its weights were renamed into place but before its config), then a clean resume."""
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({k: v for k, v in TRAIN.items() if k != "progress"}))  # JSON is YAML
    argv = [sys.executable, "-m", "agents.cli", "train-policy", "--config", str(config), "--dataset", str(tiny_dataset),
            "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for point in ("train-step:5", "commit-rename:1"):
        proc = subprocess.Popen(argv, cwd=REPO, env={**env, safe_io.FAULT_ENV: point}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, stderr = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
        assert json.loads(safe_io.lock_path(out).read_text())["pid"] == proc.pid  # stale lock, taken over next
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from step 6" in proc.stdout
    assert_same_run(out, uninterrupted)

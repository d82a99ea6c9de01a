"""The LeRobot policy plugin (plugins/lerobot_policy_step): LeRobot's own `lerobot-eval` runs STEP on Push-T.

The committed Push-T checkpoint is exported with `step export --lerobot` and evaluated by `lerobot-eval` (a
subprocess, offline) on gym-pusht with `--env.obs_type=environment_state_agent_pos` (the pusher position and the
T's keypoints, which the state policy reads). The same episodes are run by this project's rollout loop on
`step/PushT-v0` (gym-pusht's physics and reset draw behind our contract), with everything aligned so that the
two runs are the same computation:
  * env seeds: lerobot-eval seeds episode i with `--seed` + i; `--eval.batch_size=1` resets the policy (and so
    the agent's noise generator, seeded 0) before each episode, as our rollout resets the agent;
  * episode length: `--env.episode_length` = our rollout's `max_steps`;
  * torch threads: 1 in both processes, so no float reduction order differs.
So each episode's success and max reward must be equal (max reward to float precision). Seeds 6 and 7 in 130
steps give one success (step 128) and one failure, so both outcomes are compared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gym_pusht")

import lerobot_policy_step  # noqa: E402,F401  (scripts/setup.sh installs it: pip install -e plugins/lerobot_policy_step)

import step_envs  # noqa: E402,F401  (registers the step/* ids)
from agents import make_agent  # noqa: E402
from step_envs.registry import make_env  # noqa: E402
from step_envs.rollout import rollout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "pusht"
METHOD = "step:2"
SEED = 6  # episodes on seeds 6 and 7
EPISODES = 2
EPISODE_STEPS = 130


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """`step export --lerobot` of the committed Push-T checkpoint."""
    from agents.commands.export import ExportConfig, export

    out = tmp_path_factory.mktemp("lerobot") / "pusht_step"
    report = export(ExportConfig(checkpoint=str(CHECKPOINT), out=str(out), lerobot=True, lerobot_method=METHOD))
    assert report["lerobot_type"] == "step" and report["predictor"]
    return out


def _lerobot_eval(policy_dir: Path, out: Path) -> dict:
    exe = shutil.which("lerobot-eval", path=str(Path(sys.executable).parent)) or shutil.which("lerobot-eval")
    assert exe, "lerobot-eval is not installed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(out / "hf_home"), HF_LEROBOT_HOME=str(out / "hf_lerobot"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [exe, f"--policy.path={policy_dir}", f"--policy.method={METHOD}", "--env.type=pusht",
           "--env.obs_type=environment_state_agent_pos", f"--env.episode_length={EPISODE_STEPS}",
           f"--eval.n_episodes={EPISODES}", "--eval.batch_size=1", f"--seed={SEED}", f"--output_dir={out / 'eval'}"]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"lerobot-eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((out / "eval" / "eval_info.json").read_text())


def _own_rollout() -> list:
    env = make_env("pusht", obs_type="state")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        agent = make_agent(METHOD, env, task="pusht", checkpoint=str(CHECKPOINT))
        return rollout(env, agent, seeds=range(SEED, SEED + EPISODES), max_steps=EPISODE_STEPS, progress=False)
    finally:
        torch.set_num_threads(threads)
        env.close()


def test_lerobot_eval_matches_own_rollout(exported, tmp_path):
    info = _lerobot_eval(exported, tmp_path)
    metrics = info["per_task"][0]["metrics"]
    ours = _own_rollout()
    assert metrics["successes"] == [r.success for r in ours]
    assert metrics["max_rewards"] == pytest.approx([r.max_reward for r in ours], abs=1e-9)
    assert info["overall"]["pc_success"] == pytest.approx(100.0 * sum(r.success for r in ours) / EPISODES)
    assert [r.success for r in ours] == [True, False]  # the seeds were chosen to compare both outcomes


# ----- the policy object, in-process (what lerobot-eval calls), on bad input -----

@pytest.fixture(scope="module")
def policy(exported):
    from lerobot_policy_step.modeling_step import StepPolicy

    return StepPolicy.from_pretrained(exported)


def _batch(rows: int = 1, state_dim: int = 2, env_dim: int = 16) -> dict:
    return {"observation.state": torch.full((rows, state_dim), 200.0),
            "observation.environment_state": torch.full((rows, env_dim), 250.0), "task": [""] * rows}


def test_select_action_and_chunk(policy):
    policy.reset()
    first = policy.select_action(_batch(rows=3))
    assert first.shape == (3, 2) and first.dtype == torch.float32
    assert ((first >= 0) & (first <= 512)).all()
    policy.reset()
    chunk = policy.predict_action_chunk(_batch(rows=3))
    assert chunk.shape == (3, 8, 2)
    torch.testing.assert_close(chunk[:, 0], first)  # same fresh episode, same seeded noise


@pytest.mark.parametrize("batch, message", [
    ({"observation.state": torch.zeros(1, 2)}, "environment_state_agent_pos"),  # LeRobot's default pusht obs
    (_batch(env_dim=10), "expects (batch, 16)"),                              # another task's layout
    ({**_batch(), "observation.state": torch.tensor([[float("nan"), 1.0]])}, "NaN"),
])
def test_bad_observations_are_refused(policy, batch, message):
    policy.reset()
    with pytest.raises(ValueError, match=re.escape(message)):
        policy.select_action(batch)


def test_config_fields_and_refusals(exported):
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot_policy_step.configuration_step import StepConfig
    from lerobot_policy_step.modeling_step import StepPolicy

    config = StepConfig.from_pretrained(exported, cli_overrides=["--method=ddim:4"])  # as --policy.method=ddim:4
    assert (config.type, config.method, config.task) == ("step", "ddim:4", "pusht")
    from draccus.utils import ParsingError

    with pytest.raises(ParsingError) as err:  # draccus wraps the config's ValueError; LeRobot shows both
        StepConfig.from_pretrained(exported, cli_overrides=["--method=falcon:2"])
    assert "diffusion methods" in str(err.value.__cause__)
    # a checkpoint for another task behind this config
    lift = ROOT / "checkpoints" / "lift"
    with pytest.raises(ValueError, match="task 'lift'"):
        StepPolicy(StepConfig.from_pretrained(exported, cli_overrides=[f"--checkpoint={lift}"]))
    # the env's features are not the checkpoint's (LeRobot's default pusht env: an image and the pusher only)
    config = StepConfig.from_pretrained(exported)
    config.pretrained_path = exported
    config.input_features = {"observation.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 384, 384)),
                             "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,))}
    with pytest.raises(ValueError, match="environment_state_agent_pos"):
        StepPolicy(config)

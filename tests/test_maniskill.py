"""step/StackCube-v0 (ManiSkill3 on the CPU through lavapipe): observation layout, Vulkan set-up and error, expert."""

import gymnasium as gym
import numpy as np
import pytest

import step_envs  # noqa: F401  (registers the ids)
from step_envs import maniskill

SKIP = maniskill.unavailable_reason()
needs_maniskill = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def test_vendored_lavapipe_only_when_unset(monkeypatch, tmp_path):
    icd = tmp_path / "lvp_icd.json"
    icd.write_text("{}")
    monkeypatch.setattr(maniskill, "LAVAPIPE_ICD", icd)
    monkeypatch.delenv("VK_ICD_FILENAMES", raising=False)
    monkeypatch.delenv("VK_DRIVER_FILES", raising=False)
    assert maniskill.use_vendored_lavapipe() == str(icd)
    monkeypatch.setenv("VK_ICD_FILENAMES", "/mine.json")
    assert maniskill.use_vendored_lavapipe() == "/mine.json"  # a user's choice is never overridden
    monkeypatch.delenv("VK_ICD_FILENAMES")
    monkeypatch.setattr(maniskill, "LAVAPIPE_ICD", tmp_path / "absent.json")
    assert maniskill.use_vendored_lavapipe() is None


def test_unavailable_reason_names_the_fix(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mani_skill" else real_find_spec(name))
    assert "pip install -e '.[maniskill]'" in maniskill.unavailable_reason()


@needs_maniskill
def test_no_vulkan_device_is_a_clear_error(monkeypatch):
    def no_device(*args, **kwargs):
        raise RuntimeError("vk::createInstanceUnique: ErrorIncompatibleDriver")

    monkeypatch.setattr(maniskill.gym, "make", no_device)
    with pytest.raises(RuntimeError, match=r"needs a Vulkan device.*fetch_lavapipe\.sh.*ErrorIncompatibleDriver"):
        maniskill.ManiSkillStackCubeEnv()


@needs_maniskill
def test_observation_layout():
    env = gym.make("step/StackCube-v0")
    obs, _ = env.reset(seed=3)
    sim = env.unwrapped.sim
    pos, state = obs["agent_pos"], obs["environment_state"]
    np.testing.assert_allclose(pos[:9], sim.agent.robot.get_qpos()[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(pos[9:12], sim.agent.tcp.pose.p[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(state[:3], sim.cubeA.pose.p[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(state[7:10], sim.cubeB.pose.p[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(state[20:23], state[7:10] - state[:3], atol=1e-6)  # A -> B
    # hold_action keeps the fingers where they are (open at reset).
    assert env.unwrapped.hold_action()[6] == pytest.approx(1.0, abs=1e-3)
    env.close()


@needs_maniskill
def test_expert_stacks_the_cube():
    from agents.experts import make_expert

    env = gym.make("step/StackCube-v0")
    expert = make_expert("stackcube", env)
    obs, _ = env.reset(seed=0)
    expert.reset()
    for _ in range(env.spec.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    assert info["is_success"] and terminated
    env.close()

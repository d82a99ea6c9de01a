"""The Gymnasium contract, checked for every registered simulator id (new envs are covered automatically)."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import step_envs
from step_envs.contract import OBS_TYPES, validate_observation

SIM_TASKS = [spec for spec in step_envs.TASKS.values() if not spec.real_hardware]
SIM_IDS = [spec.env_id for spec in SIM_TASKS]


def _skip_reason(spec) -> str | None:
    """An optional simulator that cannot run on this machine (ManiSkill without its extra or a Vulkan driver)."""
    if spec.entry_point.startswith("step_envs.maniskill:"):
        from step_envs.maniskill import unavailable_reason

        return unavailable_reason()
    return None


def _params(values) -> list:
    """One pytest.param per simulator id, skipped with the reason when the id cannot run here."""
    return [pytest.param(value, id=spec.env_id, marks=[pytest.mark.skip(reason=r)] if (r := _skip_reason(spec)) else [])
            for value, spec in zip(values, SIM_TASKS)]


SIM_ID_PARAMS = _params(SIM_IDS)
SIM_TASK_PARAMS = _params(SIM_TASKS)


@pytest.mark.parametrize("env_id", SIM_ID_PARAMS)
@pytest.mark.parametrize("obs_type", OBS_TYPES)
def test_check_env_and_keys(env_id, obs_type):
    env = gym.make(env_id, obs_type=obs_type, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert "agent_pos" in obs and obs["agent_pos"].dtype == np.float32
    assert ("environment_state" in obs) == (obs_type != "pixels")
    assert ("pixels" in obs) == (obs_type != "state")
    for image in obs.get("pixels", {}).values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert info["is_success"] is False
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert isinstance(info["is_success"], bool)
    assert env.observation_space.contains(obs)
    env.close()


# Held steps per episode: the registered horizon where it is short; at most this many otherwise (a full RoboMimic
# horizon costs up to a minute of CPU and tests gymnasium's TimeLimit, not the env). 120 is past every inner limit a
# wrapped simulator has of its own (ManiSkill's 50 steps; robosuite runs with ignore_done), which must not end it.
MAX_HELD_STEPS = 120


@pytest.mark.parametrize("spec", SIM_TASK_PARAMS)
def test_time_limit_and_render(spec):
    assert gym.spec(spec.env_id).max_episode_steps == spec.max_episode_steps
    horizon = min(spec.max_episode_steps, MAX_HELD_STEPS)
    env = gym.make(spec.env_id, render_mode="rgb_array", max_episode_steps=horizon)
    obs, _ = env.reset(seed=1)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3
    # Holding the robot where it starts never succeeds, so the TimeLimit must end the episode.
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        hold = env.unwrapped.hold_action()
        assert env.action_space.contains(hold)
        _, _, terminated, truncated, _ = env.step(hold)
        steps += 1
    assert truncated and not terminated and steps == horizon
    env.close()


@pytest.mark.parametrize("env_id", SIM_ID_PARAMS)
def test_same_seed_same_initial_state(env_id):
    a = gym.make(env_id)
    b = gym.make(env_id)
    oa, _ = a.reset(seed=123)
    ob, _ = b.reset(seed=123)
    oc, _ = b.reset(seed=124)
    a.close()
    b.close()  # an SO-101 env left open keeps its safety guard's signal handlers until it is collected
    np.testing.assert_array_equal(oa["environment_state"], ob["environment_state"])
    assert not np.array_equal(oa["environment_state"], oc["environment_state"])


def test_unknown_id_is_clear():
    with pytest.raises(gym.error.Error, match="NoSuchTask"):
        gym.make("step/NoSuchTask-v0")


def test_unknown_task_name_is_clear():
    with pytest.raises(ValueError, match=r"Unknown task 'nosuch'\. Known tasks: .*pusht"):
        step_envs.make_env("nosuch")


@pytest.mark.parametrize("env_id", SIM_ID_PARAMS)
def test_bad_obs_type(env_id):
    with pytest.raises(ValueError, match="Unknown obs_type 'rgb'"):
        gym.make(env_id, obs_type="rgb")


@pytest.mark.parametrize("env_id", SIM_ID_PARAMS)
@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda space: np.full(space.shape, np.nan), "NaN or inf"),
        (lambda space: space.high + 100.0, "outside the action space"),
        (lambda space: np.zeros(space.shape[0] + 1), "shape"),
    ],
    ids=["nan", "out_of_range", "wrong_shape"],
)
def test_bad_action_is_refused(env_id, make_bad, message):
    env = gym.make(env_id)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(make_bad(env.action_space))
    env.close()


def test_wrong_observation_is_refused():
    env = gym.make("step/PushT-v0")
    obs, _ = env.reset(seed=0)
    validate_observation(obs, env.observation_space)
    bad = dict(obs, environment_state=obs["environment_state"][:10])
    with pytest.raises(ValueError, match="'environment_state' has shape"):
        validate_observation(bad, env.observation_space)
    nan = dict(obs, agent_pos=np.array([np.nan, 1.0], np.float32))
    with pytest.raises(ValueError, match="NaN"):
        validate_observation(nan, env.observation_space)
    with pytest.raises(ValueError, match="missing 'agent_pos'"):
        validate_observation({"environment_state": obs["environment_state"]}, env.observation_space)

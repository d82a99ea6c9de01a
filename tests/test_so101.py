"""SO-101: the MuJoCo twin, its expert, the safety guard (fault injection), and the real-arm path through
LeRobot's SO101Follower on a fake Feetech serial port (no arm needed)."""

from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest
from fake_feetech import FakeServoChain, patch_cameras, patch_feetech, write_calibration_file

import step_envs
from agents.experts import make_expert
from hardware.safety import SafetyConfig, SafetyGuard, UnsafeActionError
from hardware.so101_env import ArmNotFoundError, CalibrationMissingError, SO101Env
from hardware.so101_twin import HOME_DEG, MOTOR_KEYS, SO101Twin

PICK_SIM = "step/SO101-PickPlace-Sim-v0"
STACK_SIM = "step/SO101-StackCube-Sim-v0"
PICK_REAL = "step/SO101-PickPlace-v0"
FAKE_PORT = "fake://so101"


# ----------------------------------------------------------------------------------------- twin
def test_registry_flags_real_ids():
    specs = {s.env_id: s for s in step_envs.TASKS.values()}
    assert specs[PICK_REAL].real_hardware and specs["step/SO101-StackCube-v0"].real_hardware
    assert not specs[PICK_SIM].real_hardware and not specs[STACK_SIM].real_hardware
    assert specs[PICK_SIM].fps == 30 and specs[PICK_SIM].max_episode_steps == 450


def test_units_round_trip():
    twin = SO101Twin()
    deg = np.array([10.0, -20.0, 30.0, -40.0, 50.0, 25.0])
    np.testing.assert_allclose(twin.rad_to_deg(twin.deg_to_rad(deg)), deg, atol=1e-9)
    np.testing.assert_allclose(twin.deg_to_rad(deg)[:5], np.deg2rad(deg[:5]))  # body joints: 1 deg = 1 deg
    low, high = twin.joint_limits_deg()
    assert low[-1] == pytest.approx(0.0) and high[-1] == pytest.approx(100.0)  # gripper 0..100


def _rollout(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    out = [obs["agent_pos"].copy()]
    for action in actions:
        obs, *_ = env.step(action)
        out.append(np.concatenate([obs["agent_pos"], obs["environment_state"]]))
    return out


def test_twin_reset_and_step_are_deterministic():
    a, b = gym.make(PICK_SIM), gym.make(PICK_SIM)
    rng = np.random.default_rng(0)
    space = a.action_space
    actions = [np.clip(HOME_DEG + rng.uniform(-8, 8, 6), space.low, space.high).astype(np.float32) for _ in range(15)]
    for x, y in zip(_rollout(a, actions, seed=3), _rollout(b, actions, seed=3)):
        np.testing.assert_array_equal(x, y)
    a.close(), b.close()


def test_dead_band_stalls_small_moves():
    """Goals that creep by less than the dead band never move the servo: the paper's execution deadlock."""
    results = {}
    for band in (0.0, 1.0):
        env = SO101Env(task="pickplace", dead_band_deg=band, safety={"max_relative_target": None})
        obs, _ = env.reset(seed=0)
        start = obs["agent_pos"].copy()
        for _ in range(30):  # closed loop: always ask for 0.5 deg more than where the joint is
            action = env.hold_action()
            action[0] += 0.5
            obs, *_ = env.step(action)
        results[band] = obs["agent_pos"][0] - start[0]
        env.close()
    assert abs(results[1.0]) < 0.2  # stalled
    assert results[0.0] > 5.0  # without the dead band the same policy moves the joint steadily
    # A move larger than the band is accepted at once.
    env = SO101Env(task="pickplace", dead_band_deg=1.0)
    env.reset(seed=0)
    action = env.hold_action()
    action[0] += 3.0
    for _ in range(10):
        obs, *_ = env.step(action)
    assert obs["agent_pos"][0] == pytest.approx(action[0], abs=1.0)
    env.close()


def test_servo_stiction_stalls_small_moves_around_the_present_position():
    """LeRobot's P=16 servo with gearbox stiction (servo="lerobot"): a goal within about a degree of where
    the joint *is* (not only of the previous goal) never breaks it away; the MJCF's servo follows it."""
    moved = {}
    for servo in ("mjcf", "lerobot"):
        env = SO101Env(task="pickplace", dead_band_deg=0.0, servo=servo, safety={"max_relative_target": None})
        obs, _ = env.reset(seed=0)
        start = obs["agent_pos"].copy()
        for _ in range(30):  # closed loop: always ask for 0.5 deg more than where the joint is
            action = env.hold_action()
            action[1] += 0.5  # shoulder_lift, the joint that carries the arm's weight
            obs, *_ = env.step(action)
        moved[servo] = obs["agent_pos"][1] - start[1]
        if servo == "lerobot":  # a move well beyond the band breaks the joint away at once
            action = env.hold_action()
            action[1] += 4.0
            for _ in range(15):
                obs, *_ = env.step(action)
            assert obs["agent_pos"][1] - action[1] == pytest.approx(0.0, abs=1.5)
            twin = env.twin
            assert twin.stiction and twin.model.actuator_gainprm[twin._actuators[1], 0] == pytest.approx(8.9)
        env.close()
    assert abs(moved["lerobot"]) < 0.05  # stalled: less than one servo tick (0.088 deg)
    assert moved["mjcf"] > 5.0


def test_servo_settings_presets_and_errors():
    from hardware.so101_twin import servo_settings

    assert servo_settings("lerobot")["servo_kp"] == 8.9
    assert servo_settings({"preset": "lerobot", "static_friction": 0.3})["static_friction"] == 0.3
    assert servo_settings({"static_friction": 0.2})["servo_kp"] is None  # from the MJCF preset
    with pytest.raises(ValueError, match="preset"):
        servo_settings("bogus")
    with pytest.raises(ValueError, match="Unknown servo fields"):
        servo_settings({"kp": 3})
    with pytest.raises(ValueError):
        SO101Env(task="pickplace", servo={"static_friction": -1.0})


def test_twin_obs_types_and_images():
    env = gym.make(STACK_SIM, obs_type="pixels_state")
    obs, info = env.reset(seed=0)
    assert obs["agent_pos"].shape == (6,) and obs["environment_state"].shape == (14,)
    assert obs["pixels"]["top"].shape == (96, 96, 3) and obs["pixels"]["top"].dtype == np.uint8
    assert obs["pixels"]["top"].std() > 5  # a rendered scene, not a blank frame
    assert env.render().shape == (256, 256, 3)
    env.close()


@pytest.mark.parametrize("task", ["so101-pickplace-sim", "so101-stackcube-sim"])
def test_expert_succeeds(task):
    env = step_envs.make_env(task, obs_type="state")
    expert = make_expert(task, env)
    obs, _ = env.reset(seed=0)
    expert.reset()
    success = False
    for _ in range(env.spec.max_episode_steps):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        success |= info["is_success"]
        if terminated or truncated:
            break
    env.close()
    assert success and terminated and reward == 1.0


def test_no_expert_for_the_real_arm():
    with pytest.raises(ValueError, match="real arm"):
        make_expert("so101-pickplace", env=object())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["so101-pickplace-sim", "so101-stackcube-sim"])
def test_expert_success_rate(task):
    env = step_envs.make_env(task, obs_type="state")
    expert = make_expert(task, env)
    from step_envs.rollout import rollout, summarize

    summary = summarize(rollout(env, expert, range(10), progress=False))
    env.close()
    assert summary["success_rate"] >= 0.9


# ----------------------------------------------------------------------------------------- guard on the twin
def test_guard_refuses_nan_and_sends_nothing():
    env = SO101Env(task="pickplace")
    env.reset(seed=0)
    sent_before = len(env.twin.actions_sent)
    bad = env.hold_action()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        env.step(bad)
    assert len(env.twin.actions_sent) == sent_before
    with pytest.raises(UnsafeActionError, match="non-finite"):  # the guard alone refuses it too
        env.guard.send(np.array([np.inf] * 6), env.hold_action())
    env.close()


def test_guard_limits_and_max_relative_target():
    guard = SafetyGuard(SO101Twin(), SafetyConfig(max_relative_target=5.0, joint_high=(20.0,) * 5 + (100.0,)),
                        MOTOR_KEYS, low=np.full(6, -100.0), high=np.full(6, 100.0))
    present = np.zeros(6)
    goal = guard.check(np.array([50.0, -50.0, 3.0, 0.0, 0.0, 90.0]), present)
    np.testing.assert_allclose(goal, [5.0, -5.0, 3.0, 0.0, 0.0, 5.0])  # at most 5 units per step
    present = np.full(6, 18.0)
    assert guard.check(np.full(6, 30.0), present)[0] == 20.0  # joint limit wins over the relative cap
    with pytest.raises(ValueError, match="low <= high"):
        SafetyGuard(SO101Twin(), SafetyConfig(joint_low=(1.0,) * 6, joint_high=(0.0,) * 6), MOTOR_KEYS,
                    np.zeros(6), np.ones(6))


def test_env_step_caps_each_move():
    env = SO101Env(task="pickplace", safety={"max_relative_target": 4.0})
    obs, _ = env.reset(seed=0)
    action = env.hold_action()
    action[1] += 30.0
    _, _, _, _, info = env.step(action)
    assert info["sent_action"][1] == pytest.approx(obs["agent_pos"][1] + 4.0, abs=0.1)
    env.close()


class _Boom(RuntimeError):
    pass


def test_exception_mid_episode_releases_torque():
    env = SO101Env(task="pickplace")
    twin = env.twin
    with pytest.raises(_Boom):
        with env:
            env.reset(seed=0)
            for t in range(5):
                env.step(env.hold_action())
                if t == 2:
                    raise _Boom("agent crashed")
    assert env.guard.released and not twin.is_connected and not twin.torque_enabled
    with pytest.raises(ConnectionError, match="released"):  # nothing more reaches the servos
        env.guard.send(HOME_DEG, HOME_DEG)
    env.close()  # idempotent


def test_keyboard_interrupt_releases_torque():
    env = SO101Env(task="pickplace")
    with pytest.raises(KeyboardInterrupt):
        with env:
            env.reset(seed=0)
            env.step(env.hold_action())
            raise KeyboardInterrupt
    assert env.guard.released and not env.twin.torque_enabled


def test_sigterm_releases_torque():
    import gc

    # An env another test left open (unreachable, not yet collected) would restore ITS saved handler when the
    # collector finalises it mid-test; collect first so that only this env's guard touches SIGTERM here.
    gc.collect()
    previous = signal.getsignal(signal.SIGTERM)  # before the env: its guard installs its handler when it connects
    env = SO101Env(task="pickplace")
    with pytest.raises(SystemExit):
        with env:
            env.reset(seed=0)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler raises here
    assert env.guard.released and not env.twin.torque_enabled
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored


def test_slow_agent_gets_held():
    """Deadline: while a slow agent thinks, the guard sends the hold action and drops the late action."""
    env = SO101Env(task="pickplace", safety={"deadline_s": 0.05})
    obs, _ = env.reset(seed=0)
    sent = len(env.twin.actions_sent)
    time.sleep(0.3)  # the agent is late
    assert len(env.twin.actions_sent) == sent + 1  # the watchdog held the arm meanwhile
    held = env.twin.actions_sent[-1]
    np.testing.assert_allclose([held[k] for k in MOTOR_KEYS], obs["agent_pos"], atol=0.2)
    late = env.hold_action()
    late[0] += 8.0
    obs2, _, _, _, info = env.step(late)
    assert info["deadline_missed"] and env.guard.deadline_misses == 1
    assert obs2["agent_pos"][0] == pytest.approx(obs["agent_pos"][0], abs=0.5)  # late action was not executed
    _, _, _, _, info = env.step(late)  # a prompt action is executed normally
    assert not info["deadline_missed"]
    env.close()


# ----------------------------------------------------------------------------------------- real path, fake bus
@pytest.fixture
def fake_arm(monkeypatch, tmp_path):
    chain = FakeServoChain()
    patch_feetech(monkeypatch, {FAKE_PORT: chain})
    cameras = patch_cameras(monkeypatch)
    write_calibration_file(tmp_path, "step_so101")
    return chain, cameras, tmp_path


def test_real_path_through_lerobot(fake_arm):
    chain, cameras, calibration_dir = fake_arm
    env = gym.make(PICK_REAL, obs_type="pixels", port=FAKE_PORT, camera=0, calibration_dir=str(calibration_dir))
    assert chain.open and chain.any_torque()
    obs, info = env.reset(seed=0)
    np.testing.assert_allclose(obs["agent_pos"], HOME_DEG, atol=2.0)  # reset drove the arm home, capped moves
    assert obs["pixels"]["top"].shape == (96, 96, 3) and info["is_success"] is False
    writes = chain.goal_writes
    action = env.unwrapped.hold_action()
    action[0] += 25.0
    obs, reward, terminated, truncated, info = env.step(action)
    assert chain.goal_writes == writes + 1
    assert obs["agent_pos"][0] == pytest.approx(HOME_DEG[0] + 10.0, abs=2.0)  # max_relative_target 10 deg
    assert not info["is_success"] and not terminated and reward == 0.0
    env.close()
    assert not chain.open and not chain.any_torque() and not cameras["top"].is_connected


def test_real_path_exception_releases(fake_arm):
    chain, _, calibration_dir = fake_arm
    with pytest.raises(_Boom):
        with gym.make(PICK_REAL, obs_type="pixels", port=FAKE_PORT, camera=0,
                      calibration_dir=str(calibration_dir)) as env:
            env.reset(seed=0)
            env.step(env.unwrapped.hold_action())
            raise _Boom("crash")
    assert not chain.open and not chain.any_torque()


def test_real_path_success_fn_and_deadline(fake_arm):
    chain, _, calibration_dir = fake_arm
    env = SO101Env(task="pickplace", robot="real", obs_type="pixels", port=FAKE_PORT, camera=0,
                   calibration_dir=str(calibration_dir), success_fn=lambda obs: True,
                   safety={"deadline_s": 0.05})
    env.reset(seed=0)
    writes = chain.goal_writes
    time.sleep(0.3)
    assert chain.goal_writes == writes + 1  # held by the watchdog
    _, reward, terminated, _, info = env.step(env.hold_action())
    assert info["deadline_missed"] and info["is_success"] and terminated and reward == 1.0
    env.close()
    assert not chain.any_torque()


def test_real_state_obs_is_refused(fake_arm):
    _, _, calibration_dir = fake_arm
    with pytest.raises(ValueError, match="does not have"):
        gym.make(PICK_REAL, obs_type="state", port=FAKE_PORT, camera=0, calibration_dir=str(calibration_dir))
    with pytest.raises(ValueError, match="needs camera"):
        gym.make(PICK_REAL, obs_type="pixels", port=FAKE_PORT, calibration_dir=str(calibration_dir))


def test_missing_calibration_is_clear(fake_arm, tmp_path):
    with pytest.raises(CalibrationMissingError, match="lerobot-calibrate"):
        gym.make(PICK_REAL, obs_type="pixels", port=FAKE_PORT, camera=0, calibration_dir=str(tmp_path / "none"))


def test_unplugged_arm_is_clear(fake_arm):
    _, _, calibration_dir = fake_arm
    with pytest.raises(ArmNotFoundError, match="plugged in"):  # no such device file
        gym.make(PICK_REAL, obs_type="pixels", port="/dev/ttyACM_not_here", camera=0)
    with pytest.raises(ArmNotFoundError, match="did not answer"):  # LeRobot cannot open the port
        gym.make(PICK_REAL, obs_type="pixels", port="fake://unplugged", camera=0, calibration_dir=str(calibration_dir))


# ----------------------------------------------------------------------------------------- step record
def test_record_expert_on_twin(tmp_path):
    from agents.cli import main
    from step_envs.dataset import load_dataset

    out = tmp_path / "rec"
    assert main(["record", "--task", "so101-pickplace-sim", "--obs-type", "state", "--episodes", "1",
                 "--out", str(out), "--seed-start", "0"]) == 0
    dataset = load_dataset(out)
    assert dataset.num_episodes == 1 and dataset.fps == 30
    assert tuple(dataset[0]["action"].shape) == (6,) and tuple(dataset[0]["observation.state"].shape) == (6,)


def test_record_teleop_on_fake_arms(monkeypatch, tmp_path):
    """Leader arm -> follower arm, both on fake Feetech buses, through LeRobot's SO101Leader/Follower."""
    from agents.commands.record import RecordConfig, record

    follower, leader = FakeServoChain(), FakeServoChain()
    patch_feetech(monkeypatch, {FAKE_PORT: follower, "fake://leader": leader})
    patch_cameras(monkeypatch)
    write_calibration_file(tmp_path / "cal", "step_so101")
    write_calibration_file(tmp_path / "cal", "step_so101_leader")
    report = record(RecordConfig(task="so101-pickplace", out=str(tmp_path / "rec"), episodes=1, episode_seconds=0.2,
                                 port=FAKE_PORT, camera="0", calibration_dir=str(tmp_path / "cal"),
                                 teleop_port="fake://leader", teleop_calibration_dir=str(tmp_path / "cal")),
                    progress=False)
    assert report["episodes_in_dataset"] == 1 and report["frames"] == 6
    assert not follower.open and not follower.any_torque() and not leader.open

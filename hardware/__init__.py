"""The SO-ARM101: one Gymnasium env for the real arm (LeRobot ``SO101Follower``) and its MuJoCo twin,
the safety guard between any agent and the motors, and the twin's scripted experts.

Heavy imports (MuJoCo, LeRobot) happen in the submodules, so ``import hardware`` stays cheap.
"""

# LeRobot calibration ids (file names <calibration_dir>/<id>.json) of the follower and the leader arm, defined once
# for the env (hardware/so101_env.py), `step record` and the leader-arm agent (agents/leader_arm.py).
DEFAULT_ROBOT_ID = "step_so101"
DEFAULT_LEADER_ID = "step_so101_leader"

"""The SO-ARM101: one Gymnasium env for the real arm (LeRobot ``SO101Follower``) and its MuJoCo twin,
the safety guard between any agent and the motors, and the twin's scripted experts.

Heavy imports (MuJoCo, LeRobot) happen in the submodules, so ``import hardware`` stays cheap.
"""

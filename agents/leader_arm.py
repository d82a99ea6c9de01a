"""A LeRobot SO-101 leader arm as an agent (teleoperation for ``step record``).

``act`` returns the leader's joint positions in LeRobot units (the follower's action space); ``close`` disconnects.
Like every agent it has ``reset()`` / ``act(obs)`` and is built by ``make_agent("leader", env, port=...)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hardware import DEFAULT_LEADER_ID


class LeaderArm:
    def __init__(self, port: str, robot_id: str = DEFAULT_LEADER_ID, calibration_dir: str | None = None,
                 motor_keys=None):
        from lerobot.teleoperators.so_leader import SO101Leader, SO101LeaderConfig

        from hardware.so101_env import ArmNotFoundError

        if motor_keys is None:
            from hardware.so101_twin import MOTOR_KEYS as motor_keys
        if port.startswith("/dev/") and not Path(port).exists():
            raise ArmNotFoundError(f"No serial port {port!r} for the leader arm; find it with `lerobot-find-port`.")
        config = SO101LeaderConfig(port=port, id=robot_id,
                                   calibration_dir=Path(calibration_dir) if calibration_dir else None)
        self.leader = SO101Leader(config)
        if not self.leader.calibration_fpath.is_file():
            raise RuntimeError(f"No leader calibration {self.leader.calibration_fpath}: run lerobot-calibrate "
                               f"--teleop.type=so101_leader --teleop.port={port} --teleop.id={robot_id}")
        self.motor_keys = tuple(motor_keys)
        try:
            self.leader.connect(calibrate=False)
        except ConnectionError as err:
            raise ArmNotFoundError(f"The leader arm on {port!r} did not answer: {err}") from err

    def reset(self) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        positions = self.leader.get_action()
        return np.array([positions[k] for k in self.motor_keys], dtype=np.float32)

    def close(self) -> None:
        if self.leader.is_connected:
            self.leader.disconnect()

"""A fake Feetech serial port and servo chain at LeRobot's boundary, for tests and dry runs without an arm.

LeRobot's ``FeetechMotorsBus`` talks to the motors through four classes of the Feetech SDK
(``scservo_sdk``): ``PortHandler``, ``PacketHandler``, ``GroupSyncRead`` and ``GroupSyncWrite``.
``patch_feetech(monkeypatch, chains)`` replaces exactly those with fakes that read and write a
register file per servo, so the real ``SO101Follower`` and ``FeetechMotorsBus`` code (handshake,
calibration check, configuration, degree normalisation, torque off on disconnect) runs unchanged.

Ports are names registered in ``chains`` (e.g. ``"fake://so101"``); any other name behaves like an
unplugged arm (the port cannot be opened). The servos reach their goal at once when torque is on.
``FakeCamera`` stands in for LeRobot's OpenCV camera (``patch_cameras``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SO101_MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")
STS3215_MODEL_NUMBER = 777
COMM_SUCCESS, COMM_TX_FAIL, COMM_RX_TIMEOUT = 0, -2, -6
# Control table addresses (LeRobot's lerobot/motors/feetech/tables.py, STS/SMS series).
ADDR_MODEL_NUMBER = 3
ADDR_FIRMWARE_MAJOR, ADDR_FIRMWARE_MINOR = 0, 1
ADDR_MIN_LIMIT, ADDR_MAX_LIMIT, ADDR_HOMING_OFFSET = 9, 11, 31
ADDR_TORQUE_ENABLE, ADDR_GOAL_POSITION, ADDR_PRESENT_POSITION = 40, 42, 56


def fake_calibration() -> dict[str, dict]:
    """A plausible calibration (raw ticks) for the six SO-101 servos, as LeRobot stores it."""
    calibration = {}
    for i, name in enumerate(SO101_MOTORS, start=1):
        low, high = (2000, 3400) if name == "gripper" else (500, 3595)
        calibration[name] = {"id": i, "drive_mode": 0, "homing_offset": 0, "range_min": low, "range_max": high}
    return calibration


def write_calibration_file(calibration_dir: str | Path, robot_id: str) -> Path:
    """The JSON file ``lerobot-calibrate`` would write for ``robot_id``."""
    path = Path(calibration_dir) / f"{robot_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fake_calibration(), indent=4))
    return path


class FakeServoChain:
    """Register files of the six STS3215 servos daisy-chained on one port."""

    def __init__(self, calibration: dict[str, dict] | None = None):
        calibration = calibration or fake_calibration()
        self.registers: dict[int, bytearray] = {}
        for cal in calibration.values():
            regs = bytearray(128)
            self.registers[cal["id"]] = regs
            self._put(regs, ADDR_MODEL_NUMBER, 2, STS3215_MODEL_NUMBER)
            self._put(regs, ADDR_FIRMWARE_MAJOR, 1, 3)
            self._put(regs, ADDR_FIRMWARE_MINOR, 1, 10)
            self._put(regs, ADDR_MIN_LIMIT, 2, cal["range_min"])
            self._put(regs, ADDR_MAX_LIMIT, 2, cal["range_max"])
            self._put(regs, ADDR_HOMING_OFFSET, 2, cal["homing_offset"])
            middle = (cal["range_min"] + cal["range_max"]) // 2
            self._put(regs, ADDR_PRESENT_POSITION, 2, middle)
            self._put(regs, ADDR_GOAL_POSITION, 2, middle)
        self.open = False
        self.goal_writes = 0  # sync writes of Goal_Position (what reached the motors)

    @staticmethod
    def _put(regs: bytearray, addr: int, length: int, value: int) -> None:
        regs[addr : addr + length] = int(value).to_bytes(length, "little", signed=False)

    def read(self, motor_id: int, addr: int, length: int) -> int:
        return int.from_bytes(self.registers[motor_id][addr : addr + length], "little")

    def write(self, motor_id: int, addr: int, length: int, data: list[int]) -> None:
        regs = self.registers[motor_id]
        regs[addr : addr + length] = bytes(data[:length])
        if addr == ADDR_GOAL_POSITION and self.torque(motor_id):
            regs[ADDR_PRESENT_POSITION : ADDR_PRESENT_POSITION + 2] = regs[addr : addr + 2]

    def torque(self, motor_id: int) -> bool:
        return bool(self.registers[motor_id][ADDR_TORQUE_ENABLE])

    def any_torque(self) -> bool:
        return any(self.torque(i) for i in self.registers)


def patch_feetech(monkeypatch, chains: dict[str, FakeServoChain]) -> None:
    """Swap the Feetech SDK classes LeRobot uses for fakes backed by ``chains`` (port name -> servos)."""
    import scservo_sdk
    import serial

    class FakePortHandler:
        def __init__(self, port_name: str):
            self.port_name = port_name
            self.is_open = False
            self.is_using = False
            self.baudrate = 1_000_000

        @property
        def chain(self) -> FakeServoChain:
            return chains[self.port_name]

        def openPort(self):  # noqa: N802 - the SDK's names
            if self.port_name not in chains:
                raise serial.SerialException(f"[Errno 2] could not open port {self.port_name}: No such file")
            self.is_open = self.chain.open = True
            return True

        def closePort(self):  # noqa: N802
            self.is_open = False
            if self.port_name in chains:
                self.chain.open = False

        def clearPort(self):  # noqa: N802
            pass

        def setPacketTimeoutMillis(self, msec):  # noqa: N802
            pass

        def setPacketTimeout(self, packet_length):  # noqa: N802
            pass

        def getBaudRate(self):  # noqa: N802
            return self.baudrate

        def setBaudRate(self, baudrate):  # noqa: N802
            self.baudrate = baudrate
            return True

    class FakePacketHandler:
        def __init__(self, protocol_version: int = 0):
            self.protocol_version = protocol_version

        def _chain(self, port):
            return port.chain if port.is_open else None

        def ping(self, port, motor_id):
            chain = self._chain(port)
            if chain is None or motor_id not in chain.registers:
                return 0, COMM_RX_TIMEOUT, 0
            return chain.read(motor_id, ADDR_MODEL_NUMBER, 2), COMM_SUCCESS, 0

        def _read(self, port, motor_id, addr, length):
            chain = self._chain(port)
            if chain is None or motor_id not in chain.registers:
                return 0, COMM_RX_TIMEOUT, 0
            return chain.read(motor_id, addr, length), COMM_SUCCESS, 0

        def read1ByteTxRx(self, port, motor_id, addr):  # noqa: N802
            return self._read(port, motor_id, addr, 1)

        def read2ByteTxRx(self, port, motor_id, addr):  # noqa: N802
            return self._read(port, motor_id, addr, 2)

        def read4ByteTxRx(self, port, motor_id, addr):  # noqa: N802
            return self._read(port, motor_id, addr, 4)

        def writeTxRx(self, port, motor_id, addr, length, data):  # noqa: N802
            chain = self._chain(port)
            if chain is None or motor_id not in chain.registers:
                return COMM_RX_TIMEOUT, 0
            chain.write(motor_id, addr, length, list(data))
            return COMM_SUCCESS, 0

        def getTxRxResult(self, result):  # noqa: N802
            return {COMM_SUCCESS: "[TxRxResult] Communication success!",
                    COMM_RX_TIMEOUT: "[TxRxResult] There is no status packet!"}.get(result, f"[TxRxResult] {result}")

        def getRxPacketError(self, error):  # noqa: N802
            return f"[RxPacketError] {error}"

    class FakeGroupSyncRead:
        def __init__(self, port, ph, start_address, data_length):
            self.port, self.start_address, self.data_length = port, start_address, data_length
            self.ids: list[int] = []

        def clearParam(self):  # noqa: N802
            self.ids = []

        def addParam(self, motor_id):  # noqa: N802
            self.ids.append(motor_id)
            return True

        def txRxPacket(self):  # noqa: N802
            if not self.port.is_open or any(i not in self.port.chain.registers for i in self.ids):
                return COMM_RX_TIMEOUT
            return COMM_SUCCESS

        def getData(self, motor_id, address, data_length):  # noqa: N802
            return self.port.chain.read(motor_id, address, data_length)

    class FakeGroupSyncWrite:
        def __init__(self, port, ph, start_address, data_length):
            self.port, self.start_address, self.data_length = port, start_address, data_length
            self.params: dict[int, list[int]] = {}

        def clearParam(self):  # noqa: N802
            self.params = {}

        def addParam(self, motor_id, data):  # noqa: N802
            self.params[motor_id] = list(data)
            return True

        def txPacket(self):  # noqa: N802
            if not self.port.is_open:
                return COMM_TX_FAIL
            chain = self.port.chain
            for motor_id, data in self.params.items():
                chain.write(motor_id, self.start_address, self.data_length, data)
            if self.start_address == ADDR_GOAL_POSITION:
                chain.goal_writes += 1
            return COMM_SUCCESS

    monkeypatch.setattr(scservo_sdk, "PortHandler", FakePortHandler)
    monkeypatch.setattr(scservo_sdk, "PacketHandler", FakePacketHandler)
    monkeypatch.setattr(scservo_sdk, "GroupSyncRead", FakeGroupSyncRead)
    monkeypatch.setattr(scservo_sdk, "GroupSyncWrite", FakeGroupSyncWrite)


class FakeCamera:
    """Stands in for LeRobot's ``OpenCVCamera``: a connect/read_latest/disconnect camera of fixed size."""

    def __init__(self, height: int = 480, width: int = 640):
        self.height, self.width = height, width
        self.is_connected = False
        self.frames = 0

    def connect(self, warmup: bool = True) -> None:
        self.is_connected = True

    def read_latest(self, max_age_ms: int = 500) -> np.ndarray:
        if not self.is_connected:
            raise RuntimeError("FakeCamera is not connected.")
        self.frames += 1
        return np.full((self.height, self.width, 3), self.frames % 255, dtype=np.uint8)

    def disconnect(self) -> None:
        self.is_connected = False


def patch_cameras(monkeypatch) -> dict[str, FakeCamera]:
    """Make ``SO101Follower`` build ``FakeCamera``s from its camera configs; returns them by name."""
    import lerobot.robots.so_follower.so_follower as so_follower

    made: dict[str, FakeCamera] = {}

    def make(configs):
        for name, cfg in configs.items():
            made[name] = FakeCamera(cfg.height or 480, cfg.width or 640)
        return dict(made)

    monkeypatch.setattr(so_follower, "make_cameras_from_configs", make)
    return made

"""The safety guard between any agent and the SO-101, the same code for the MuJoCo twin and the real arm.

What it enforces on every command (LeRobot units: degrees, gripper 0..100):
  * NaN / inf goals are refused (``UnsafeActionError``); nothing is sent, the servos keep their goal.
  * Goals are clipped to per-joint limits.
  * A goal may move at most ``max_relative_target`` away from the present position per step (the same
    rule as LeRobot's ``SOFollowerConfig.max_relative_target``, applied here from the observation the
    env already has, so no extra bus read per step).
  * Inference deadline: after each observation a watchdog starts; if no action arrives within
    ``deadline_s`` it sends the hold action (the present position) so the arm stops where it is, and
    the late action is dropped by default (it was computed from a stale observation).
  * Release on every exit path: ``release()`` disables torque and closes the port (``disconnect``, with
    a fallback to the bus and cameras directly when LeRobot's own disconnect refuses). It runs from
    ``__exit__`` (exceptions, Ctrl-C = KeyboardInterrupt), from ``close()``, from an ``atexit`` hook
    (normal interpreter exit without close) and, when installed from the main thread, SIGTERM/SIGHUP
    are turned into ``SystemExit`` so the same ``finally`` blocks run. A second Ctrl-C during the
    release is deferred until the release is done.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

logger = logging.getLogger(__name__)


class UnsafeActionError(ValueError):
    """An action the guard refuses to send (NaN, inf, wrong shape)."""


class RobotLike(Protocol):
    """The part of LeRobot's ``Robot`` API the env and guard use (SO101Follower and the twin have it)."""

    @property
    def is_connected(self) -> bool: ...

    def connect(self, calibrate: bool = ...) -> None: ...

    def get_observation(self) -> dict[str, Any]: ...

    def send_action(self, action: dict[str, float]) -> dict[str, float]: ...

    def disconnect(self) -> None: ...


@dataclass(frozen=True)
class SafetyConfig:
    # Per-joint limits in LeRobot units; None = the env's action space (the MJCF joint ranges).
    joint_low: tuple[float, ...] | None = None
    joint_high: tuple[float, ...] | None = None
    # Largest move of a goal away from the present position in one step (LeRobot units); None = off.
    max_relative_target: float | None = 10.0
    # Seconds an agent may take to answer an observation before the arm is held; None = no deadline.
    deadline_s: float | None = None
    execute_late_actions: bool = False  # False: a late action is replaced by the hold action
    handle_signals: bool = True  # SIGTERM / SIGHUP -> SystemExit while connected (main thread only)

    def __post_init__(self):
        if self.max_relative_target is not None and not self.max_relative_target > 0:
            raise ValueError(f"max_relative_target must be > 0 or None, got {self.max_relative_target}.")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {self.deadline_s}.")


def safety_config(value: SafetyConfig | dict | None, **defaults) -> SafetyConfig:
    """Accept a SafetyConfig, a dict of its fields (gym.make kwargs), or None (``defaults``)."""
    if isinstance(value, SafetyConfig):
        return value
    fields = dict(defaults)
    fields.update(value or {})
    return SafetyConfig(**fields)


class SafetyGuard:
    """Owns the robot connection: ``with SafetyGuard(robot, cfg, keys, low, high) as guard: ...``."""

    def __init__(
        self,
        robot: RobotLike,
        config: SafetyConfig,
        motor_keys: Sequence[str],
        low: np.ndarray,
        high: np.ndarray,
    ):
        self.robot = robot
        self.config = config
        self.motor_keys = tuple(motor_keys)
        n = len(self.motor_keys)
        self.low = np.asarray(config.joint_low if config.joint_low is not None else low, dtype=np.float64)
        self.high = np.asarray(config.joint_high if config.joint_high is not None else high, dtype=np.float64)
        if self.low.shape != (n,) or self.high.shape != (n,) or np.any(self.low > self.high):
            raise ValueError(f"Joint limits must be {n} values each with low <= high; got {self.low}, {self.high}.")
        self._lock = threading.RLock()  # robot I/O from the env thread and the deadline watchdog
        self._timer: threading.Timer | None = None
        self._hold: np.ndarray | None = None
        self._deadline_fired = False
        self._released = True
        self._old_handlers: dict[int, Any] = {}
        self.deadline_misses = 0
        self.events: list[str] = []  # what the guard did, for logs and tests

    # ------------------------------------------------------------------------- connection lifetime
    def connect(self, connect_fn: Callable[[], None] | None = None) -> None:
        """Connect the robot (``connect_fn`` or ``robot.connect()``); release again if that fails."""
        self._released = False
        atexit.register(self.release)
        self._install_signal_handlers()
        try:
            if connect_fn is not None:
                connect_fn()
            elif not self.robot.is_connected:
                self.robot.connect()
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "SafetyGuard":
        if self._released:
            self.connect()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()

    def release(self) -> None:
        """Torque off and port closed; safe to call any number of times, from any exit path."""
        if self._released:
            return
        with _deferred_sigint():
            with self._lock:
                if self._released:
                    return
                self._released = True
                self._cancel_timer()
                _release_robot(self.robot, self.events)
            self._restore_signal_handlers()
            atexit.unregister(self.release)

    @property
    def released(self) -> bool:
        return self._released

    # ------------------------------------------------------------------------- commands
    def check(self, action: np.ndarray, present: np.ndarray) -> np.ndarray:
        """The goal the guard allows for ``action`` given the ``present`` joint positions."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (len(self.motor_keys),):
            raise UnsafeActionError(f"Action has shape {action.shape}; the arm expects ({len(self.motor_keys)},).")
        if not np.all(np.isfinite(action)):
            raise UnsafeActionError(f"Refusing a non-finite action (NaN/inf): {action.tolist()}")
        goal = np.clip(action, self.low, self.high)
        limit = self.config.max_relative_target
        if limit is not None:
            present = np.asarray(present, dtype=np.float64)
            goal = present + np.clip(goal - present, -limit, limit)
            goal = np.clip(goal, self.low, self.high)
        return goal

    def send(self, action: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Check ``action`` and send it; returns the goal the robot reports it received."""
        goal = self.check(action, present)
        with self._lock:
            if self._released:
                raise ConnectionError("The arm has been released (torque off, port closed); reset a new env.")
            sent = self.robot.send_action(dict(zip(self.motor_keys, goal.tolist())))
        return np.array([sent.get(k, g) for k, g in zip(self.motor_keys, goal)], dtype=np.float64)

    # ------------------------------------------------------------------------- inference deadline
    def arm_deadline(self, hold: np.ndarray) -> None:
        """Start the watchdog for the agent's next action; ``hold`` is sent if it is late."""
        if self.config.deadline_s is None:
            return
        with self._lock:
            self._cancel_timer()
            self._hold = np.asarray(hold, dtype=np.float64)
            self._deadline_fired = False
            self._timer = threading.Timer(self.config.deadline_s, self._on_deadline)
            self._timer.daemon = True
            self._timer.start()

    def disarm_deadline(self) -> bool:
        """Stop the watchdog; True when the deadline had passed (the arm was held meanwhile)."""
        if self.config.deadline_s is None:
            return False
        with self._lock:
            self._cancel_timer()
            missed = self._deadline_fired
            self._deadline_fired = False
        if missed:
            self.deadline_misses += 1
        return missed

    def _on_deadline(self) -> None:
        with self._lock:
            if self._released or self._hold is None or self._timer is None:
                return
            self._deadline_fired = True
            self._timer = None
            try:
                self.robot.send_action(dict(zip(self.motor_keys, self._hold.tolist())))
                self.events.append("deadline: hold sent")
            except Exception as err:  # the watchdog thread must never die silently
                self.events.append(f"deadline: hold failed: {err!r}")
                logger.error("Inference deadline passed and the hold command failed: %r", err)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if not self.config.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is None or signum in self._old_handlers:
                continue
            self._old_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, _raise_system_exit)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._old_handlers.clear()


def _raise_system_exit(signum, frame) -> None:
    # Turning the signal into an exception lets every `finally` / `__exit__` release the arm.
    raise SystemExit(128 + signum)


class _deferred_sigint:
    """Hold back Ctrl-C while the arm is being released, then deliver it."""

    def __enter__(self):
        self.pending = False
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame):
        self.pending = True

    def __exit__(self, exc_type, exc, tb):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            if self.pending and exc_type is None:
                raise KeyboardInterrupt
        return False


def _release_robot(robot: Any, events: list[str]) -> None:
    """``robot.disconnect()`` (torque off, port closed), else the bus and cameras one by one."""
    try:
        if getattr(robot, "is_connected", True):
            robot.disconnect()
            events.append("released: disconnect")
            return
    except Exception as err:
        events.append(f"release: disconnect failed: {err!r}")
        logger.error("Robot disconnect failed (%r); releasing the bus directly.", err)
    # LeRobot's disconnect refuses when any part (e.g. a camera) is already gone: do it piecewise.
    bus = getattr(robot, "bus", None)
    if bus is not None and getattr(bus, "is_connected", False):
        try:
            bus.disable_torque(num_retry=5)
            events.append("released: torque disabled on the bus")
        except Exception as err:
            events.append(f"release: disable_torque failed: {err!r}")
            logger.error("Could not disable torque: %r", err)
        try:
            bus.port_handler.closePort()
            events.append("released: port closed")
        except Exception as err:
            events.append(f"release: closePort failed: {err!r}")
    for camera in getattr(robot, "cameras", {}).values():
        try:
            if camera.is_connected:
                camera.disconnect()
        except Exception as err:
            events.append(f"release: camera disconnect failed: {err!r}")

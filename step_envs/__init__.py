"""Gymnasium side of STEP: every task behind one interface, registered in the ``step`` namespace.

Importing this package registers the ids; ``gym.make("step/PushT-v0", obs_type="state")``.
"""

from step_envs.registry import TASKS, TaskSpec, make_env, register_all, task_for_env_id

register_all()

__all__ = ["TASKS", "TaskSpec", "make_env", "register_all", "task_for_env_id"]

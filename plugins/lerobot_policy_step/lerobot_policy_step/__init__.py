"""STEP as a LeRobot policy type (``"type": "step"``), discovered by LeRobot's scripts through this distribution's name.

LeRobot 0.6.1 imports every installed distribution named ``lerobot_policy_*`` at start-up
(``register_third_party_plugins``); importing this package registers ``StepConfig`` under ``step``. LeRobot then
finds the rest by its naming convention, from the config class's module: ``modeling_step.StepPolicy`` and
``processor_step.make_step_pre_post_processors``.

A folder LeRobot loads with ``--policy.path=DIR`` is written by ``step export --lerobot`` (``export.py``): a
LeRobot ``config.json`` (``"type": "step"``), the two processor pipelines and this project's checkpoint in
``DIR/checkpoint``. The policy runs this project's agent (``agents.make_agent``) on it; see ``modeling_step``.
"""

from lerobot_policy_step.configuration_step import StepConfig

__all__ = ["StepConfig"]

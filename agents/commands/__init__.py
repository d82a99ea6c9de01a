"""The ``step`` sub-commands, one module each with ``add_arguments(parser)`` and ``run(args)`` (see ``agents/cli.py``).

Every command's flags come from its config dataclass (``agents.config_files.add_config_arguments``): a field is
a flag, ``--config FILE`` a YAML file of fields, and the flags given override the file. ``json_command`` is the
whole module for a command that builds its config, calls one function and prints the JSON report.
"""

from __future__ import annotations

import json
from typing import Callable


def json_command(cls, action: Callable[[object], dict]):
    """``(add_arguments, run)`` of a command that prints ``action(cfg)`` as JSON."""
    from agents.config_files import add_config_arguments, config_from_args

    def add_arguments(parser) -> None:
        add_config_arguments(parser, cls)

    def run(args) -> int:
        print(json.dumps(action(config_from_args(cls, args)), indent=2))
        return 0

    return add_arguments, run

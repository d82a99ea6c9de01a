"""``step import-robomimic --hdf5 FILE --out DIR [--obs-type state] [--filter-key train]``"""

from agents.commands import json_command
from step_envs.robomimic_import import RoboMimicImportConfig, import_robomimic

add_arguments, run = json_command(RoboMimicImportConfig, import_robomimic)

"""``step collect --task pusht --episodes N --out DIR``"""

from agents.commands import json_command
from step_envs.collect import CollectConfig, collect

add_arguments, run = json_command(CollectConfig, collect)

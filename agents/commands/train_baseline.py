"""``step train-baseline --method cp|onedp --teacher CKPT --dataset DIR [--out DIR] [--config FILE]``

Distils the task's frozen DDPM backbone into Consistency Policy (``cp:k``) or OneDP (``onedp``); see
agents/distill.py (loop, checkpoint), agents/consistency.py and agents/onedp.py (the objectives). The output
folder (default ``<teacher>/<method>``) is what ``make_agent("cp:2", env, checkpoint=<teacher>)`` loads.
"""

from agents.commands import json_command
from agents.distill import TrainBaselineConfig, train_baseline

add_arguments, run = json_command(TrainBaselineConfig, train_baseline)

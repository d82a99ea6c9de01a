"""``step train-baseline --method cp|onedp|bridger --teacher CKPT --dataset DIR [--out DIR] [--config FILE]``

Distils the task's frozen DDPM backbone into Consistency Policy (``cp:k``) or OneDP (``onedp``), or trains
BRIDGeR (``bridger:k``) from its weights; see agents/distill.py (loop, checkpoint), agents/consistency.py,
agents/onedp.py and agents/bridger.py (the objectives). The output folder (default ``<teacher>/<method>``) is
what ``make_agent("cp:2", env, checkpoint=<teacher>)`` loads. To keep optimiser state out of a release, train
into ``runs/`` (``--out runs/pusht_cp``) and copy the student with ``step export --checkpoint runs/pusht_cp
--out checkpoints/pusht/cp``.
"""

from agents.commands import json_command
from agents.distill import TrainBaselineConfig, train_baseline

add_arguments, run = json_command(TrainBaselineConfig, train_baseline)

"""``step train-policy --task pusht --dataset DIR --out CKPT [--config configs/pusht_state_policy.yaml]``"""

from agents.commands import json_command
from agents.training import TrainPolicyConfig, train_policy

add_arguments, run = json_command(TrainPolicyConfig, train_policy)

"""``step train-predictor --policy CKPT --dataset DIR [--out PRED_CKPT] [--config FILE]``

Post-hoc STEP for a LeRobot Diffusion Policy (``agents/lerobot_import.py``):
``step train-predictor --lerobot-policy outputs/train/.../pretrained_model --dataset DIR [--task pusht]``
imports the frozen LeRobot policy as a step-policy checkpoint (``--policy``, default ``<lerobot-policy>-step``)
and trains the predictor into ``<policy>/predictor``.
"""

import dataclasses
from dataclasses import dataclass

from agents.commands import json_command
from agents.config_files import option
from agents.training import TrainPredictorConfig, train_predictor


@dataclass
class TrainPredictorCommandConfig(TrainPredictorConfig):
    policy: str | None = option(None, help="policy checkpoint (step train-policy --out); with --lerobot-policy: "
                                           "where the imported policy is written (default <lerobot-policy>-step)")
    dataset: str | None = option(None, help="LeRobotDataset root or `step collect` folder (required)")
    lerobot_policy: str | None = option(None, help="a LeRobot DiffusionPolicy pretrained folder (lerobot-train "
                                                   "output): import it frozen, then train STEP's predictor on it")
    task: str = option("pusht", help="with --lerobot-policy: the task whose env the policy runs on")


def train(cfg: TrainPredictorCommandConfig) -> dict:
    if not cfg.dataset:
        raise ValueError("--dataset is required.")
    report = {}
    policy = cfg.policy
    if cfg.lerobot_policy:
        from agents.lerobot_import import import_lerobot_policy

        policy = policy or str(cfg.lerobot_policy).rstrip("/") + "-step"
        report["import"] = import_lerobot_policy(cfg.lerobot_policy, policy, task=cfg.task)
    elif not policy:
        raise ValueError("--policy is required (or --lerobot-policy).")
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainPredictorConfig)}
    report.update(train_predictor(TrainPredictorConfig(**{**base, "policy": policy})))
    return report


add_arguments, run = json_command(TrainPredictorCommandConfig, train)

"""Seed blocks, defined once, so that no evaluation ever runs on a demonstration's initial state.

    [0, 100_000)            evaluation (``step bench`` / ``step eval`` default to seeds 0, 1, ...)
    [100_000, 900_000)      demonstrations (``step collect``, ``step record`` on the twin)
    [900_000, 1_000_000)    the periodic rollout score inside ``step train-policy``

Collection refuses a seed range that reaches into either evaluation block.
"""

from __future__ import annotations

EVAL_SEEDS = range(0, 100_000)
DEMO_SEEDS = range(100_000, 900_000)
TRAIN_EVAL_SEEDS = range(900_000, 1_000_000)


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def check_demo_seeds(start: int, count: int) -> None:
    """Raise ValueError when demonstration seeds [start, start + count) touch an evaluation block."""
    wanted = range(start, start + count)
    for name, block in (("evaluation", EVAL_SEEDS), ("training-evaluation", TRAIN_EVAL_SEEDS)):
        common = _overlap(wanted, block)
        if len(common):
            raise ValueError(
                f"Demonstration seeds {wanted.start}-{wanted.stop - 1} overlap the {name} seeds "
                f"{block.start}-{block.stop - 1} (first shared seed {common.start}); demonstrations must use "
                f"seeds {DEMO_SEEDS.start}-{DEMO_SEEDS.stop - 1} (--seed-start, --max-seeds)."
            )


def check_train_eval_seeds(start: int, count: int) -> None:
    """Raise ValueError when the training rollout score would leave its own block."""
    wanted = range(start, start + count)
    if count and (wanted.start < TRAIN_EVAL_SEEDS.start or wanted.stop > TRAIN_EVAL_SEEDS.stop):
        raise ValueError(
            f"Training-evaluation seeds {wanted.start}-{wanted.stop - 1} must lie in "
            f"{TRAIN_EVAL_SEEDS.start}-{TRAIN_EVAL_SEEDS.stop - 1}, a block that demonstrations never use."
        )

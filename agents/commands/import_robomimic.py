"""``step import-robomimic --hdf5 FILE --out DIR [--obs-type state] [--filter-key train]``"""

from __future__ import annotations

import json

from step_envs.robomimic_import import RoboMimicImportConfig, import_robomimic


def add_arguments(parser) -> None:
    parser.add_argument("--hdf5", required=True, help="a RoboMimic dataset file (ph / mh, low_dim or image)")
    parser.add_argument("--out", required=True, help="output folder; the LeRobotDataset goes to OUT/lerobot")
    parser.add_argument("--obs-type", default="state", choices=["state", "pixels", "pixels_state"],
                        help="image variants need an image hdf5")
    parser.add_argument("--filter-key", default=None, help="import only the demos in mask/<key>, e.g. train")
    parser.add_argument("--max-episodes", type=int, default=None, help="the first N demos only")
    parser.add_argument("--no-videos", action="store_true", help="store images as image files, not videos")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT/lerobot")


def run(args) -> int:
    cfg = RoboMimicImportConfig(
        hdf5=args.hdf5, out=args.out, obs_type=args.obs_type, filter_key=args.filter_key,
        max_episodes=args.max_episodes, use_videos=not args.no_videos, overwrite=args.overwrite,
    )
    print(json.dumps(import_robomimic(cfg), indent=2))
    return 0

"""The options of `seer pretrain` and `seer finetune`, shared with their launched entry points; light (argparse
only), so building the `seer` parser imports no training code."""
from __future__ import annotations

import argparse


def pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo",
                        help="YAML file of the keys that differ from the defaults (SEER's recipe), or the name of a "
                             "packaged one in engine/configs (default: demo)")
    parser.add_argument("--resume", action="store_const", const=True, default=None,
                        help="same as train.resume=must: continue from the newest complete checkpoint in "
                             "train.output_dir, and fail if there is none (train.resume=auto, the default, "
                             "starts fresh then)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True,
                        help="backbone file from pretraining (backbone_final.pt), or 'random' for model.backbone "
                             "at random init")
    parser.add_argument("--config", default="demo",
                        help="YAML file of the keys that differ from the defaults, or a packaged config's name "
                             "(default: demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

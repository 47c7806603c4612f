"""The `seer` command: data packing, pretraining, evaluation and the demo."""
from __future__ import annotations

import argparse
import json
import sys
import traceback

from engine.config import ConfigError


def _pack(args) -> None:
    from dataloading.pack import pack

    manifest = pack(args.source, args.out, shard_size=args.shard_size, jpeg_quality=args.jpeg_quality,
                    max_side=args.max_side, labels_from_folders=not args.no_labels, workers=args.workers)
    print(json.dumps({k: manifest[k] for k in ("kept", "skipped")}))


def _pretrain(args) -> None:
    from engine.config import load_config
    from engine.pretrain import pretrain

    print(json.dumps(pretrain(load_config(args.config, args.overrides), resume=args.resume)))


def _eval(args) -> None:
    from engine.config import load_config
    from engine.evaluate import PROTOCOLS, evaluate, load_backbone

    cfg = load_config(args.config, args.overrides)
    backbone = None if args.weights == "pixels" else load_backbone(args.weights)
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    results = evaluate(backbone, cfg, protocols, image_size=args.image_size)
    for name, value in results.items():
        print(f"{name:<18} {value:.4f}", file=sys.stderr)
    print(json.dumps({"weights": str(args.weights), **results}))


def _demo(args) -> None:
    from engine.demo import run_demo

    run_demo(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    from engine.pretrain import add_arguments

    parser = argparse.ArgumentParser(prog="seer", description="SEER-style SwAV pretraining engine")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    pack = data.add_parser("pack", help="images -> validated webdataset shards (+ DALI indexes, manifest.json)")
    pack.add_argument("source", help="image folder (class subfolders = labels) or fashion-mnist:train|test, mnist:train|test")
    pack.add_argument("out", help="output folder")
    pack.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    pack.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images")
    pack.add_argument("--max-side", type=int, default=None, help="downscale images whose longest side exceeds this")
    pack.add_argument("--no-labels", action="store_true", help="ignore class subfolders")
    pack.add_argument("--workers", type=int, default=None, help="validation/encoding processes (default: all cores)")
    pack.set_defaults(run=_pack)

    pretrain = commands.add_parser("pretrain", help="SwAV pretraining (no --config: the demo's config)")
    add_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)

    evaluate = commands.add_parser(
        "eval", help="top-1 of frozen features on eval.train_shards -> eval.test_shards: knn, linear, lowshot or all")
    evaluate.add_argument("protocol", choices=["knn", "linear", "lowshot", "all"])
    evaluate.add_argument("--weights", required=True, help="backbone file from pretraining (backbone_final.pt), or 'pixels'")
    evaluate.add_argument("--config", help="YAML config for data and eval settings (default: the demo's)")
    evaluate.add_argument("--image-size", type=int, default=None, help="override eval.image_size")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value")
    evaluate.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="Fashion-MNIST end to end: pack, pretrain, kNN vs random init and pixels")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
        code = 0
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"seer: error: {err}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    from engine.distributed import shutdown_and_exit

    shutdown_and_exit(code)


if __name__ == "__main__":
    main()

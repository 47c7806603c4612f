"""The `seer` command: data packing, pretraining, evaluation, planning, benchmarks and the demo."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from engine.training.arguments import finetune_arguments, pretrain_arguments


def _pack(args) -> None:
    from dataloading.pack import pack

    manifest = pack(args.source, args.out, shard_size=args.shard_size, jpeg_quality=args.jpeg_quality,
                    max_side=args.max_side, min_side=args.min_side, labels_from_folders=not args.no_labels,
                    workers=args.workers)
    print(json.dumps({k: manifest[k] for k in ("kept", "skipped")}))


def _tiles(args) -> None:
    from dataloading.tiles import make_tiles, parse_size

    print(json.dumps(make_tiles(args.out, args.count, size=parse_size(args.size), quality=args.quality,
                                seed=args.seed, workers=args.workers)))


def _pretrain(args) -> None:
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config error is told before the training code loads
    from engine.training.pretrain import pretrain

    print(json.dumps(pretrain(cfg, resume=args.resume)))


def _finetune(args) -> None:
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config error is told before the training code loads
    from engine.training.finetune import finetune

    print(json.dumps(finetune(cfg, args.weights)))


def _eval(args) -> None:
    from engine.config import load_config
    from engine.evaluation.evaluate import PROTOCOLS, FeatureCache, evaluate
    from engine.models.weights import load_backbone_weights

    cfg = load_config(args.config, args.overrides)
    pixels = args.weights == "pixels"
    if args.save_head:
        from engine.evaluation.predict import save_linear_head

        if args.protocol != "linear" or pixels:
            raise ValueError("--save-head saves the linear probe of a backbone: "
                             "seer eval linear --weights W --save-head OUT.pt")
        results = save_linear_head(args.weights, cfg, args.save_head, image_size=args.image_size)
    else:
        backbone = None if pixels else load_backbone_weights(args.weights)
        protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
        results = evaluate(backbone, cfg, protocols, image_size=args.image_size,
                           cache=None if pixels else FeatureCache.beside(args.weights))
    for name, value in results.items():
        print(f"{name:<18} {value:.4f}", file=sys.stderr)
    head = {"head": str(args.save_head)} if args.save_head else {}
    print(json.dumps({"weights": str(args.weights), **results, **head}))


def _export(args) -> None:
    from engine.training.export import export

    summary = export(args.checkpoint, args.out)
    print(f"wrote {summary['out']} ({summary['tensors']} tensors of backbone {summary['backbone']}); load it with:\n"
          f"{summary['load']}", file=sys.stderr)
    print(json.dumps(summary))


def _predict(args) -> None:
    from engine.evaluation.predict import predict

    results = predict(args.model, args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(results))
        return
    for result in results:
        print(result["file"])
        for entry in result["top"]:
            print(f"  {entry['probability']:.4f}  {entry['class']}")


def _report(args) -> None:
    from engine.report import write_report

    print(write_report(args.run_dir))


def _demo(args) -> None:
    from engine.demo import run_demo

    run_demo(args.overrides)


def _plan(args) -> None:
    from engine.plan import run

    run(args)


BENCHMARKS = {  # seer bench NAME: the module that defines its add_arguments(parser) and run(args, argv), help
    "train": ("benchmarks.train", "img/s, TFLOP/s, MFU and peak memory of SwAV training steps"),
    "data": ("benchmarks.data", "img/s of the DALI multi-crop loader vs a DataLoader + Pillow"),
    "kernels": ("benchmarks.swav_head", "SwAV head: Triton kernels vs the PyTorch reference, eager and compiled"),
}


def _bench(args) -> None:
    # The arguments after `seer bench NAME` are recorded with the results as the command.
    importlib.import_module(BENCHMARKS[args.bench_command][0]).run(args, args.command_line[2:])


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of `seer ARGV`. The options of pretrain, finetune, plan and the benchmarks are defined in their
    modules, which import torch, DeepSpeed or timm: they are added only to the sub-command ARGV names, so that
    `seer --help` and every other sub-command start without importing them."""

    def named(*command: str) -> bool:
        return tuple(argv[:len(command)]) == command

    parser = argparse.ArgumentParser(prog="seer", description="SEER-style SwAV pretraining engine")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    pack = data.add_parser("pack", help="images -> validated webdataset shards (+ DALI indexes, manifest.json)")
    pack.add_argument("source", help="image folder (class subfolders = labels) or fashion-mnist:train|test, mnist:train|test")
    pack.add_argument("out", help="output folder")
    pack.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    pack.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded images")
    pack.add_argument("--max-side", type=int, default=None, help="downscale images whose longest side exceeds this")
    pack.add_argument("--min-side", type=int, default=16, help="skip images with a side under this (px, as stored)")
    pack.add_argument("--no-labels", action="store_true", help="ignore class subfolders")
    pack.add_argument("--workers", type=int, default=None, help="validation/encoding processes (default: all cores)")
    pack.set_defaults(run=_pack)
    tiles = data.add_parser("tiles", help="real-photo JPEG tiles (random crops of Debian's wallpaper photos)")
    tiles.add_argument("out", help="new or empty output folder")
    tiles.add_argument("--count", type=int, required=True, help="number of tiles")
    tiles.add_argument("--size", default="500x375", help="tile size WIDTHxHEIGHT in pixels")
    tiles.add_argument("--quality", type=int, default=90, help="JPEG quality")
    tiles.add_argument("--seed", type=int, default=0, help="same seed and photos -> same tiles")
    tiles.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    tiles.set_defaults(run=_tiles)

    pretrain = commands.add_parser("pretrain", help="SwAV pretraining (no --config: the demo's config)")
    pretrain_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)

    finetune = commands.add_parser(
        "finetune", help="backbone + linear classifier trained end to end on finetune.train_shards; test top-1")
    finetune_arguments(finetune)
    finetune.set_defaults(run=_finetune)

    evaluate = commands.add_parser(
        "eval", help="top-1 of frozen features on eval.train_shards -> eval.test_shards: knn, linear, lowshot or all")
    evaluate.add_argument("protocol", choices=["knn", "linear", "lowshot", "all"])
    evaluate.add_argument("--weights", required=True, help="backbone file from pretraining (backbone_final.pt), or 'pixels'")
    evaluate.add_argument("--config", default="demo",
                          help="YAML config for data and eval settings, or a packaged config's name (default: demo)")
    evaluate.add_argument("--image-size", type=int, default=None, help="override eval.image_size")
    evaluate.add_argument("--save-head", metavar="OUT.pt",
                          help="linear only: save backbone + fitted probe as a classifier for `seer predict`")
    evaluate.add_argument("overrides", nargs="*", metavar="section.key=value")
    evaluate.set_defaults(run=_eval)

    export = commands.add_parser("export", help="backbone weights -> timm-format safetensors")
    export.add_argument("checkpoint", help="backbone_*.pt of pretraining, or a DeepSpeed checkpoint folder "
                                           "(RUN/checkpoints: the latest step; or RUN/checkpoints/step_XXXXXXXX)")
    export.add_argument("out", help="output file, *.safetensors")
    export.set_defaults(run=_export)

    predict = commands.add_parser("predict", help="classify image files with a saved classifier")
    predict.add_argument("--model", required=True, help="classifier file (seer eval linear --save-head)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of them")
    predict.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    predict.add_argument("--json", action="store_true", help="one JSON list on stdout instead of text")
    predict.set_defaults(run=_predict)

    report = commands.add_parser("report", help="plots and report.md of a pretraining run (its metrics.jsonl)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.output_dir (metrics.jsonl, config.yaml)")
    report.set_defaults(run=_report)

    plan = commands.add_parser("plan", help="per-GPU memory (weights, gradients, optimizer, activations) and run "
                                            "time of a config's run")
    if named("plan"):
        from engine.plan import add_arguments as add_plan_arguments

        add_plan_arguments(plan)
    plan.set_defaults(run=_plan)

    bench = commands.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS))
    benchmarks = bench.add_subparsers(dest="bench_command", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        benchmark = benchmarks.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if named("bench", name):
            module = importlib.import_module(module_name)
            benchmark.description = module.__doc__
            module.add_arguments(benchmark)
        benchmark.set_defaults(run=_bench)

    demo = commands.add_parser("demo", help="Fashion-MNIST end to end: pack, pretrain, kNN vs random init and pixels")
    demo.add_argument("overrides", nargs="*", metavar="section.key=value")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    # argparse stops filling a positional list at the first option: `seer eval knn --weights W a.b=1` would leave
    # `a.b=1` unrecognized, so overrides given after options are collected here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.command_line = argv
    from engine.distributed import run_rank_and_exit

    run_rank_and_exit(lambda: args.run(args))


if __name__ == "__main__":
    main()

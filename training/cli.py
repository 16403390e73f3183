"""``uncertain-seg``: the command-line tool for training, evaluating and preparing models."""
import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

PLUGIN_GROUP = "uncertain_seg_ros.commands"

DESCRIPTION = """\
Train, evaluate and package DINOv2 segmenters with per-pixel uncertainty for the
uncertain_seg_ros node.

  train      supervised training on a labelled folder (images/ + labels/ + classes.yaml);
             writes checkpoints, a JSON-lines log and a model bundle. Use torchrun for
             several processes / GPUs: torchrun --nproc-per-node N -m uncertain_seg_training.cli train ...
  adapt      adapt a bundle to a new site from unlabelled bags: Masked gamma-SSL, masked
             pseudo-label consistency, and the baselines (control, BatchNorm re-estimation).
  calibrate  fit temperature / selective scaling and the mask threshold on a held-out labelled split.
  evaluate   mIoU, misclassification detection (max F0.5, AUROC, AUPR, FPR95) and ECE of a
             bundle on a labelled folder; writes metrics.json and a Markdown report with plots.
  build-engine  build a bundle's ONNX / TensorRT artefact ahead of time, so the node only loads it.
  bag        rosbag tools: info, extract and write (no ROS install needed), play (needs rclpy).
  demo       the perception node on the bundled sample bag; outputs written as PNGs + montage.

Commands that talk to a ROS 2 graph (bag play, record, demo) are registered by the node package
through the 'uncertain_seg_ros.commands' entry-point group.
"""


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--option`` per dataclass field, with its default, help text and choices."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if isinstance(f.default, tuple):
            kind = type(f.default[0]) if f.default else str
        else:
            kind = type(f.default)
        parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})", **meta)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["input_size"] = tuple(values["input_size"])
    if not values["data"]:
        raise SystemExit("train: --data is required")
    path = train(TrainConfig(**values))
    print(f"{'bundle' if path.name == 'bundle' else 'checkpoint'}: {path}")
    return 0


def _dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build a config dataclass from parsed options (lists become tuples)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    return cls(**values)


def _adapt(args: argparse.Namespace) -> int:
    from .adapt import AdaptConfig, adapt

    if not args.bundle or (not args.data and args.method != "bn_stats"):
        raise SystemExit("adapt: --bundle and --data are required (--data: not with --method bn_stats)")
    path = adapt(_dataclass_from_args(AdaptConfig, args))
    print(f"{'bundle' if path.name == 'bundle' else 'checkpoint'}: {path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    metrics = evaluate(args.bundle, args.data, args.out, args.device, args.montage, args.limit, args.title)
    print(f"mIoU {metrics['miou']:.4f}  pixel accuracy {metrics['pixel_accuracy']:.4f}  ({metrics['frames']} frames)")
    for source, m in metrics["uncertainty"].items():
        print(f"  {source:12s} max F0.5 {m['max_f05']:.4f}  AUROC {m['auroc']:.4f}  AUPR {m['aupr']:.4f}  FPR95 {m['fpr95']:.4f}")
    for name, c in metrics["calibration"].items():
        print(f"  ECE ({name}) {c['ece']:.4f}")
    print(f"report: {args.out}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="uncertain-seg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="supervised training on a labelled image folder", description=(
        "Supervised training: AdamW, ignore-aware (optionally class-balanced) cross-entropy, scale/crop/flip/colour "
        "augmentation, optional random patch masking (--mask-ratio-max; trains the mask token), the loss-prediction "
        "uncertainty head trained with a ranking loss on stop-gradient features; --init-bundle continues a bundle. "
        "Example: uncertain-seg train --data ../shared/data/camvid/day/train --val-data ../shared/data/camvid/day/val "
        "--backbone dinov2_vits14 --pretrained dinov2_vits14_pretrain.pth --backbone-lr-mult 0.1 --out runs/vits14"))
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=_train)

    from .adapt import AdaptConfig

    p = sub.add_parser("adapt", help="adapt a bundle to a new site from its unlabelled bags (Masked gamma-SSL, masked pseudo-labels)",
                       description=(
        "Adapts a trained bundle to unlabelled target frames read from bags (or an image folder), keeping the "
        "supervised loss on the labelled source data (with the bundle's own class weighting). gamma_ssl (Masked "
        "gamma-SSL): a frozen copy of the input model labels the full image, the trained model sees it with half its "
        "patches masked and must agree where it is certain (gamma re-set per batch from the disagreement rate). "
        "maskmatch (masked pseudo-label consistency, the masked part of MaskMatch): an EMA teacher's multi-scale, "
        "confidence-thresholded pseudo-labels supervise a student that sees heavily masked images. control: the "
        "same loop with the source loss only (the baseline an adapted model must beat). bn_stats: no training, the "
        "BatchNorm statistics re-estimated on the target frames. Every branch runs in eval mode (BatchNorm "
        "statistics frozen, no drop-path); each branch gets its own colour jitter. --backbone-lr-mult 0 trains "
        "the heads and the mask token only. Calibrate the result afterwards (uncertain-seg calibrate). Example: "
        "uncertain-seg adapt --bundle runs/vits14/bundle --data ../shared/data/camvid/day/train --target-bags "
        "dusk_bag --out runs/adapt"))
    _add_dataclass_options(p, AdaptConfig)
    p.set_defaults(func=_adapt)

    p = sub.add_parser("evaluate", help="evaluate a bundle on a labelled folder and write a report", description=(
        "Streams a labelled folder through a bundle and writes metrics.json, report.md, reliability.png, "
        "pr_curves.png, roc_curves.png and montage.png into --out."))
    p.add_argument("--bundle", required=True, help="model bundle folder, or the name of a shipped bundle (camvid_demo)")
    p.add_argument("--data", required=True, help="labelled folder (images/ + labels/)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--montage", type=int, default=6, help="frames shown in montage.png (default: 6)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N frames")
    p.add_argument("--title", default=None, help="report title")
    p.set_defaults(func=_evaluate)

    from .calibrate import register as register_calibrate

    register_calibrate(sub)

    from .build_engine import register as register_build_engine

    register_build_engine(sub)

    from .bag_commands import register as register_bag

    groups = {"": sub, "bag": register_bag(sub)}
    for plugin in entry_points(group=PLUGIN_GROUP):
        try:
            register = plugin.load()
        except ImportError as exc:
            logging.getLogger(__name__).warning("commands from %s unavailable: %s", plugin.value, exc)
            continue
        register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

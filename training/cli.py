"""``uncertain-seg``: the command-line tool for training, evaluating and preparing models.

Each command's options are added only when that command runs (:class:`CommandParser`), so that
``uncertain-seg --help`` does not import torch. Errors of every command end the same way: one line
``uncertain-seg <command>: error: ...`` and exit code 2; ``--debug`` shows the traceback instead.
"""
import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, requires

PLUGIN_GROUP = "uncertain_seg_ros.commands"
DISTRIBUTION = "uncertain_seg_ros"

DESCRIPTION = """\
Train, evaluate and package DINOv2 segmenters with per-pixel uncertainty for the uncertain_seg_ros
node, and work with bags. Several processes / GPUs: plain torchrun, e.g.
  torchrun --nproc-per-node N -m uncertain_seg_training.cli train ...
The commands that talk to a ROS 2 graph come through the 'uncertain_seg_ros.commands' entry-point
group and need rclpy: bag play, record and demo from the node package, benchmark from the
benchmarks package.
Errors are one line and exit with code 2; --debug shows the traceback.
"""


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose options are added by ``options(parser)`` only when the command is used.

    Building every command's options would import what they name (torch for ``train``); with this,
    ``uncertain-seg --help`` and other commands stay quick. Every command also takes ``--debug``.
    """

    def __init__(self, *args, options: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._options = options
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, show the traceback instead of one line")
        self.set_defaults(command_prog=self.prog)

    def _add_options(self) -> None:
        if self._options is not None:
            options, self._options = self._options, None
            options(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_options()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_options()
        return super().format_help()

    def format_usage(self) -> str:
        self._add_options()
        return super().format_usage()


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, required: Sequence[str] = ()) -> None:
    """One ``--option`` per dataclass field, with its help text, choices and default (stated once, if any)."""
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
        if f.name not in required and f.default not in ("", ()) and "default" not in help_text:
            help_text = f"{help_text} (default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        parser.add_argument(flag, type=kind, default=f.default, help=help_text, required=f.name in required, **meta)


def _dataclass_from_args(cls: type, args: argparse.Namespace):
    """Build a config dataclass from parsed options (lists become tuples)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    return cls(**values)


def _add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=what)


def _train_options(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    _add_dataclass_options(p, TrainConfig, required=("data",))
    p.add_argument("--from-scratch", action="store_true",
                   help="start the backbone from random weights, on purpose (required unless --pretrained or "
                        "--download-pretrained is given: a DINOv2 backbone is useful from its official weights)")
    _add_overwrite(p, "start a new run in --out although it holds a previous run's checkpoint/, train_log.jsonl or "
                      "bundle/ (they are removed first); without it, only --resume continues there")


def _train(args: argparse.Namespace) -> int:
    from .output_folders import prepare_run_folder
    from .train import TrainConfig, train

    starts = [flag for flag, given in (("--pretrained", args.pretrained), ("--download-pretrained", args.download_pretrained),
                                       ("--init-bundle", args.init_bundle), ("--from-scratch", args.from_scratch)) if given]
    if len(starts) > 1 and "--from-scratch" in starts or {"--init-bundle", "--pretrained"} <= set(starts):
        raise ValueError(f"{' and '.join(starts)} contradict each other: give one starting point")
    if not starts:
        raise ValueError(f"--backbone {args.backbone} would start from random weights: give its official weights "
                         "(--pretrained PATH or --download-pretrained), a bundle to continue (--init-bundle), or "
                         "--from-scratch to train from random initialisation on purpose")
    cfg = _dataclass_from_args(TrainConfig, args)
    prepare_run_folder(cfg.out, cfg.resume, args.overwrite)
    path = train(cfg)
    print(f"{'bundle' if path.name == 'bundle' else 'checkpoint'}: {path}")
    return 0


def _adapt_options(p: argparse.ArgumentParser) -> None:
    from .adapt import AdaptConfig

    _add_dataclass_options(p, AdaptConfig, required=("bundle",))
    _add_overwrite(p, "start a new run in --out although it holds a previous run's checkpoint/, train_log.jsonl, "
                      "bundle/ or target_frames/ (they are removed first); without it, only --resume continues there")


def _adapt(args: argparse.Namespace) -> int:
    from .adapt import AdaptConfig, adapt
    from .output_folders import prepare_run_folder

    cfg = _dataclass_from_args(AdaptConfig, args)
    if not cfg.data and cfg.method != "bn_stats":
        raise ValueError(f"--data (the labelled source folder) is required with --method {cfg.method}")
    prepare_run_folder(cfg.out, cfg.resume, args.overwrite)
    path = adapt(cfg)
    print(f"{'bundle' if path.name == 'bundle' else 'checkpoint'}: {path}")
    return 0


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="model bundle folder, or the name of a shipped bundle (camvid_demo)")
    p.add_argument("--data", required=True, help="labelled folder (images/ + labels/)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--montage", type=int, default=6, help="frames shown in montage.png (default: 6)")
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N frames (in name order), e.g. the frames a calibration was fitted on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N frames (after --skip)")
    p.add_argument("--title", default=None, help="report title")


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    metrics = evaluate(args.bundle, args.data, args.out, args.device, args.montage, args.limit, args.title, args.skip)
    print(f"mIoU {metrics['miou']:.4f}  pixel accuracy {metrics['pixel_accuracy']:.4f}  ({metrics['frames']} frames)")
    for source, m in metrics["uncertainty"].items():
        print(f"  {source:12s} max F0.5 {m['max_f05']:.4f}  AUROC {m['auroc']:.4f}  AUPR {m['aupr']:.4f}  FPR95 {m['fpr95']:.4f}")
    for name, c in metrics["calibration"].items():
        print(f"  ECE ({name}) {c['ece']:.4f}")
    print(f"report: {args.out}/report.md")
    return 0


def _calibrate_options(p: argparse.ArgumentParser) -> None:
    from .calibrate import add_options

    add_options(p)


def _build_engine_options(p: argparse.ArgumentParser) -> None:
    from .build_engine import add_options

    add_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the commands here, then those of the entry-point group's plugins."""
    parser = argparse.ArgumentParser(prog="uncertain-seg", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    p = sub.add_parser("train", help="supervised training on a labelled image folder; writes checkpoints, a log and "
                                     "a model bundle", options=_train_options, description=(
        "Supervised training: AdamW, ignore-aware (optionally class-balanced) cross-entropy, scale/crop/flip/colour "
        "augmentation, optional random patch masking (--mask-ratio-max; trains the mask token), the loss-prediction "
        "uncertainty head trained with a ranking loss on stop-gradient features; --init-bundle continues a bundle. "
        "Example: uncertain-seg train --data ../shared/data/camvid/day/train --val-data ../shared/data/camvid/day/val "
        "--backbone dinov2_vits14 --pretrained dinov2_vits14_pretrain.pth --backbone-lr-mult 0.1 --out runs/vits14"))
    p.set_defaults(func=_train)

    p = sub.add_parser("adapt", help="adapt a bundle to a new site from its unlabelled bags (Masked gamma-SSL, masked pseudo-labels)",
                       options=_adapt_options, description=(
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
    p.set_defaults(func=_adapt)

    p = sub.add_parser("evaluate", help="mIoU, misclassification detection and ECE of a bundle on a labelled folder; "
                                        "writes a report (needs the [train] extra)",
                       options=_evaluate_options, description=(
        "Streams a labelled folder through a bundle and writes metrics.json, report.md, reliability.png, "
        "pr_curves.png, roc_curves.png, montage.png (examples, with the legend below) and legend.png (class "
        "colours, the uncertainty colour bar with the mask threshold) into --out. The plots need matplotlib (the [train] extra)."))
    p.set_defaults(func=_evaluate)

    sub.add_parser("calibrate", help="fit temperature / selective scaling and the mask threshold on a held-out split",
                   options=_calibrate_options, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("build-engine", help="build a bundle's ONNX / OpenVINO / TensorRT artefact ahead of time, so the node only "
                                        "loads it", options=_build_engine_options)

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


def missing_module_hint(name: str) -> str | None:
    """Which of the package's extras installs the missing module ``name``, as one line; None if none does."""
    try:
        requirements = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return None
    module = name.split(".")[0]
    wanted = module.lower().replace("_", "-")
    extras: dict[str, str] = {}
    for line in requirements:
        found = re.match(r"\s*([A-Za-z0-9_.-]+)[^;]*;.*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if found and found.group(1).lower().replace("_", "-") == wanted:
            extras[found.group(2)] = line.split(";")[0].strip()
    if not extras:
        return None
    extra = next((e for e in extras if e != "test"), next(iter(extras)))
    return (f"{module} is not installed; the [{extra}] extra installs it: pip install -e \".[{extra}]\" in the "
            f"clone, or pip install \"{extras[extra]}\"")


def describe_error(err: BaseException) -> str:
    """One line for a failed command: the message of an expected error, the type too for anything else."""
    if isinstance(err, ModuleNotFoundError) and err.name:
        return missing_module_hint(err.name) or str(err)
    if isinstance(err, (ValueError, OSError, RuntimeError, LookupError, ImportError)):
        return str(err) or type(err).__name__
    return f"{type(err).__name__}: {err} (--debug shows the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{args.command_prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"{args.command_prog}: error: {describe_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The adaptation experiment on real CamVid data: does adapting to dusk make uncertainty trustworthy there?

Source = day/train (labelled); target = dusk/unlabeled, packed into a rosbag2 with the project's
own writer and read back through the bag reader by ``adapt``; calibration on day/val (and, as a
second variant, on the first frames of dusk/test, evaluated on the remaining ones, since day/val is
not independent of day/train); evaluation on day/test and dusk/test. Writes
``<out>/adaptation.md`` (one table, the command that reproduces it), ``adaptation.json`` and PNG
figures; every number in the table is printed by the code below from the evaluations it ran.

    python benchmarks/adaptation.py --camvid ../shared/data/camvid --bundle models/camvid_day --lr 2e-5 --tau 1.0
"""
import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from uncertain_seg_ros.bags import write_image_bag
from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_training.adapt import AdaptConfig, adapt
from uncertain_seg_training.calibrate import calibrate
from uncertain_seg_training.datasets import LabelledFolder
from uncertain_seg_training.distributed import resolve_device
from uncertain_seg_training.evaluate import run_evaluation

log = logging.getLogger("adaptation")
SOURCES = ("max_softmax", "entropy", "learned")


def _subset(folder: Path, names: list[str], out: Path) -> Path:
    """A labelled folder of the given frames (symlinks) with the dataset's classes.yaml."""
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for stem in names:
        image = next((folder / "images").glob(f"{stem}.*"))
        (out / "images" / image.name).symlink_to(image.resolve())
        (out / "labels" / f"{stem}.png").symlink_to((folder / "labels" / f"{stem}.png").resolve())
    classes = LabelledFolder(folder).classes
    shutil.copy(next(p for p in [folder, *folder.parents] if (p / "classes.yaml").is_file()) / "classes.yaml", out)
    assert LabelledFolder(out).classes == classes
    return out


def _evaluate(bundle_path: Path, data: Path, device) -> tuple[dict, object]:
    bundle = load_bundle(bundle_path, device)
    folder = LabelledFolder(data)
    ev = run_evaluation(bundle.model, bundle.config, folder, device, progress=False)
    return ev.metrics(bundle.config.class_names), ev


def _figure(curves: dict, calibration: dict, path: Path) -> None:
    """PR curves (left) and reliability diagrams (right) on dusk/test, one line per model/calibration."""
    fig = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(fig)
    pr, rel = fig.subplots(1, 2)
    for name, c in curves.items():
        precision, recall = c.pr_curve()
        pr.step(recall, precision, where="post", label=f"{name} (AUPR {c.aupr():.3f})")
    pr.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall of misclassified pixels", ylabel="precision",
           title="dusk/test: misclassification detection")
    pr.legend(fontsize=7)
    rel.plot([0, 1], [0, 1], "k--", lw=1)
    for name, b in calibration.items():
        r = b.reliability()
        keep = r["count"] > 0
        rel.plot(r["confidence"][keep], r["accuracy"][keep], "o-", ms=3, label=f"{name} (ECE {b.ece():.3f})")
    rel.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title="dusk/test: reliability")
    rel.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--camvid", type=Path, default=Path("../shared/data/camvid"))
    p.add_argument("--bundle", default="camvid_day", help="source-only bundle (supervised on day/train)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--work", type=Path, default=Path("runs/adaptation"), help="bags, runs and bundles")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--backbone-lr-mult", type=float, default=1.0, help="backbone LR = lr x this (0 freezes it)")
    p.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches masked in the gamma-SSL query")
    p.add_argument("--tau", type=float, default=1.0, help="softmax temperature of the gamma-SSL consistency loss")
    p.add_argument("--dusk-calibration-frames", type=int, default=6)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    cam, work = args.camvid, args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    bag = work / "dusk_unlabeled_bag"
    if not bag.exists():
        write_image_bag(cam / "dusk" / "unlabeled" / "images", bag, topic="/camera/image_raw", fps=1.0)
    n_target = len(list((cam / "dusk" / "unlabeled" / "images").iterdir()))
    source = resolve_bundle(args.bundle)
    models = {"source-only": source}
    for name, method in (("Masked gamma-SSL", "gamma_ssl"), ("Masked gamma-SSL + MaskMatch", "both")):
        out = work / method
        if not (out / "bundle" / "checksums.sha256").is_file():
            cfg = AdaptConfig(bundle=str(source), data=str(cam / "day" / "train"), target_bags=(str(bag),),
                              method=method, out=str(out), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              backbone_lr_mult=args.backbone_lr_mult, mask_ratio=args.mask_ratio, tau=args.tau,
                              workers=1, device=args.device, dedupe=0.0, val_every=args.steps,
                              val_data=str(cam / "day" / "val"))
            adapt(cfg)
        models[name] = out / "bundle"

    dusk = cam / "dusk" / "test"
    stems = sorted(p.stem for p in (dusk / "images").iterdir())
    k = args.dusk_calibration_frames
    dusk_cal = _subset(dusk, stems[:k], work / "dusk_calibration") if not (work / "dusk_calibration").exists() else work / "dusk_calibration"
    dusk_rest = _subset(dusk, stems[k:], work / "dusk_rest") if not (work / "dusk_rest").exists() else work / "dusk_rest"

    results, curves, reliability = {}, {}, {}
    for name, path in models.items():
        slug = name.lower().replace(" ", "_").replace("+", "and").replace("-", "_")
        row = {}
        day, _ = _evaluate(path, cam / "day" / "test", device)
        night, ev = _evaluate(path, dusk, device)
        row["miou_day"], row["miou_dusk"] = day["miou"], night["miou"]
        row["uncertainty"] = night["uncertainty"]
        row["ece_uncalibrated"] = night["calibration"]["uncalibrated"]["ece"]
        curves[f"{name} / max_softmax"] = ev.curves["max_softmax"]
        curves[f"{name} / learned"] = ev.curves["learned"]
        reliability[f"{name}, uncalibrated"] = ev.calibration["uncalibrated"]
        for variant, cal_data, test_data in (("day_val", cam / "day" / "val", dusk), ("dusk_frames", dusk_cal, dusk_rest)):
            for method in ("temperature", "selective"):
                out = work / "calibrated" / f"{slug}_{method}_{variant}"
                if not (out / "checksums.sha256").is_file():
                    calibrate(path, cal_data, out, device=args.device, method=method)
                metrics, ev_cal = _evaluate(out, test_data, device)
                row[f"ece_{method}_{variant}"] = metrics["calibration"]["calibrated"]["ece"]
                if variant == "day_val":
                    reliability[f"{name}, {method} (day/val)"] = ev_cal.calibration["calibrated"]
            if variant == "dusk_frames":
                rest, _ = _evaluate(path, dusk_rest, device)
                row["ece_uncalibrated_dusk_rest"] = rest["calibration"]["uncalibrated"]["ece"]
        results[name] = row
        log.info("%s: %s", name, json.dumps({k: v for k, v in row.items() if k != "uncertainty"}))

    _figure(curves, {k: v for k, v in reliability.items() if "source-only" in k or "uncalibrated" in k or "selective" in k},
            args.out / "adaptation.png")
    (args.out / "adaptation.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    lines = [
        "# Adaptation to dusk: CamVid day -> dusk",
        "",
        f"Reproduce: `python benchmarks/adaptation.py --camvid {cam} --bundle {args.bundle} "
        f"--steps {args.steps} --batch-size {args.batch_size} --lr {args.lr} --backbone-lr-mult {args.backbone_lr_mult} "
        f"--mask-ratio {args.mask_ratio} --tau {args.tau}` (device: {device}).",
        "",
        f"Source-only model: `{args.bundle}` (supervised on day/train). Target: dusk/unlabeled ({n_target} frames) "
        "written to a rosbag2 with `write_image_bag` and read back by `adapt` through the bag reader. Detection and "
        f"calibration columns are on dusk/test ({len(stems)} frames); misclassified pixel = positive; ECE with 15 bins. "
        "Calibration fitted on day/val. The last two columns fit calibration on the first "
        f"{k} dusk/test frames instead and evaluate on the other {len(stems) - k}.",
        "",
        "| model / uncertainty | mIoU day/test | mIoU dusk/test | max F0.5 | AUROC | AUPR | FPR95 | ECE uncal. | ECE temp. | ECE selective | ECE temp. (dusk cal.) | ECE selective (dusk cal.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        for source in SOURCES:
            u = row["uncertainty"][source]
            lines.append(
                f"| {name} / {source} | {row['miou_day']:.4f} | {row['miou_dusk']:.4f} | {u['max_f05']:.4f} | "
                f"{u['auroc']:.4f} | {u['aupr']:.4f} | {u['fpr95']:.4f} | {row['ece_uncalibrated']:.4f} | "
                f"{row['ece_temperature_day_val']:.4f} | {row['ece_selective_day_val']:.4f} | "
                f"{row['ece_temperature_dusk_frames']:.4f} | {row['ece_selective_dusk_frames']:.4f} |")
    lines += ["", "What the table says (computed from the rows above):", ""]
    base = results["source-only"]["uncertainty"]["max_softmax"]
    for name, row in results.items():
        u = row["uncertainty"]["max_softmax"]
        if name != "source-only":
            verdict = "beats" if u["aupr"] > base["aupr"] and u["max_f05"] > base["max_f05"] else "does not beat"
            lines.append(f"- {name} (max-softmax) {verdict} source-only max-softmax on dusk/test: AUPR {u['aupr']:.4f} vs "
                         f"{base['aupr']:.4f}, max F0.5 {u['max_f05']:.4f} vs {base['max_f05']:.4f}.")
        for variant, label in (("day_val", "day/val"), ("dusk_frames", "dusk frames")):
            sel, temp = row[f"ece_selective_{variant}"], row[f"ece_temperature_{variant}"]
            lines.append(f"- {name}, calibration on {label}: selective ECE {sel:.4f} {'<' if sel < temp else '>='} "
                         f"temperature ECE {temp:.4f} ({'selective better' if sel < temp else 'temperature better'}).")
    lines += ["", "Other settings tried, with the same script: [adaptation_tuning/](adaptation_tuning/README.md).", "",
              "![PR curves and reliability diagrams on dusk/test](adaptation.png)", ""]
    (args.out / "adaptation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

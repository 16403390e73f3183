"""Where decode computes what: the selective scaler's selector on coarser grids, against every pixel.

``decode`` computes labels, calibrated probabilities, uncertainty and mask per pixel of the camera
image, and runs the selective scaler's selector (an MLP per pixel) on ``SELECTOR_GRID_SCALE``
times the network's grid, its score upsampled. This script measures that choice on the CamVid
test splits for a selectively calibrated bundle, for each selector grid and two references:

- **every pixel**: the selector on every output pixel (the decoding before; the same code with
  a grid as large as the output, which leaves both resizes as no-ops);
- **s x grid**: the selector on s times the network's grid (s = ``SELECTOR_GRID_SCALE`` ships);
- **grid maps**: calibration, softmax and uncertainty on the network's grid and the maps
  upsampled (labels still from the upsampled logits): the cheapest way, rejected by its AUROC.

For each: the fraction of pixels whose label and mask equal "every pixel" (all frames, and the
worst frame), the evaluator's metrics (``run_evaluation``, what ``uncertain-seg evaluate``
reports) as differences to "every pixel", and the median time of one decode of the first
``--timing-frames`` frames of each split, ``--timing-rounds`` times, the variants interleaved
frame by frame in this process (timings depend on the machine's other load: the load average
before and after is recorded). Prints a table and
writes JSON and Markdown.

    python benchmarks/decode_resolution.py --camvid ../shared/data/camvid \\
        --json benchmarks/results/decode_resolution.json --markdown benchmarks/results/decode_resolution.md
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import uncertain_seg_ros.prediction as prediction
import uncertain_seg_training.evaluate as evaluate
from uncertain_seg_ros.atomic_io import atomic_write_text
from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.uncertainty import UNCERTAINTY_SOURCES, uncertainty
from uncertain_seg_training.datasets import LabelledFolder

EVERY_PIXEL, GRID_MAPS = "every pixel", "grid maps"


def grid_maps_decode(logits, predicted_loss, size, calibration, source, mask_threshold, *, selector=None):
    """The rejected alternative: calibrated probabilities and uncertainty on the grid, the maps upsampled."""
    logits = logits.float()
    flagged = selector(logits)[:, 0] > 0 if calibration.needs_selector else None
    probs = calibration.apply(logits, flagged).softmax(dim=1)
    loss = predicted_loss.float()
    unc = prediction.upsample(uncertainty(source, probs, loss[:, 0]).unsqueeze(1), size)[:, 0]
    return prediction.Prediction(
        labels=prediction.upsample(logits, size).max(dim=1).indices,
        confidence=prediction.upsample(probs.amax(dim=1, keepdim=True), size)[:, 0],
        uncertainty=unc, mask=unc > mask_threshold, probs=prediction.upsample(probs, size),
        predicted_loss=prediction.upsample(loss, size)[:, 0])


@contextmanager
def decoding(variant: str) -> Iterator[Callable]:
    """``decode`` as the variant computes it, for this process (the evaluator's included) while inside."""
    scale, evaluator_decode = prediction.SELECTOR_GRID_SCALE, evaluate.decode
    if variant == GRID_MAPS:
        evaluate.decode = grid_maps_decode
    else:
        # the selector's grid is min(output, scale x network grid): a scale beyond any camera is every pixel
        prediction.SELECTOR_GRID_SCALE = 1 << 20 if variant == EVERY_PIXEL else int(variant.split("x")[0])
    try:
        yield evaluate.decode
    finally:
        prediction.SELECTOR_GRID_SCALE, evaluate.decode = scale, evaluator_decode


def _metrics(bundle, folder: LabelledFolder) -> dict:
    m = evaluate.run_evaluation(bundle.model, bundle.config, folder, torch.device("cpu"), progress=False)
    metrics = m.metrics(bundle.config.class_names)
    out = {"miou": metrics["miou"]}
    for s in UNCERTAINTY_SOURCES:
        out[f"auroc_{s}"] = metrics["uncertainty"][s]["auroc"]
        out[f"aupr_{s}"] = metrics["uncertainty"][s]["aupr"]
    for name, c in metrics["calibration"].items():
        out[f"ece_{name}"] = c["ece"]
    return out


@torch.no_grad()
def measure(bundle, folder: LabelledFolder, variants: list[str], timing_frames: int, timing_rounds: int) -> dict:
    """Per variant: agreement with "every pixel", metric differences, median decode time."""
    cfg = bundle.config
    size_in = (cfg.input.height, cfg.input.width)
    agree = {v: {"labels": [0, 0], "mask": [0, 0], "worst_labels": 1.0, "worst_mask": 1.0} for v in variants}
    timed = []
    for i in range(len(folder)):
        image, _ = folder.read(i)
        logits, loss = bundle.model(to_input(torch.from_numpy(image)[None], size_in, cfg.input.mean, cfg.input.std))
        args = (logits, loss, image.shape[:2], cfg.calibration, cfg.uncertainty_source, cfg.mask_threshold)
        if i < timing_frames:
            timed.append(args)
        preds = {}
        for v in variants:
            with decoding(v) as decode:
                preds[v] = decode(*args, selector=bundle.model.selector)
        ref = preds[EVERY_PIXEL]
        for v, p in preds.items():
            for name in ("labels", "mask"):
                same = int((getattr(p, name) == getattr(ref, name)).sum())
                agree[v][name][0] += same
                agree[v][name][1] += ref.labels.numel()
                agree[v][f"worst_{name}"] = min(agree[v][f"worst_{name}"], same / ref.labels.numel())
    times = {v: [] for v in variants}
    for _ in range(timing_rounds):  # variants interleaved frame by frame, so that other load weighs on all alike
        for args in timed:
            for v in variants:
                with decoding(v) as decode:
                    start = time.perf_counter()
                    decode(*args, selector=bundle.model.selector)
                    times[v].append((time.perf_counter() - start) * 1e3)
    metrics = {}
    for v in variants:
        with decoding(v):
            metrics[v] = _metrics(bundle, folder)
    rows = {}
    for v in variants:
        rows[v] = {
            "labels_equal": agree[v]["labels"][0] / agree[v]["labels"][1], "labels_equal_worst_frame": agree[v]["worst_labels"],
            "mask_equal": agree[v]["mask"][0] / agree[v]["mask"][1], "mask_equal_worst_frame": agree[v]["worst_mask"],
            "metrics": metrics[v], "metric_deltas": {k: metrics[v][k] - metrics[EVERY_PIXEL][k] for k in metrics[v]},
            "decode_ms_median": statistics.median(times[v]) if times[v] else None,
        }
    return {"frames": len(folder), "pixels": agree[EVERY_PIXEL]["labels"][1], "timed_decodes": len(times[EVERY_PIXEL]),
            "variants": rows}


def markdown(result: dict) -> str:
    lines = ["# Where decode runs the selective scaler's selector", "",
             "Produced by `python benchmarks/decode_resolution.py` (the command below); see its docstring for the "
             "variants. Agreement: fraction of pixels equal to the selector on every pixel (all frames / worst frame). "
             "Metric columns: the evaluator's figures minus those of \"every pixel\" (max-softmax AUROC and AUPR, "
             "the published source; ECE of the calibrated confidence). decode: median ms of one 480x360 decode, "
             "variants interleaved frame by frame (decodes timed per variant in the heading).", "",
             "```", result["command"], "```", "",
             f"- Bundle `{result['bundle']}` (model id {result['model_id']}), shipped selector grid: "
             f"{result['selector_grid_scale']}x the network's {result['network_grid'][0]}x{result['network_grid'][1]} grid.",
             f"- Machine: {result['machine']}, {result['threads']} torch threads; torch {result['torch']}; "
             f"load average at start {result['load_average']}, at the end {result['load_average_end']}; {result['date']}.", ""]
    for split, r in result["splits"].items():
        lines += [f"## {split} ({r['frames']} frames, {r['pixels']} pixels; {r['timed_decodes']} timed decodes)", "",
                  "| selector on | labels equal | mask equal | mIoU | AUROC | AUPR | ECE | decode ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, row in r["variants"].items():
            d = row["metric_deltas"]
            ece = d.get("ece_calibrated", d.get("ece_uncalibrated"))
            lines.append(
                f"| {v} | {100 * row['labels_equal']:.3f}% / {100 * row['labels_equal_worst_frame']:.3f}% "
                f"| {100 * row['mask_equal']:.3f}% / {100 * row['mask_equal_worst_frame']:.3f}% "
                f"| {d['miou']:+.5f} | {d['auroc_max_softmax']:+.5f} | {d['aupr_max_softmax']:+.5f} | {ece:+.5f} "
                f"| {row['decode_ms_median']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="camvid_demo", help="a selectively calibrated bundle (default: camvid_demo)")
    p.add_argument("--camvid", default="../shared/data/camvid", help="the CamVid folder (default: ../shared/data/camvid)")
    p.add_argument("--splits", nargs="+", default=["day/test", "dusk/test"], help="labelled splits under --camvid")
    p.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4, 8], help="selector grids, times the network's")
    p.add_argument("--timing-frames", type=int, default=10, help="frames per split whose decode is timed (default: 10)")
    p.add_argument("--timing-rounds", type=int, default=5, help="timed passes over those frames (default: 5)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="write the Markdown report here")
    args = p.parse_args(argv)
    path = resolve_bundle(args.bundle)
    bundle = load_bundle(path)
    if not bundle.config.calibration.needs_selector:
        raise SystemExit(f"{path} is not selectively calibrated: it has no selector to place")
    variants = [EVERY_PIXEL, *(f"{s}x grid" for s in args.scales), GRID_MAPS]
    result = {
        "command": "python benchmarks/decode_resolution.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "bundle": str(args.bundle), "model_id": bundle.model_id, "selector_grid_scale": prediction.SELECTOR_GRID_SCALE,
        "network_grid": [bundle.config.input.height // 14, bundle.config.input.width // 14],
        "machine": f"{platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": {},
    }
    for split in args.splits:
        result["splits"][split] = measure(bundle, LabelledFolder(Path(args.camvid) / split), variants, args.timing_frames,
                                          args.timing_rounds)
        for v, row in result["splits"][split]["variants"].items():
            d = row["metric_deltas"]
            print(f"{split:10s} {v:12s} labels {100 * row['labels_equal']:.3f}% mask {100 * row['mask_equal']:.3f}% "
                  f"(worst {100 * row['mask_equal_worst_frame']:.3f}%) AUROC {d['auroc_max_softmax']:+.5f} "
                  f"AUPR {d['aupr_max_softmax']:+.5f} decode {row['decode_ms_median']:.1f} ms", flush=True)
    result["load_average_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, markdown(result) + "\n")


if __name__ == "__main__":
    main()

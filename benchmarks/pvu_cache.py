"""How much caching the frozen network's features speeds up training the loss-prediction head (PVU).

The same head, the same batches and pairs (``uncertain_seg_training.pvu``), trained twice: from the
memory-mapped feature cache, and with the frozen network computing the features every step. Prints
a table (median of ``--repeats`` timings, wall and process CPU seconds) and writes JSON.

    python benchmarks/pvu_cache.py --bundle camvid_day --data ../shared/data/camvid/day/val --steps 100
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from uncertain_seg_ros.atomic_io import atomic_write_text
from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_training.datasets import LabelledFolder
from uncertain_seg_training.distributed import resolve_device
from uncertain_seg_training.pvu import (
    CachedBatches,
    ComputedBatches,
    HeadTraining,
    HeldOutViews,
    batch_order,
    cache_features,
    train_loss_head,
)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="camvid_day")
    p.add_argument("--data", type=Path, default=Path("../shared/data/camvid/day/val"), help="held-out labelled frames")
    p.add_argument("--views", type=int, default=1, help="views per frame (view 0: the whole frame)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pvu_cache.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bundle = load_bundle(resolve_bundle(args.bundle), device)
    config, model = bundle.config, bundle.model.eval()
    views = HeldOutViews(LabelledFolder(args.data), config, args.views)
    training = HeadTraining(steps=args.steps, batch_size=args.batch_size)
    order = batch_order(len(views), args.batch_size, args.steps, training.seed)
    channels = config.model.backbone.embed_dim * config.model.n_last_blocks
    hidden = config.model.uncertainty_hidden
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        build = _timed(lambda: cache_features(model, views, cache, device, progress=False))
        size_mb = sum(f.stat().st_size for f in cache.iterdir()) / 1e6
        runs = {"cached": [], "uncached": []}
        for _ in range(args.repeats):
            runs["cached"].append(_timed(lambda: train_loss_head(CachedBatches(cache, order, device), channels, hidden, training,
                                                                 device, progress=False)))
            runs["uncached"].append(_timed(lambda: train_loss_head(ComputedBatches(model, views, order, device), channels, hidden,
                                                                   training, device, progress=False)))
    median = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
    result = {
        "bundle": args.bundle, "data": str(args.data), "views": len(views), "steps": args.steps, "batch_size": args.batch_size,
        "threads": args.threads, "device": str(device), "repeats": args.repeats, "torch": torch.__version__,
        "cache_build_s": {"wall": build[0], "cpu": build[1]}, "cache_mb": size_mb,
        "training_s": {k: {"wall": w, "cpu": c} for k, (w, c) in median.items()},
        "speedup_training": median["uncached"][0] / median["cached"][0],
        "speedup_including_cache_build": median["uncached"][0] / (median["cached"][0] + build[0]),
    }
    rows = [("cache build (once)", *build), ("head training, cached", *median["cached"]),
            ("head training, uncached", *median["uncached"])]
    print(f"{len(views)} views of {args.data}, {args.steps} steps of {args.batch_size}, {args.threads} threads, {device}")
    print(f"{'what':28s} {'wall s':>9s} {'cpu s':>9s}")
    for name, wall, cpu in rows:
        print(f"{name:28s} {wall:9.2f} {cpu:9.2f}")
    print(f"speed-up of training: {result['speedup_training']:.1f}x; including the cache build: "
          f"{result['speedup_including_cache_build']:.1f}x; cache {size_mb:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

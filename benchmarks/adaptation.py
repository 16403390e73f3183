"""The adaptation experiment: does adapting to dusk make the published uncertainty flag wrong pixels?

CamVid day -> dusk, every arm x seed a separate, resumable unit (``--jobs N`` runs N at once, one
torch thread each), then one report with intervals. What is run:

- **Data.** Source: day/train (labelled). Target: dusk/unlabeled, packed into a rosbag2 by the
  project's writer and read back by ``adapt`` through the bag reader. The 31 labelled dusk/test
  frames, consecutive in time, are split once: the earliest ``tune_frames`` (10) are the
  tuning/calibration part, the other 21 the test part, reported once. A second, larger labelled
  target: day/test (171 frames, another drive) through the photometric dusk transform
  (``uncertain_seg_training.photometric``, seeded per frame). day/test itself measures the
  in-domain cost. day/val trains the cached-feature PVU head (held out from every training run).
- **Source models with a trained mask token.** ``models/camvid_day`` was trained without masking
  (its mask token is zero and was never used). Per seed, ``train --init-bundle camvid_day
  --mask-ratio-max 0.5`` continues it for ``source_steps`` with random patch masking (a ratio drawn
  per image from [0, 0.5]), so the query branch later sees a token the network has learnt. These
  continued models are the **source** arm; every other arm of a seed starts from that seed's.
- **Arms** (``ARMS``): source; control (the adaptation loop, source loss only: same steps, batches,
  optimiser); BatchNorm re-estimation on the target frames; Masked gamma-SSL; masked pseudo-label
  consistency with a multi-scale EMA teacher (MaskMatch's masked consistency part, not its whole
  scheme); both; gamma-SSL with the backbone frozen (heads and mask token trained). Plus the
  shipped ``camvid_day`` as it is (one deterministic model).
- **Hyper-parameters are fixed a priori**, none chosen by looking at any dusk label: tau = 1 (the
  paper's 0.1 divides Mask2Former class scores bounded in [0, 1]; this head's logits are trained by
  cross-entropy at temperature 1, so tau = 1 gives the consistency loss the supervised loss's
  sharpness; it is also the value an earlier run tuned on the test frames, so it is not independent
  of that history); mask ratios 0.5 (gamma-SSL, the paper's) and 0.7 (pseudo-label student);
  learning rate 5e-5 (a tenth of the source's peak, the usual fine-tuning step) for every trained arm;
  the mask token's learning rate lets Adam move each of its components by about the patch
  embeddings' scale (std 0.57) within the continuation.
- **Per unit**: calibration fitted on the tuning part (temperature; selective scaling on top of it
  with the balanced and with the authors' duplicate weighting, the selector fitted on the first 7
  tuning frames and its step / T_sel chosen on the last 3), the PVU head trained from cached features
  of the frozen network on day/val, then one evaluation pass per labelled set that keeps per-frame
  sufficient statistics (``uncertain_seg_training.frame_stats``, uncertainty histograms at
  ``frame_bins`` bins).
- **Report** (``benchmarks/results/adaptation.{md,json}`` + PNGs): per arm, mean +- sd over seeds
  and a 95% block bootstrap interval over frames (blocks of consecutive frames, the same resamples
  for every arm and seed, so differences are paired), for AUROC, AUPR and AUPR minus the error rate,
  max F0.5 and F0.5 minus its flag-nothing floor, FPR95, ECE pooled and image-wise, mIoU; on the
  dusk test part, the synthetic dusk frames and day/test.

    python benchmarks/adaptation.py --camvid ../shared/data/camvid --jobs 2          # the experiment
    python benchmarks/adaptation.py --smoke --work /tmp/smoke --out /tmp/smoke/results  # seconds, generated data
    python benchmarks/adaptation.py --estimate-from runs/adaptation_timing           # project the full run's time

Every unit writes its outputs atomically and a ``done.json`` last; a unit whose ``done.json``
exists is skipped, and a killed training unit resumes from its checkpoint, so running the same
command again continues a killed run.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from uncertain_seg_ros.atomic_io import atomic_directory, atomic_write_text
from uncertain_seg_ros.bags import write_image_bag
from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.image_files import list_images, read_rgb
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_training.adapt import AdaptConfig, adapt
from uncertain_seg_training.bootstrap import block_bootstrap_weights, percentile_interval
from uncertain_seg_training.calibrate import selection_frames
from uncertain_seg_training.calibration_fit import SelectorOptions, collect_pixels, fit_calibration
from uncertain_seg_training.datasets import LabelledFolder, find_classes_file
from uncertain_seg_training.distributed import resolve_device
from uncertain_seg_training.evaluate import run_evaluation
from uncertain_seg_training.frame_stats import FrameStatistics
from uncertain_seg_training.photometric import dusk_transform
from uncertain_seg_training.pvu import HeadTraining, fit_loss_head
from uncertain_seg_training.train import TrainConfig, train

log = logging.getLogger("adaptation")

# arm -> (description, adapt method or None for no adaptation, extra AdaptConfig values)
ARMS: dict[str, tuple[str, str | None, dict]] = {
    "source": ("continued source model (random patch masking), not adapted", None, {}),
    "control": ("adaptation loop, source loss only", "control", {}),
    "bn_stats": ("BatchNorm statistics re-estimated on the target frames", "bn_stats", {}),
    "gamma_ssl": ("Masked gamma-SSL", "gamma_ssl", {}),
    "masked_pl": ("masked pseudo-label consistency, multi-scale EMA teacher", "maskmatch", {}),
    "both": ("Masked gamma-SSL + masked pseudo-label consistency", "both", {}),
    "gamma_ssl_frozen": ("Masked gamma-SSL, backbone frozen (heads + mask token)", "gamma_ssl", {"backbone_lr_mult": 0.0}),
}
SHIPPED = "shipped"  # the base bundle as it is
SETS = ("dusk_tune", "dusk_test", "synth_dusk", "day_test")
REPORTED_SETS = {"dusk_test": "dusk test part", "synth_dusk": "synthetic dusk (day/test)", "day_test": "day/test (in-domain)"}
SCORES = {"max_softmax": "max-softmax", "learned": "learned (joint)", "learned_pvu": "learned (PVU, cached)",
          "selective_duplicate/max_softmax": "max-softmax, selective (x2)"}
CALIBRATIONS = ("uncalibrated", "temperature", "selective_balanced", "selective_duplicate")
DETECTION = ("auroc", "aupr", "aupr_minus_error_rate", "max_f05", "max_f05_minus_floor", "fpr95")


@dataclass(frozen=True)
class Experiment:
    """Everything that fixes the experiment's results (execution options such as --jobs are not here)."""

    camvid: str = "../shared/data/camvid"
    base_bundle: str = "camvid_day"
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    tune_frames: int = 10
    synth_seed: int = 0
    source_steps: int = 120
    source_batch: int = 8
    source_lr: float = 1e-4
    source_warmup: int = 12
    mask_ratio_max: float = 0.5
    mask_token_lr_mult: float = 50.0
    adapt_steps: int = 150
    adapt_batch: int = 4
    adapt_lr: float = 5e-5
    adapt_warmup: int = 15
    tau: float = 1.0
    mask_ratio: float = 0.5
    maskmatch_ratio: float = 0.7
    pseudo_threshold: float = 0.8
    pixels_per_frame: int = 20000
    selector_steps: int = 1000
    selector_val_fraction: float = 0.3
    pvu_views: int = 1
    pvu_steps: int = 200
    pvu_batch: int = 8
    frame_bins: int = 1000
    replicates: int = 1000
    blocks: tuple[tuple[str, int], ...] = (("dusk_tune", 2), ("dusk_test", 3), ("synth_dusk", 5), ("day_test", 5))
    smoke: bool = False

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def smoke_test(cls, camvid: Path, base_bundle: Path) -> "Experiment":
        """Seconds on generated frames: every unit kind, two seeds, a handful of steps."""
        return cls(camvid=str(camvid), base_bundle=str(base_bundle), seeds=(0, 1), tune_frames=3, source_steps=2,
                   source_batch=2, source_warmup=1, adapt_steps=2, adapt_batch=2, adapt_warmup=1, pixels_per_frame=500,
                   selector_steps=20, pvu_steps=3, pvu_batch=2, frame_bins=100, replicates=50,
                   blocks=(("dusk_tune", 1), ("dusk_test", 2), ("synth_dusk", 2), ("day_test", 2)), smoke=True)


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str  # prepare, source, adapt, eval
    arm: str = ""
    seed: int = -1
    deps: tuple[str, ...] = ()


def plan(exp: Experiment) -> list[Unit]:
    """Every unit of the experiment, dependencies first."""
    units = [Unit("prepare", "prepare")]
    for seed in exp.seeds:
        units.append(Unit(f"source-s{seed}", "source", "source", seed))
    for seed in exp.seeds:
        for arm in exp.arms:
            if ARMS[arm][1] is not None:
                units.append(Unit(f"adapt-{arm}-s{seed}", "adapt", arm, seed, ("prepare", f"source-s{seed}")))
    units.append(Unit(f"eval-{SHIPPED}", "eval", SHIPPED, -1, ("prepare",)))
    for seed in exp.seeds:
        for arm in exp.arms:
            model_unit = f"source-s{seed}" if ARMS[arm][1] is None else f"adapt-{arm}-s{seed}"
            units.append(Unit(f"eval-{arm}-s{seed}", "eval", arm, seed, ("prepare", model_unit)))
    return units


# --------------------------------------------------------------------------- paths


class Work:
    """The experiment's working folder: data/, units/<name>/, logs/, experiment.json."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.data = self.root / "data"

    def unit(self, name: str) -> Path:
        return self.root / "units" / name

    def done(self, name: str) -> dict | None:
        path = self.unit(name) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def bundle_of(self, exp: Experiment, arm: str, seed: int) -> Path:
        if arm == SHIPPED:
            return resolve_bundle(exp.base_bundle)
        if ARMS[arm][1] is None:
            return self.unit(f"source-s{seed}") / "bundle"
        return self.unit(f"adapt-{arm}-s{seed}") / "bundle"

    def labelled(self, exp: Experiment, name: str) -> Path:
        return Path(exp.camvid) / "day" / "test" if name == "day_test" else self.data / name


def _finish(work: Work, unit: Unit, exp: Experiment, started: tuple[float, float], extra: dict) -> None:
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    record = {"unit": unit.name, "experiment": exp.digest(), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
              "threads": torch.get_num_threads(), **extra}
    atomic_write_text(work.unit(unit.name) / "done.json", json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------- units


def _labelled_subset(folder: Path, stems: list[str], out: Path, classes_file: Path) -> None:
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True)
    for stem in stems:
        image = next((folder / "images").glob(f"{stem}.*"))
        os.symlink(image.resolve(), out / "images" / image.name)
        os.symlink((folder / "labels" / f"{stem}.png").resolve(), out / "labels" / f"{stem}.png")
    shutil.copy(classes_file, out / "classes.yaml")


def prepare(exp: Experiment, work: Work) -> dict:
    """The dusk bag, the tuning / test split of dusk/test, and the synthetic dusk frames (one atomic folder)."""
    cam = Path(exp.camvid)
    dusk = cam / "dusk" / "test"
    classes_file = find_classes_file(dusk)
    stems = [p.stem for p in list_images(dusk / "images")]
    if not 0 < exp.tune_frames < len(stems):
        raise ValueError(f"tune_frames must split the {len(stems)} dusk/test frames, got {exp.tune_frames}")
    with atomic_directory(work.data) as tmp:
        write_image_bag(cam / "dusk" / "unlabeled" / "images", tmp / "dusk_bag", topic="/camera/image_raw", fps=1.0, start_ns=0)
        _labelled_subset(dusk, stems[: exp.tune_frames], tmp / "dusk_tune", classes_file)
        _labelled_subset(dusk, stems[exp.tune_frames :], tmp / "dusk_test", classes_file)
        day = LabelledFolder(cam / "day" / "test")
        synth = tmp / "synth_dusk"
        _labelled_subset(cam / "day" / "test", [], synth, classes_file)
        for i, (image, label) in enumerate(zip(day.images, day.labels)):
            out = dusk_transform(read_rgb(image), [exp.synth_seed, i])
            cv2.imwrite(str(synth / "images" / f"{image.stem}.png"), cv2.cvtColor(out, cv2.COLOR_RGB2BGR))
            os.symlink(label.resolve(), synth / "labels" / label.name)
    return {"tune": stems[: exp.tune_frames], "test": stems[exp.tune_frames :], "synth_frames": len(day),
            "target_frames": len(list_images(cam / "dusk" / "unlabeled" / "images"))}


def _train_source(exp: Experiment, work: Work, seed: int, device: str) -> dict:
    out = work.unit(f"source-s{seed}")
    cfg = TrainConfig(data=str(Path(exp.camvid) / "day" / "train"), init_bundle=exp.base_bundle, out=str(out),
                      steps=exp.source_steps, batch_size=exp.source_batch, lr=exp.source_lr, warmup_steps=exp.source_warmup,
                      mask_ratio_max=exp.mask_ratio_max, mask_token_lr_mult=exp.mask_token_lr_mult, class_weighting="source",
                      seed=seed, workers=0, device=device, checkpoint_every=max(1, exp.source_steps // 4), log_every=1,
                      name=f"{Path(exp.base_bundle).name}-masked-s{seed}", resume=(out / "checkpoint" / "state.json").is_file())
    train(cfg)
    return {"steps": exp.source_steps, **_step_cost(out)}


def _adapt_arm(exp: Experiment, work: Work, arm: str, seed: int, device: str) -> dict:
    out = work.unit(f"adapt-{arm}-s{seed}")
    _, method, extra = ARMS[arm]
    cfg = AdaptConfig(bundle=str(work.bundle_of(exp, "source", seed)), data=str(Path(exp.camvid) / "day" / "train"),
                      target_bags=(str(work.data / "dusk_bag"),), method=method, out=str(out), steps=exp.adapt_steps,
                      batch_size=exp.adapt_batch, lr=exp.adapt_lr, warmup_steps=exp.adapt_warmup, tau=exp.tau,
                      mask_ratio=exp.mask_ratio, maskmatch_ratio=exp.maskmatch_ratio, pseudo_threshold=exp.pseudo_threshold,
                      mask_token_lr_mult=exp.mask_token_lr_mult, workers=0, device=device, dedupe=0.0, seed=seed,
                      checkpoint_every=max(1, exp.adapt_steps // 4), log_every=1, name=f"{arm}-s{seed}",
                      resume=(out / "checkpoint" / "state.json").is_file(), **extra)
    adapt(cfg)
    return {"steps": 0 if method == "bn_stats" else exp.adapt_steps, **_step_cost(out)}


def _step_cost(out: Path) -> dict:
    """CPU seconds per optimisation step, from the run's log (first logged step excluded: warm-up)."""
    path = out / "train_log.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    lines = [x for x in lines if "cpu_s" in x]
    if len(lines) < 2:
        return {}
    return {"step_cpu_s": (lines[-1]["cpu_s"] - lines[0]["cpu_s"]) / (lines[-1]["step"] - lines[0]["step"])}


def _evaluate_arm(exp: Experiment, work: Work, arm: str, seed: int, device: torch.device) -> dict:
    """Calibration fits and the PVU head on held-out frames, then one pass per labelled set keeping frame statistics."""
    out = work.unit(f"eval-{arm}-s{seed}" if arm != SHIPPED else f"eval-{SHIPPED}")
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(work.bundle_of(exp, arm, seed), device)
    model, config = bundle.model.eval(), replace(bundle.config, calibration=Calibration())
    fit_seed = max(seed, 0)
    timing: dict = {}
    t = time.process_time()
    tune = LabelledFolder(work.labelled(exp, "dusk_tune"))
    sample = collect_pixels(model, config, tune, device, exp.pixels_per_frame, fit_seed, progress=False)
    timing["collect_cpu_s"] = time.process_time() - t
    val_frames = selection_frames(len(tune), exp.selector_val_fraction)
    variants, fits = {}, {}
    for name, method, weighting in (("temperature", "temperature", "balanced"), ("selective_balanced", "selective", "balanced"),
                                    ("selective_duplicate", "selective", "duplicate")):
        t = time.process_time()
        options = SelectorOptions(val_frames, weighting, steps=exp.selector_steps, seed=fit_seed)
        calibration, selector = fit_calibration(sample, method, options, device, progress=False)
        timing[f"fit_{name}_cpu_s"] = time.process_time() - t
        variants[name], fits[name] = (calibration, selector), calibration.to_dict()
    t = time.process_time()
    head, pvu = fit_loss_head(model, config, LabelledFolder(Path(exp.camvid) / "day" / "val"), out / "pvu_cache", exp.pvu_views,
                              HeadTraining(steps=exp.pvu_steps, batch_size=exp.pvu_batch, seed=fit_seed), device, progress=False)
    timing["pvu_cpu_s"], timing["pvu_views"] = time.process_time() - t, pvu["views"]
    shutil.rmtree(out / "pvu_cache")
    frames = 0
    t = time.process_time()
    for name in SETS:
        folder = LabelledFolder(work.labelled(exp, name))
        ev = run_evaluation(model, config, folder, device, progress=False, variants=variants, heads={"learned_pvu": head},
                            frame_bins=exp.frame_bins)
        ev.frame_stats.save(out / f"stats_{name}.npz")
        frames += len(folder)
    timing["eval_cpu_s"] = time.process_time() - t
    timing["eval_frames"] = frames
    atomic_write_text(out / "fits.json", json.dumps({"calibration": fits, "pvu": pvu, "model_id": bundle.model_id,
                                                     "bundle": str(work.bundle_of(exp, arm, seed))}, indent=2, default=float) + "\n")
    return timing


def run_unit(exp: Experiment, work: Work, unit: Unit, device: str, threads: int) -> None:
    """Run one unit in this process (skipped when its done.json exists)."""
    if work.done(unit.name):
        return
    torch.set_num_threads(threads)
    started = (time.perf_counter(), time.process_time())
    if unit.kind == "prepare":
        extra = prepare(exp, work)
        work.unit(unit.name).mkdir(parents=True, exist_ok=True)
    elif unit.kind == "source":
        extra = _train_source(exp, work, unit.seed, device)
    elif unit.kind == "adapt":
        extra = _adapt_arm(exp, work, unit.arm, unit.seed, device)
    else:
        extra = _evaluate_arm(exp, work, unit.arm, unit.seed, resolve_device(device))
    _finish(work, unit, exp, started, extra)


# --------------------------------------------------------------------------- scheduling


def run_all(exp: Experiment, work: Work, jobs: int, threads: int, device: str, units: list[Unit]) -> None:
    """Run the pending units, at most ``jobs`` at once: in this process with one job, else one subprocess
    each (one torch thread each by default), dependencies first, logs in ``<work>/logs/<unit>.log``."""
    pending = [u for u in units if not work.done(u.name)]
    bar = tqdm(total=len(units), initial=len(units) - len(pending), desc="experiment units", unit="unit")
    if jobs == 1:
        for unit in pending:
            bar.set_postfix_str(unit.name)
            run_unit(exp, work, unit, device, threads)
            bar.update(1)
        bar.close()
        return
    (work.root / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    failed: list[str] = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    while pending or running:
        ready = [u for u in pending if all(work.done(d) for d in u.deps)]
        while ready and len(running) < jobs and not failed:
            unit = ready.pop(0)
            pending.remove(unit)
            logfile = open(work.root / "logs" / f"{unit.name}.log", "ab")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work.root), "--unit", unit.name,
                   "--threads", str(threads), "--device", device]
            running[unit.name] = (subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env), logfile)
        if not running:
            if failed or pending:
                raise RuntimeError(f"units failed: {failed or 'none'}; not run: {[u.name for u in pending]} "
                                   f"(logs in {work.root / 'logs'}; run the same command again to continue)")
            break
        time.sleep(0.2)
        for name, (proc, logfile) in list(running.items()):
            if proc.poll() is None:
                continue
            logfile.close()
            del running[name]
            if proc.returncode != 0 or not work.done(name):
                failed.append(name)
                log.error("unit %s failed (exit %s); see %s", name, proc.returncode, work.root / "logs" / f"{name}.log")
            bar.update(1)
            bar.set_postfix_str(name)
    bar.close()
    if failed:
        raise RuntimeError(f"units failed: {failed} (logs in {work.root / 'logs'}; run the same command again to continue)")


# --------------------------------------------------------------------------- report


def _metric_vector(stats: FrameStatistics, weights: np.ndarray | None) -> dict[str, float]:
    """The reported figures of one model on one (resampled) set, flat: ``score:metric``, ``ece:cal``, ``miou``."""
    confusion, curves, calibration = stats.pooled(weights)
    out = {"miou": confusion.miou(), "pixel_accuracy": confusion.pixel_accuracy()}
    for score in SCORES:
        d = curves[score].to_dict()
        out.update({f"{score}:{m}": d[m] for m in (*DETECTION, "error_rate")})
    for cal in CALIBRATIONS:
        out[f"ece:{cal}"] = calibration[cal].ece()
        out[f"ece_image:{cal}"] = stats.image_ece(cal, weights)
    return out


def _models(exp: Experiment) -> list[tuple[str, list[int]]]:
    return [(SHIPPED, [-1]), *((arm, list(exp.seeds)) for arm in exp.arms)]


def _eval_dir(work: Work, arm: str, seed: int) -> Path:
    return work.unit(f"eval-{SHIPPED}" if arm == SHIPPED else f"eval-{arm}-s{seed}")


def summarise(exp: Experiment, work: Work) -> dict:
    """Point figures, seed spread and paired block-bootstrap intervals of every arm on every set."""
    blocks = dict(exp.blocks)
    result: dict = {"sets": {}, "selection": {}}
    for set_name in SETS:
        stats = {(arm, s): FrameStatistics.load(_eval_dir(work, arm, s) / f"stats_{set_name}.npz") for arm, seeds in _models(exp) for s in seeds}
        n = len(next(iter(stats.values())))
        # the tuning part only selects (point figures); its replicates are not reported
        replicates = exp.replicates if set_name in REPORTED_SETS else 1
        weights = block_bootstrap_weights(n, blocks[set_name], replicates, seed=SETS.index(set_name))
        point = {key: _metric_vector(fs, None) for key, fs in stats.items()}
        keys = list(next(iter(point.values())))
        reps = {}
        for key, fs in tqdm(stats.items(), desc=f"bootstrap {set_name}", unit="model"):
            vectors = [_metric_vector(fs, w) for w in weights]
            reps[key] = np.array([[v[k] for k in keys] for v in vectors])
        arms: dict = {}
        for arm, seeds in _models(exp):
            values = np.array([[point[(arm, s)][k] for k in keys] for s in seeds])
            boot = np.mean([reps[(arm, s)] for s in seeds], axis=0)
            arms[arm] = {k: {"mean": float(values[:, j].mean()), "sd": float(values[:, j].std(ddof=1)) if len(seeds) > 1 else None,
                             "seeds": values[:, j].tolist(), "ci95": percentile_interval(boot[:, j])} for j, k in enumerate(keys)}
            for ref in ("control", "source"):
                if ref in exp.arms and arm not in (ref, SHIPPED):
                    diff = np.mean([reps[(arm, s)] - reps[(ref, s)] for s in seeds], axis=0)
                    arms[arm][f"minus_{ref}"] = {k: {"mean": float(np.mean([point[(arm, s)][k] - point[(ref, s)][k] for s in seeds])),
                                                     "ci95": percentile_interval(diff[:, j])} for j, k in enumerate(keys)}
        result["sets"][set_name] = {"frames": n, "block": blocks[set_name], "arms": arms}
    tune = result["sets"]["dusk_tune"]["arms"]
    candidates = [a for a in exp.arms if a != "source"] or list(exp.arms)
    best = max(candidates, key=lambda a: (tune[a]["max_softmax:auroc"]["mean"], tune[a]["miou"]["mean"]))
    result["selection"] = {"criterion": "highest mean max-softmax AUROC (uncalibrated) over seeds on the dusk tuning part",
                           "arm": best, "values": {a: tune[a]["max_softmax:auroc"]["mean"] for a in candidates}}
    return result


def _fmt(entry: dict, digits: int = 3) -> str:
    lo, hi = entry["ci95"]
    sd = f" ± {entry['sd']:.{digits}f}" if entry.get("sd") is not None else ""
    return f"{entry['mean']:.{digits}f}{sd} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _diff(entry: dict, digits: int = 3) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _figure_intervals(exp: Experiment, summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [SHIPPED, *exp.arms]
    fig = Figure(figsize=(4.2 * len(REPORTED_SETS), 7), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(REPORTED_SETS), squeeze=False)
    for col, (set_name, title) in enumerate(REPORTED_SETS.items()):
        arms = summary["sets"][set_name]["arms"]
        for row, (metric, label) in enumerate((("max_softmax:auroc", "AUROC (max-softmax)"),
                                               ("max_softmax:aupr_minus_error_rate", "AUPR − error rate (max-softmax)"))):
            ax = axes[row][col]
            for i, arm in enumerate(names):
                e = arms[arm][metric]
                lo, hi = e["ci95"]
                ax.errorbar([i], [e["mean"]], yerr=[[e["mean"] - lo], [hi - e["mean"]]], fmt="o", capsize=4, color="C0")
                ax.plot([i] * len(e["seeds"]), e["seeds"], ".", color="C1", ms=5)
            ax.axhline(0.5 if metric.endswith("auroc") else 0.0, color="k", lw=0.8, ls="--")
            ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
            ax.set_title(f"{title}", fontsize=9)
            ax.set_ylabel(label, fontsize=8)
    fig.suptitle("mean over seeds with 95% block-bootstrap interval (blue), seeds (orange); dashed: chance", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _figure_reliability(exp: Experiment, work: Work, arms: list[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(arms), 4.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(arms), squeeze=False)[0]
    for ax, arm in zip(axes, arms):
        seeds = [-1] if arm == SHIPPED else list(exp.seeds)
        pooled = [FrameStatistics.load(_eval_dir(work, arm, s) / "stats_dusk_test.npz").pooled()[2] for s in seeds]
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for cal in CALIBRATIONS:
            bins = pooled[0][cal]
            for other in pooled[1:]:
                bins.merge(other[cal])
            r = bins.reliability()
            keep = r["count"] > 0
            ax.plot(r["confidence"][keep], r["accuracy"][keep], "o-", ms=3, label=f"{cal} (ECE {bins.ece():.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{arm}: dusk test part, seeds pooled")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


READING = "adaptation_reading.md"


def _reading(out: Path) -> str:
    """The reading of the figures, written by a person from the intervals (``<out>/adaptation_reading.md``):
    what they support is a judgement this script does not make."""
    path = out / READING
    if path.is_file():
        return path.read_text().strip()
    return f"Not written yet: put it in `{READING}` beside this report, from the intervals above, and run with --report-only."


def write_report(exp: Experiment, work: Work, out: Path, command: str) -> Path:
    """adaptation.md + adaptation.json + adaptation.png + adaptation_reliability.png in ``out``."""
    summary = summarise(exp, work)
    timings = {u.name: work.done(u.name) for u in plan(exp)}
    total_wall = sum(t["wall_s"] for t in timings.values())
    total_cpu = sum(t["cpu_s"] for t in timings.values())
    prepared = timings["prepare"]
    out.mkdir(parents=True, exist_ok=True)
    _figure_intervals(exp, summary, out / "adaptation.png")
    selected = summary["selection"]["arm"]
    _figure_reliability(exp, work, ["source", selected] if selected != "source" else ["source"], out / "adaptation_reliability.png")
    fits = {f"{arm}/s{s}": json.loads((_eval_dir(work, arm, s) / "fits.json").read_text()) for arm, seeds in _models(exp) for s in seeds}
    atomic_write_text(out / "adaptation.json", json.dumps({"experiment": asdict(exp), "command": command, "summary": summary,
                                                           "fits": fits, "timings": timings}, indent=1, default=float) + "\n")
    seeds = ", ".join(map(str, exp.seeds))
    lines = [
        "# Adaptation to dusk: CamVid day -> dusk, every arm x 3 seeds, with intervals" if not exp.smoke else
        "# Adaptation experiment: SMOKE RUN on generated frames (checks the machinery, not the methods)",
        "",
        f"Reproduce: `{command}`",
        "",
        f"Units: {len(timings)}, {total_wall / 3600:.2f} h of unit wall time, {total_cpu / 3600:.2f} h CPU "
        f"(run with parallel jobs, so the elapsed time is less). Experiment digest `{exp.digest()}`; "
        f"configuration in [adaptation.json](adaptation.json).",
        "",
        "## What was run",
        "",
        f"- Source models: `{exp.base_bundle}` continued for {exp.source_steps} steps of {exp.source_batch} crops on day/train "
        f"with random patch masking (ratio per image uniform in [0, {exp.mask_ratio_max}], mask-token LR x{exp.mask_token_lr_mult:g}), "
        f"lr {exp.source_lr:g}, its own class weighting; one per seed ({seeds}).",
        f"- Adaptation: {exp.adapt_steps} steps, {exp.adapt_batch} source + {exp.adapt_batch} target crops, lr {exp.adapt_lr:g}, "
        f"tau {exp.tau:g}, mask ratio {exp.mask_ratio:g} (gamma-SSL) / {exp.maskmatch_ratio:g} (pseudo-label student), "
        f"pseudo-label threshold {exp.pseudo_threshold:g}; target: dusk/unlabeled ({prepared['target_frames']} frames) through a rosbag2. "
        "Every branch in eval mode; every arm of a seed starts from that seed's source model.",
        f"- Splits: dusk/test frames in time order; tuning/calibration part = the first {exp.tune_frames} "
        f"({prepared['tune'][0]} ... {prepared['tune'][-1]}), test part = the other {len(prepared['test'])}. "
        f"Synthetic dusk: day/test ({prepared['synth_frames']} frames) through `dusk_transform` (seed {exp.synth_seed}). "
        "All hyper-parameters fixed a priori (see the runner's docstring); the tuning part fits calibration and selects the arm below.",
        f"- Calibration on the tuning part: temperature; selective scaling on top of it, balanced and the authors' x2 weighting, "
        f"selector fitted on the first {exp.tune_frames - selection_frames(exp.tune_frames, exp.selector_val_fraction)} frames, "
        f"step and T_sel chosen on the last {selection_frames(exp.tune_frames, exp.selector_val_fraction)}. "
        f"PVU head: trained from cached features of the frozen network on day/val ({exp.pvu_views} view(s) per frame, "
        f"{exp.pvu_steps} steps of {exp.pvu_batch}).",
        f"- Intervals: 95% percentile intervals of a block bootstrap over frames ({exp.replicates} replicates; blocks of "
        + ", ".join(f"{b} frames on {s}" for s, b in exp.blocks)
        + "), the same resamples for every arm and seed (differences are paired by frame and by seed). Figures are means "
        f"over seeds ± their sd; uncertainty histograms per frame at {exp.frame_bins} bins. Misclassified pixel = positive.",
        "",
        "Arms: " + "; ".join(f"**{a}**: {ARMS[a][0]}" for a in exp.arms) + f"; **{SHIPPED}**: `{exp.base_bundle}` as shipped (one model).",
        "",
    ]
    for set_name, title in REPORTED_SETS.items():
        s = summary["sets"][set_name]
        arms = s["arms"]
        lines += [f"## {title}: {s['frames']} frames", "",
                  "| arm | mIoU | error rate | AUROC | AUPR | AUPR − error rate | max F0.5 | F0.5 − floor | FPR95 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm in [SHIPPED, *exp.arms]:
            a = arms[arm]
            lines.append(f"| {arm} | {_fmt(a['miou'])} | {_fmt(a['max_softmax:error_rate'])} | "
                         + " | ".join(_fmt(a[f"max_softmax:{m}"]) for m in DETECTION) + " |")
        lines += ["", "Detection by the published score (max-softmax, uncalibrated). Other scores (AUROC, AUPR − error rate):", "",
                  "| arm | " + " | ".join(SCORES.values()) + " |", "|---|" + "---|" * len(SCORES)]
        for arm in [SHIPPED, *exp.arms]:
            lines.append(f"| {arm} | " + " | ".join(f"{_fmt(arms[arm][f'{sc}:auroc'])}; {_fmt(arms[arm][f'{sc}:aupr_minus_error_rate'])}"
                                                    for sc in SCORES) + " |")
        lines += ["", "ECE (15 bins), pooled / image-wise:", "", "| arm | " + " | ".join(CALIBRATIONS) + " |", "|---|" + "---|" * len(CALIBRATIONS)]
        for arm in [SHIPPED, *exp.arms]:
            lines.append(f"| {arm} | " + " | ".join(f"{_fmt(arms[arm][f'ece:{c}'])} / {arms[arm][f'ece_image:{c}']['mean']:.3f}"
                                                    for c in CALIBRATIONS) + " |")
        lines += ["", "Differences, paired (arm − control; arm − source):", "",
                  "| arm | ΔmIoU vs control | ΔAUROC vs control | Δ(AUPR − err) vs control | Δ(F0.5 − floor) vs control | ΔAUROC vs source | ΔmIoU vs source |",
                  "|---|---|---|---|---|---|---|"]
        for arm in exp.arms:
            a = arms[arm]
            if "minus_control" not in a or "minus_source" not in a:
                continue
            c, r = a["minus_control"], a["minus_source"]
            lines.append(f"| {arm} | {_diff(c['miou'])} | {_diff(c['max_softmax:auroc'])} | {_diff(c['max_softmax:aupr_minus_error_rate'])} | "
                         f"{_diff(c['max_softmax:max_f05_minus_floor'])} | {_diff(r['max_softmax:auroc'])} | {_diff(r['miou'])} |")
        excluded = [f"{arm} {key.replace('minus_', '− ')} {m}" for arm in exp.arms for key in ("minus_control", "minus_source")
                    for m in ("miou", "max_softmax:auroc", "max_softmax:aupr_minus_error_rate") if key in arms[arm]
                    and (arms[arm][key][m]["ci95"][0] > 0 or arms[arm][key][m]["ci95"][1] < 0)]
        lines += ["", "Differences whose 95% interval excludes 0: " + (", ".join(excluded) if excluded else "none") + ".", ""]
    sel = summary["selection"]
    lines += ["## Selection on the tuning part", "", f"Criterion (fixed before the run): {sel['criterion']}. Selected: **{sel['arm']}** "
              "(" + ", ".join(f"{a} {v:.3f}" for a, v in sel["values"].items()) + "). Its seed-0 bundle, calibrated on the tuning part, "
              "is the candidate for `models/camvid_demo`:", "",
              f"    uncertain-seg calibrate --bundle {work.bundle_of(exp, sel['arm'], exp.seeds[0])} --data {work.data / 'dusk_tune'} "
              "--method selective --selector-weighting duplicate --out models/camvid_demo", "",
              "## Reading", "", _reading(out), "",
              "![AUROC and AUPR minus the error rate per arm, with intervals](adaptation.png)", "",
              "![Reliability diagrams on the dusk test part](adaptation_reliability.png)", ""]
    atomic_write_text(out / "adaptation.md", "\n".join(lines))
    return out / "adaptation.md"


# --------------------------------------------------------------------------- time estimate


def estimate(exp: Experiment, timing_work: Work, jobs: int) -> dict:
    """Project the CPU and elapsed time of ``exp`` from a shorter run's unit timings (same data and model).

    Training units cost (their steps) x (CPU seconds per step of that kind, from the run's logs) plus
    their fixed part; evaluation units their fixed part plus the PVU and selector costs scaled to the
    steps. Elapsed time is a list schedule of the dependency graph on ``jobs`` one-thread processes.
    """
    timing_exp = _experiment_from_file(timing_work.root / "experiment.json")
    cost: dict[str, float] = {}
    for unit in plan(exp):
        key = unit.name if unit.kind in ("prepare",) else (
            f"source-s{timing_exp.seeds[0]}" if unit.kind == "source" else
            f"adapt-{unit.arm}-s{timing_exp.seeds[0]}" if unit.kind == "adapt" else
            f"eval-{SHIPPED}" if unit.arm == SHIPPED else f"eval-{unit.arm}-s{timing_exp.seeds[0]}")
        done = timing_work.done(key)
        if done is None:
            raise ValueError(f"the timing run in {timing_work.root} has no finished unit {key}")
        if unit.kind in ("source", "adapt") and done.get("steps"):
            per_step = done["step_cpu_s"]
            steps_then = done["steps"]
            steps_now = exp.source_steps if unit.kind == "source" else exp.adapt_steps
            cost[unit.name] = done["cpu_s"] + per_step * (steps_now - steps_then)
        elif unit.kind == "eval":
            views = done["pvu_views"] // timing_exp.pvu_views * exp.pvu_views  # cache build ~ views, training ~ steps x batch
            pvu = done["pvu_cpu_s"] * (exp.pvu_steps * exp.pvu_batch + views) / (
                timing_exp.pvu_steps * timing_exp.pvu_batch + done["pvu_views"])
            sel = sum(done[f"fit_{n}_cpu_s"] for n in ("selective_balanced", "selective_duplicate")) * exp.selector_steps / timing_exp.selector_steps
            fixed = done["cpu_s"] - done["pvu_cpu_s"] - sum(done[f"fit_{n}_cpu_s"] for n in ("selective_balanced", "selective_duplicate"))
            cost[unit.name] = fixed + pvu + sel
        else:
            cost[unit.name] = done["cpu_s"]
    finish: dict[str, float] = {}
    free = [0.0] * jobs
    for unit in sorted(plan(exp), key=lambda u: ("prepare", "source", "adapt", "eval").index(u.kind)):
        start = max([finish[d] for d in unit.deps] + [min(free)])
        slot = free.index(min(free))
        finish[unit.name] = start + cost[unit.name]
        free[slot] = finish[unit.name]
    return {"cpu_h": sum(cost.values()) / 3600, "elapsed_h": max(finish.values()) / 3600, "jobs": jobs,
            "per_kind_cpu_h": {k: sum(c for n, c in cost.items() if n.startswith(k)) / 3600 for k in ("prepare", "source", "adapt", "eval")}}


# --------------------------------------------------------------------------- smoke data


def write_smoke_camvid(root: Path) -> Path:
    """A tiny CamVid-shaped dataset (day/train, day/val, day/test, dusk/unlabeled, dusk/test) of generated frames."""
    rng = np.random.default_rng(0)
    classes = {"ignore_index": 3, "classes": [{"id": 0, "name": "sky", "color": [128, 128, 128]},
                                              {"id": 1, "name": "road", "color": [128, 64, 128]},
                                              {"id": 2, "name": "car", "color": [64, 0, 128]}]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    colours = np.array([[150, 180, 230], [90, 90, 90], [200, 30, 30]], np.float32)
    for split, n, dark in (("day/train", 8, 1.0), ("day/val", 4, 1.0), ("day/test", 6, 1.0), ("dusk/unlabeled", 4, 0.45), ("dusk/test", 6, 0.45)):
        (root / split / "images").mkdir(parents=True)
        if split != "dusk/unlabeled":
            (root / split / "labels").mkdir()
        for i in range(n):
            label = np.zeros((60, 80), np.uint8)
            horizon = int(rng.integers(18, 30))
            label[horizon:] = 1
            y, x = int(rng.integers(horizon, 50)), int(rng.integers(0, 60))
            label[y : y + 10, x : x + 20] = 2
            label[-1] = 3
            image = np.clip(colours[np.minimum(label, 2)] * dark + rng.normal(0, 10, (60, 80, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / split / "images" / f"f{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if split != "dusk/unlabeled":
                cv2.imwrite(str(root / split / "labels" / f"f{i:03d}.png"), label)
    return root


def smoke_setup(work: Path) -> Experiment:
    """Generated data and a tiny source bundle (2 steps of supervised training) for ``--smoke``."""
    camvid = work / "smoke_camvid"
    base = work / "smoke_base"
    if not (base / "bundle" / "checksums.sha256").is_file():
        if not camvid.is_dir():
            write_smoke_camvid(camvid)
        train(TrainConfig(data=str(camvid / "day" / "train"), backbone="demo_vitt14", input_size=(56, 70), steps=2, batch_size=2,
                          uncertainty_hidden=16, n_last_blocks=2, class_weighting="inverse_sqrt", workers=0, device="cpu",
                          warmup_steps=1, drop_path=0.1, out=str(base), name="smoke-source"))
    return Experiment.smoke_test(camvid, base / "bundle")


# --------------------------------------------------------------------------- command line


def _experiment_from_file(path: Path) -> Experiment:
    raw = json.loads(path.read_text())
    values = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v) for k, v in raw.items()}
    return Experiment(**values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Experiment()
    p.add_argument("--camvid", default=defaults.camvid, help="the CamVid copy (day/, dusk/, classes.yaml)")
    p.add_argument("--bundle", default=defaults.base_bundle, help="source model trained on day/train (default: camvid_day)")
    p.add_argument("--work", type=Path, default=Path("runs/adaptation"), help="units, data, logs (resumable)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where adaptation.{md,json} and the PNGs go")
    p.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    p.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(defaults.arms))
    for name in ("source_steps", "source_batch", "adapt_steps", "adapt_batch", "pvu_steps", "selector_steps", "replicates", "tune_frames"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    p.add_argument("--jobs", type=int, default=1, help="units run at once, each its own process (default: 1, in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per unit (default: 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="seconds on generated frames: checks the machinery, not the methods")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from finished units")
    p.add_argument("--estimate-from", type=Path, default=None, metavar="WORK",
                   help="print the projected time of this configuration from a shorter run's units in WORK, and exit")
    p.add_argument("--unit", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Work(args.work)
    if args.unit:  # a subprocess of run_all
        exp = _experiment_from_file(work.root / "experiment.json")
        unit = next(u for u in plan(exp) if u.name == args.unit)
        run_unit(exp, work, unit, args.device, args.threads)
        return 0
    if args.smoke:
        exp = smoke_setup(work.root)
        exp = replace(exp, arms=tuple(args.arms))
    else:
        exp = Experiment(camvid=args.camvid, base_bundle=args.bundle, seeds=tuple(args.seeds), arms=tuple(args.arms),
                         **{k: getattr(args, k) for k in ("source_steps", "source_batch", "adapt_steps", "adapt_batch",
                                                          "pvu_steps", "selector_steps", "replicates", "tune_frames")})
    if args.estimate_from:
        print(json.dumps(estimate(exp, Work(args.estimate_from), args.jobs), indent=2))
        return 0
    config_file = work.root / "experiment.json"
    if config_file.is_file() and _experiment_from_file(config_file) != exp:
        raise SystemExit(f"{work.root} holds units of another configuration (experiment.json differs); use another --work")
    work.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_file, json.dumps(asdict(exp), indent=2) + "\n")
    units = plan(exp)
    stale = [u.name for u in units if work.done(u.name) and work.done(u.name)["experiment"] != exp.digest()]
    if stale:
        raise SystemExit(f"units {stale} were made by another configuration; use another --work")
    if not args.report_only:
        run_all(exp, work, args.jobs, args.threads, args.device, units)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/adaptation.py " + " ".join(a for a in given if a != "--report-only")
    path = write_report(exp, work, args.out, command)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

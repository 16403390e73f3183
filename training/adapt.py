"""Adaptation to a new site from unlabelled frames: Masked gamma-SSL, masked pseudo-label consistency, baselines.

Starts from a trained bundle (stage 2) and trains on unlabelled target frames (from bags or an
image folder) while keeping the supervised loss on the labelled source data. ``--method``:

- ``gamma_ssl``, **Masked gamma-SSL** (Williams et al. 2024): a frozen copy of the input model
  (target branch) sees the full image; the trained model (query branch) sees it with a fraction of
  its 14x14 patches replaced by the mask token. With ``p = softmax(s / tau)`` the consistency loss
  is the cross-entropy ``CE(p_target, p_query)`` averaged over the pixels the query is certain
  about (``max_k p_query >= gamma``); gamma is re-set every batch so that the fraction of pixels
  below it equals the fraction where the two branches' argmax disagree.
- ``maskmatch``, **masked pseudo-label consistency** with a multi-scale EMA teacher, the masked
  consistency part of MaskMatch (Pan et al. 2023), not its whole scheme (there is no separate
  weak-to-strong branch): an EMA teacher labels the full target image, averaging its class
  probabilities over several input scales; confident pixels become pseudo-labels for the student,
  which sees the image with most patches masked.
- ``both``: the two losses together.
- ``control``: the same loop, source loss only (continued source training, no target frames
  needed): what an adapted model gains over it is the unsupervised losses' doing, not more steps.
- ``bn_stats``: no training; the BatchNorm running statistics re-estimated on the target frames
  alone (each frame whole, at the network input size, as inference sees it).

Every branch runs in **eval mode**: drop-path is off and BatchNorm normalises with the input
model's running statistics, which therefore never move (only ``bn_stats`` changes them). Train
mode would give the masked query batch statistics and drop-path that the unmasked target branch
does not have, so their disagreement would not come from masking alone, and the running
statistics would absorb masked target features. The target branch (and the teacher) and the query
branch (and the student) see the same crop and flip of a frame through independent colour jitters,
as the authors give each branch its own colour transform. The class weighting of the source loss
is the input bundle's own by default (``--class-weighting source``, read from its provenance).

One forward pass per step through the (DDP-wrapped) model on a batch made of the source images
(unmasked) and the query views (one per unsupervised loss, each with its own mask):
DistributedDataParallel sees one graph per step. Progress, JSON-lines log, checkpoints and
``--resume`` work as in ``train``.
"""
import copy
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from uncertain_seg_ros import __version__
from uncertain_seg_ros.bags import extract_frames
from uncertain_seg_ros.bundle import BundleConfig, load_bundle, save_bundle
from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.image_files import list_images, read_rgb
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.resources import resolve_bundle

from . import distributed
from .augment import AugmentConfig, colour_jitter, geometric_transform, sample_rng
from .batchnorm import reestimate_batchnorm
from .checkpoint import save_checkpoint
from .datasets import LabelledFolder
from .masking import mask_generator, random_patch_mask
from .train import (
    IGNORE,
    LoopConfig,
    StepBatches,
    TrainSet,
    _autocast,
    _opt,
    _validate,
    checkpoint_due,
    loss_weights,
    optimisation_step,
    param_groups,
    resolve_class_weighting,
    set_learning_rate,
    start_or_resume,
    supervised_losses,
)
from .losses import CLASS_WEIGHTINGS

log = logging.getLogger(__name__)
METHODS = ("gamma_ssl", "maskmatch", "both", "control", "bn_stats")


@dataclass
class AdaptConfig(LoopConfig):
    bundle: str = _opt("", "input bundle (the supervised model to adapt): a folder or a shipped bundle name")
    data: str = _opt("", "labelled SOURCE folder; its supervised loss is kept alongside (weight 1)")
    target_bags: tuple[str, ...] = _opt((), "bags recorded at the new site (rosbag2 folders or ROS 1 .bag files)", nargs="+")
    target_topic: tuple[str, ...] = _opt((), "image topics to read from the bags (default: every image topic)", nargs="+")
    target_images: str = _opt("", "folder of unlabelled target images, instead of or besides bags")
    stride: int = _opt(1, "keep every N-th bag frame")
    min_interval: float = _opt(0.0, "minimum seconds between kept bag frames")
    dedupe: float = _opt(0.01, "skip near-duplicate bag frames (mean grey difference below this; 0 disables)")
    target_val_data: str = _opt("", "labelled TARGET validation folder, if some target frames are labelled")
    name: str = _opt("", "bundle name (default: <input name>-adapted)")
    method: str = _opt("gamma_ssl", "gamma_ssl (Masked gamma-SSL), maskmatch (masked pseudo-label consistency), both, "
                                    "control (source loss only), bn_stats (BatchNorm statistics re-estimated on the target, no training)",
                       choices=METHODS)
    class_weighting: str = _opt("source", "cross-entropy class weights of the source loss; source = the input bundle's own",
                                choices=("source", *CLASS_WEIGHTINGS))
    mask_ratio: float = _opt(0.5, "fraction of patches masked in the gamma-SSL query branch")
    tau: float = _opt(0.1, "softmax temperature of the consistency loss")
    consistency_weight: float = _opt(1.0, "weight of the gamma-SSL consistency loss")
    maskmatch_ratio: float = _opt(0.7, "fraction of patches masked for the maskmatch student")
    maskmatch_weight: float = _opt(1.0, "weight of the masked pseudo-label loss")
    pseudo_threshold: float = _opt(0.8, "maskmatch: minimum teacher confidence of a pseudo-label")
    pseudo_scales: tuple[float, ...] = _opt((0.75, 1.0, 1.25), "maskmatch: input scales averaged by the teacher", nargs="+")
    ema: float = _opt(0.99, "maskmatch: EMA decay of the teacher")
    out: str = _opt("runs/adapt", "output folder: target_frames/, checkpoint/, train_log.jsonl, bundle/")
    steps: int = _opt(1000, "optimisation steps")
    batch_size: int = _opt(4, "source images and target images per step per process (each)")
    lr: float = _opt(1e-4, "peak AdamW learning rate of the heads")
    warmup_steps: int = _opt(50, "linear warm-up steps, then cosine decay")
    val_every: int = _opt(250, "steps between validations")

    @property
    def uses_gamma_ssl(self) -> bool:
        return self.method in ("gamma_ssl", "both")

    @property
    def uses_maskmatch(self) -> bool:
        return self.method in ("maskmatch", "both")

    @property
    def uses_target(self) -> bool:
        """Whether the method reads target frames."""
        return self.method != "control"


class TargetSet(Dataset):
    """Unlabelled target frames: one random scale/crop/flip per frame, seen through two independent
    colour jitters, the target branch's (and the teacher's) and the query branch's (and the
    student's). Items are (target view, query view, valid = not padding)."""

    def __init__(self, images: list[Path], size: tuple[int, int], aug: AugmentConfig, seed: int) -> None:
        self.images, self.size, self.aug, self.seed = images, size, aug, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, epoch = item
        image = read_rgb(self.images[index])
        rng = sample_rng(self.seed + 1, epoch, index)
        image, label = geometric_transform(image, np.zeros(image.shape[:2], np.int64), self.size, rng, self.aug, IGNORE)
        target_view = colour_jitter(image, rng, self.aug)
        query_view = colour_jitter(image, sample_rng(self.seed + 2, epoch, index), self.aug)
        return torch.from_numpy(target_view), torch.from_numpy(query_view), torch.from_numpy(label != IGNORE)


def target_frames(cfg: AdaptConfig, out: Path, is_main: bool) -> tuple[list[Path], dict]:
    """Frames to adapt on: sampled once from the bags into ``<out>/target_frames`` (kept for resume), plus a folder."""
    frames: list[Path] = []
    info: dict = {"bags": list(cfg.target_bags), "topics": list(cfg.target_topic) or "all image topics",
                  "stride": cfg.stride, "min_interval_s": cfg.min_interval, "dedupe": cfg.dedupe or None}
    if cfg.target_bags:
        cache = out / "target_frames"
        done = cache / "frames.json"
        if is_main and not done.is_file():
            count = extract_frames(cfg.target_bags, cache / "frames", cfg.target_topic or None, cfg.stride,
                                   cfg.min_interval, cfg.dedupe or None, fmt="png")
            done.write_text(json.dumps({"frames": count, **info}, indent=2))
        distributed.barrier()
        frames += sorted((cache / "frames").rglob("*.png"))
    if cfg.target_images:
        frames += list_images(cfg.target_images, recursive=True)
        info["images"] = cfg.target_images
    if not frames:
        raise ValueError("no target frames: give --target-bags and/or --target-images")
    info["frames"] = len(frames)
    return frames, info


def gamma_ssl_loss(target_logits: torch.Tensor, query_logits: torch.Tensor, valid: torch.Tensor,
                   tau: float) -> tuple[torch.Tensor, dict]:
    """Masked gamma-SSL consistency: CE(p_target, p_query) on pixels the query is certain about.

    gamma is the quantile of the query's max probability at the fraction of valid pixels where the
    two branches disagree, so that exactly that fraction is excluded as uncertain.
    """
    p_target = F.softmax(target_logits / tau, dim=1)
    log_q = F.log_softmax(query_logits / tau, dim=1)
    confidence, query_label = log_q.exp().max(dim=1)
    disagree = (p_target.argmax(dim=1) != query_label) & valid
    fraction = disagree.sum() / valid.sum().clamp_min(1)
    conf_valid = confidence[valid].detach().float()
    if conf_valid.numel() > 1_000_000:
        conf_valid = conf_valid[torch.randint(0, conf_valid.numel(), (1_000_000,), device=conf_valid.device)]
    gamma = torch.quantile(conf_valid, fraction.clamp(0.0, 1.0).float()) if conf_valid.numel() else confidence.new_tensor(0.0)
    certain = (confidence.detach() >= gamma) & valid
    ce = -(p_target * log_q).sum(dim=1)
    loss = (ce * certain).sum() / certain.sum().clamp_min(1)
    return loss, {"gamma": float(gamma), "disagreement": float(fraction), "certain": float(certain.float().mean())}


@torch.no_grad()
def multiscale_pseudo_labels(teacher: UncertainSegmenter, x: torch.Tensor, scales: tuple[float, ...],
                             threshold: float, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher class probabilities averaged over input scales -> (labels, confident mask) at x's size."""
    size = x.shape[-2:]
    probs = 0.0
    for s in scales:
        scaled = (max(patch, round(size[0] * s / patch) * patch), max(patch, round(size[1] * s / patch) * patch))
        xs = F.interpolate(x, size=scaled, mode="bilinear", align_corners=False) if scaled != tuple(size) else x
        logits, _ = teacher(xs)
        probs = probs + upsample(logits.float(), size).softmax(dim=1)
    confidence, labels = (probs / len(scales)).max(dim=1)
    return labels, confidence >= threshold


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        else:
            t.copy_(s)


def adapt(cfg: AdaptConfig) -> Path:
    """Adapt, checkpointing as it goes, and export a bundle to ``<out>/bundle``; returns its path."""
    dist = distributed.setup(cfg.device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    bundle_path = resolve_bundle(cfg.bundle)
    source_bundle = load_bundle(bundle_path, "cpu")
    bcfg = copy.deepcopy(source_bundle.config)
    model = source_bundle.model
    size = (bcfg.input.height, bcfg.input.width)
    patch = bcfg.model.backbone.patch_size
    grid = (size[0] // patch, size[1] // patch)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    frames, target_info = target_frames(cfg, out, dist.is_main) if cfg.uses_target else ([], {"frames": 0})
    if cfg.method == "bn_stats":
        return _bn_stats(cfg, model, bcfg, source_bundle, bundle_path, frames, target_info, dist, out)
    folder = LabelledFolder(cfg.data)
    if folder.classes.num_classes != bcfg.model.num_classes:
        raise ValueError(f"{cfg.data} has {folder.classes.num_classes} classes, the bundle {bcfg.model.num_classes}")
    scheme = resolve_class_weighting(cfg, bcfg.provenance)

    model.eval()  # every branch in eval mode: see the module docstring
    frozen = copy.deepcopy(model).requires_grad_(False).to(dist.device) if cfg.uses_gamma_ssl else None
    teacher = copy.deepcopy(model).requires_grad_(False).to(dist.device) if cfg.uses_maskmatch else None
    if cfg.backbone_lr_mult == 0:
        model.backbone.requires_grad_(False)
    model.backbone.mask_token.requires_grad_(cfg.method != "control")
    model.to(dist.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    weights = loss_weights(folder, scheme, dist.device)
    log_path, ckpt_path = out / "train_log.jsonl", out / "checkpoint"
    step, state = start_or_resume(cfg, model, optimizer, out, dist)
    if teacher is not None and state:
        teacher.load_state_dict(state["extra_tensors"])
    ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) if dist.enabled else model

    aug = cfg.augmentation()
    datasets = [(TrainSet(folder, size, aug, cfg.seed), cfg.seed)]
    if cfg.uses_target:
        datasets.append((TargetSet(frames, size, aug, cfg.seed), cfg.seed + 7))
    loaders = []
    for dataset, seed in datasets:
        batches = StepBatches(len(dataset), cfg.batch_size, dist.world_size, dist.rank, seed, step, cfg.steps)
        loaders.append(DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(seed)))
    target_batches = loaders[1] if cfg.uses_target else itertools.repeat(None)
    autocast, scaler = _autocast(dist.device, cfg.amp)
    mean, std = bcfg.input.mean, bcfg.input.std
    B = cfg.batch_size
    t0, cpu0, last, start = time.time(), time.process_time(), {}, step
    bar = tqdm(total=cfg.steps, initial=step, desc=f"adapt ({cfg.method})", unit="step", disable=not dist.is_main)
    for (src_img, src_lab), target in zip(loaders[0], target_batches):
        set_learning_rate(optimizer, cfg, step)
        src_lab = src_lab.to(dist.device)
        chunks = [to_input(src_img.to(dist.device), size, mean, std)]
        masks = [torch.zeros(B, grid[0] * grid[1], dtype=torch.bool, device=dist.device)]
        if target is not None:
            tgt_view, query_view, tgt_valid = (t.to(dist.device) for t in target)
            x_tgt = to_input(tgt_view, size, mean, std)
            x_query = to_input(query_view, size, mean, std)
            generator = mask_generator(cfg.seed * dist.world_size + dist.rank, step)
            for used, ratio in ((cfg.uses_gamma_ssl, cfg.mask_ratio), (cfg.uses_maskmatch, cfg.maskmatch_ratio)):
                if used:
                    chunks.append(x_query)
                    masks.append(random_patch_mask(B, grid, ratio, dist.device, generator))
        with autocast:
            logits, predicted_loss = ddp(torch.cat(chunks), torch.cat(masks))
        logits = upsample(logits.float(), size)
        parts = logits.split(B)

        seg_loss, rank_loss = supervised_losses(parts[0], predicted_loss[:B], src_lab, weights, cfg)
        loss = seg_loss + cfg.ranking_weight * rank_loss
        stats = {"seg_loss": seg_loss.item(), "rank_loss": rank_loss.item()}
        if cfg.uses_gamma_ssl:
            with torch.no_grad(), autocast:
                target_logits, _ = frozen(x_tgt)
            consistency, info = gamma_ssl_loss(upsample(target_logits.float(), size), parts[1], tgt_valid, cfg.tau)
            loss = loss + cfg.consistency_weight * consistency
            stats.update(consistency=consistency.item(), **info)
        if cfg.uses_maskmatch:
            with autocast:
                pseudo, confident = multiscale_pseudo_labels(teacher, x_tgt, cfg.pseudo_scales, cfg.pseudo_threshold, patch)
            keep = confident & tgt_valid
            mm = F.cross_entropy(parts[-1], torch.where(keep, pseudo, IGNORE), ignore_index=IGNORE, reduction="sum")
            mm = mm / keep.sum().clamp_min(1)
            loss = loss + cfg.maskmatch_weight * mm
            stats.update(maskmatch=mm.item(), pseudo_fraction=float(keep.float().mean()))

        optimisation_step(loss, model, optimizer, scaler, cfg.grad_clip)
        if teacher is not None:
            ema_update(teacher, model, cfg.ema)
        step += 1
        bar.update(1)
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            last = {"step": step, "loss": loss.item(), **stats, "lr": optimizer.param_groups[0]["lr"],
                    "elapsed_s": round(time.time() - t0, 2),
                    "cpu_s": round(time.process_time() - cpu0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        if step % cfg.val_every == 0 or step == cfg.steps:
            for data in filter(None, (cfg.val_data, cfg.target_val_data)):
                result = _validate(model, bcfg, data, dist, step, log_path)
                last.update({f"{k}_{Path(data).parent.name}_{Path(data).name}": v for k, v in result.items()})
        save, stopping = checkpoint_due(cfg, step, start)
        if save:
            if dist.is_main:
                save_checkpoint(ckpt_path, model, optimizer, step, {"config": asdict(cfg)},
                                teacher.state_dict() if teacher is not None else None)
            distributed.barrier()
        if stopping:
            break
    bar.close()
    if step < cfg.steps:
        distributed.teardown()
        return ckpt_path

    result_path = out / "bundle"
    if dist.is_main:
        metrics = {k: v for k, v in last.items() if k not in ("elapsed_s", "cpu_s")}
        _export(result_path, model, bcfg, cfg, source_bundle, bundle_path, target_info, dist,
                {"class_weighting": scheme, "steps": cfg.steps, "batch_size": cfg.batch_size * dist.world_size, "metrics": metrics})
    distributed.barrier()
    distributed.teardown()
    return result_path


def _bn_stats(cfg: AdaptConfig, model: UncertainSegmenter, bcfg: BundleConfig, source_bundle, bundle_path: Path,
              frames: list[Path], target_info: dict, dist: distributed.DistInfo, out: Path) -> Path:
    """``--method bn_stats``: re-estimate the BatchNorm statistics on the whole target frames and export."""
    size = (bcfg.input.height, bcfg.input.width)
    model.to(dist.device)

    def batches():
        for path in tqdm(frames, desc="BatchNorm statistics", unit="frame", disable=not dist.is_main):
            image = torch.from_numpy(np.ascontiguousarray(read_rgb(path)))[None].to(dist.device)
            yield to_input(image, size, bcfg.input.mean, bcfg.input.std)

    values = reestimate_batchnorm(model, batches())
    result_path = out / "bundle"
    if dist.is_main:
        _export(result_path, model, bcfg, cfg, source_bundle, bundle_path, target_info, dist,
                {"steps": 0, "batch_size": 1, "batchnorm_values_per_channel": values})
    distributed.barrier()
    distributed.teardown()
    return result_path


def _export(path: Path, model: UncertainSegmenter, bcfg: BundleConfig, cfg: AdaptConfig, source_bundle, bundle_path: Path,
            target_info: dict, dist: distributed.DistInfo, extra: dict) -> None:
    """Write the adapted bundle (calibration reset: calibrate it anew) with its provenance."""
    bcfg = replace(bcfg, name=cfg.name or f"{bcfg.name}-adapted", calibration=Calibration())
    bcfg.provenance = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": f"uncertain_seg_ros {__version__}, torch {torch.__version__}",
        "stage": f"adaptation ({cfg.method})",
        "input_bundle": {"path": str(bundle_path), "model_id": source_bundle.model_id, "name": source_bundle.config.name},
        "source_data": str(cfg.data),
        "target": target_info,
        "processes": dist.world_size,
        **extra,
        "adapt_config": asdict(cfg),
        "previous": source_bundle.config.provenance,
    }
    save_bundle(path, model, bcfg)

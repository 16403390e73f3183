"""Adaptation to a new site from unlabelled frames: Masked gamma-SSL, optionally with MaskMatch.

Starts from a trained bundle (stage 2) and trains on unlabelled target frames (from bags or an
image folder) while keeping the supervised loss on the labelled source data:

- **Masked gamma-SSL** (Williams et al. 2024): a frozen copy of the input model (target branch) sees
  the full image; the trained model (query branch) sees it with a fraction of its 14x14 patches
  replaced by the mask token. With ``p = softmax(s / tau)`` the consistency loss is the
  cross-entropy ``CE(p_target, p_query)`` averaged over the pixels the query is certain about
  (``max_k p_query >= gamma``); gamma is re-set every batch so that the fraction of pixels below
  it equals the fraction where the two branches' argmax disagree.
- **MaskMatch** (Pan et al. 2023, ``--maskmatch``): an EMA teacher labels the full target image,
  averaging its class probabilities over several input scales; confident pixels become
  pseudo-labels for the student, which sees the image with most patches masked.

One forward pass per step through the (DDP-wrapped) model on a batch made of the source images
(unmasked), the target images (gamma-SSL mask) and, with MaskMatch, the target images again
(MaskMatch mask): DistributedDataParallel sees one graph per step. Progress, JSON-lines log,
checkpoints and ``--resume`` work as in ``train``.
"""
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from uncertain_seg_ros import __version__
from uncertain_seg_ros.bags import extract_frames
from uncertain_seg_ros.bundle import load_bundle, save_bundle
from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.image_files import list_images, read_rgb
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.resources import resolve_bundle

from . import distributed
from .augment import AugmentConfig, sample_rng, train_transform
from .checkpoint import save_checkpoint
from .datasets import LabelledFolder
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
    set_learning_rate,
    start_or_resume,
    supervised_losses,
)

log = logging.getLogger(__name__)


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
    method: str = _opt("gamma_ssl", "gamma_ssl (Masked gamma-SSL), maskmatch, or both", choices=("gamma_ssl", "maskmatch", "both"))
    mask_ratio: float = _opt(0.5, "fraction of patches masked in the gamma-SSL query branch")
    tau: float = _opt(0.1, "softmax temperature of the consistency loss")
    consistency_weight: float = _opt(1.0, "weight of the gamma-SSL consistency loss")
    maskmatch_ratio: float = _opt(0.7, "fraction of patches masked for the MaskMatch student")
    maskmatch_weight: float = _opt(1.0, "weight of the MaskMatch pseudo-label loss")
    pseudo_threshold: float = _opt(0.8, "MaskMatch: minimum teacher confidence of a pseudo-label")
    pseudo_scales: tuple[float, ...] = _opt((0.75, 1.0, 1.25), "MaskMatch: input scales averaged by the teacher", nargs="+")
    ema: float = _opt(0.99, "MaskMatch: EMA decay of the teacher")
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


class TargetSet(Dataset):
    """Unlabelled target frames, augmented like the source; the label marks padded pixels as IGNORE."""

    def __init__(self, images: list[Path], size: tuple[int, int], aug: AugmentConfig, seed: int) -> None:
        self.images, self.size, self.aug, self.seed = images, size, aug, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = item
        image = read_rgb(self.images[index])
        label = torch.zeros(image.shape[:2], dtype=torch.int64).numpy()
        image, label = train_transform(image, label, self.size, sample_rng(self.seed + 1, epoch, index), self.aug, IGNORE)
        return torch.from_numpy(image), torch.from_numpy(label) != IGNORE


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


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, device: torch.device) -> torch.Tensor:
    """(B, h*w) bool with ``round(ratio * h*w)`` randomly chosen patches True per image."""
    n = grid[0] * grid[1]
    k = int(round(ratio * n))
    order = torch.rand(batch, n, device=device).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :k], True)
    return mask


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
    model = source_bundle.model.train()
    size = (bcfg.input.height, bcfg.input.width)
    patch = bcfg.model.backbone.patch_size
    grid = (size[0] // patch, size[1] // patch)
    folder = LabelledFolder(cfg.data)
    if folder.classes.num_classes != bcfg.model.num_classes:
        raise ValueError(f"{cfg.data} has {folder.classes.num_classes} classes, the bundle {bcfg.model.num_classes}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    frames, target_info = target_frames(cfg, out, dist.is_main)

    frozen = copy.deepcopy(model).eval().requires_grad_(False).to(dist.device)
    teacher = copy.deepcopy(model).eval().requires_grad_(False).to(dist.device) if cfg.uses_maskmatch else None
    if cfg.backbone_lr_mult == 0:
        model.backbone.requires_grad_(False)
        model.backbone.mask_token.requires_grad_(True)
    model.to(dist.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    weights = loss_weights(folder, cfg, dist.device)
    log_path, ckpt_path = out / "train_log.jsonl", out / "checkpoint"
    step, state = start_or_resume(cfg, model, optimizer, out, dist)
    if teacher is not None and state:
        teacher.load_state_dict(state["extra_tensors"])
    ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) if dist.enabled else model

    aug = cfg.augmentation()
    loaders = []
    for dataset, seed in ((TrainSet(folder, size, aug, cfg.seed), cfg.seed), (TargetSet(frames, size, aug, cfg.seed), cfg.seed + 7)):
        batches = StepBatches(len(dataset), cfg.batch_size, dist.world_size, dist.rank, seed, step, cfg.steps)
        loaders.append(DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(seed)))
    autocast, scaler = _autocast(dist.device, cfg.amp)
    mean, std = bcfg.input.mean, bcfg.input.std
    B = cfg.batch_size
    t0, last, start = time.time(), {}, step
    bar = tqdm(total=cfg.steps, initial=step, desc=f"adapt ({cfg.method})", unit="step", disable=not dist.is_main)
    for (src_img, src_lab), (tgt_img, tgt_valid) in zip(*loaders):
        set_learning_rate(optimizer, cfg, step)
        src_lab, tgt_valid = src_lab.to(dist.device), tgt_valid.to(dist.device)
        x_src = to_input(src_img.to(dist.device), size, mean, std)
        x_tgt = to_input(tgt_img.to(dist.device), size, mean, std)
        chunks, masks = [x_src], [torch.zeros(B, grid[0] * grid[1], dtype=torch.bool, device=dist.device)]
        if cfg.uses_gamma_ssl:
            chunks.append(x_tgt)
            masks.append(random_patch_mask(B, grid, cfg.mask_ratio, dist.device))
        if cfg.uses_maskmatch:
            chunks.append(x_tgt)
            masks.append(random_patch_mask(B, grid, cfg.maskmatch_ratio, dist.device))
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
                    "elapsed_s": round(time.time() - t0, 2)}
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
        exported = model
        bcfg = replace(bcfg, name=cfg.name or f"{bcfg.name}-adapted", calibration=Calibration())
        bcfg.provenance = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool": f"uncertain_seg_ros {__version__}, torch {torch.__version__}",
            "stage": f"adaptation ({cfg.method})",
            "input_bundle": {"path": str(bundle_path), "model_id": source_bundle.model_id, "name": source_bundle.config.name},
            "source_data": str(cfg.data),
            "target": target_info,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size * dist.world_size,
            "processes": dist.world_size,
            "adapt_config": asdict(cfg),
            "metrics": {k: v for k, v in last.items() if k != "elapsed_s"},
            "previous": source_bundle.config.provenance,
        }
        save_bundle(result_path, exported, bcfg)
    distributed.barrier()
    distributed.teardown()
    return result_path

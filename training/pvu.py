"""Pretrained Visual Uncertainties as the paper does it: the loss-prediction head trained from cached features.

Kirchhof et al. (2024) train the uncertainty MLP (D -> 512 -> 512 -> 1, LeakyReLU, Softplus) on
``stopgrad(features)`` with the ranking loss ``mean max(0, -sign(l_i - l_j) (u_i - u_j) + 0.1)``,
and with a frozen backbone they compute the features once and train the head from the cache.
Here the network (backbone and segmentation head) is frozen and the head learns to rank the
network's own per-pixel cross-entropy on **held-out labelled frames** (frames it was not trained
on, where its losses are those of new data; the jointly trained head only ever saw training
frames).

:func:`cache_features` writes, one view at a time (constant memory), two memory-mapped ``.npy``
files: the features the heads see (N, D, h, w) float32 and the per-pixel loss at input resolution
(N, H, W) float32, NaN where the label is void. View 0 of a frame is the whole frame resized to
the input size, as inference sees it; further views are random scale/crop/flip augmentations
(seeded by frame and view). :func:`train_loss_head` trains a fresh head from any source of
(features, loss) batches; :class:`CachedBatches` reads them from the cache,
:class:`ComputedBatches` computes the same batches with the network (the uncached reference).
"""
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from uncertain_seg_ros.atomic_io import atomic_write_text
from uncertain_seg_ros.bundle import BundleConfig
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.model.heads import UncertaintyHead
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input

from .augment import AugmentConfig, geometric_transform, sample_rng
from .datasets import LabelledFolder
from .losses import ranking_loss

IGNORE = -100
FEATURES_FILE, LOSSES_FILE, INFO_FILE = "features.npy", "losses.npy", "cache.json"


class HeldOutViews:
    """The labelled views the head learns from: ``views`` per frame, view 0 the whole frame."""

    def __init__(self, folder: LabelledFolder, config: BundleConfig, views: int = 1, seed: int = 0,
                 aug: AugmentConfig = AugmentConfig()) -> None:
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        self.folder, self.views, self.seed, self.aug = folder, views, seed, aug
        self.size = (config.input.height, config.input.width)
        self.config = config

    def __len__(self) -> int:
        return len(self.folder) * self.views

    def __getitem__(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 image, int64 label with IGNORE for void) at the input size."""
        frame, view = divmod(item, self.views)
        image, label = self.folder.read(frame)
        valid = (label >= 0) & (label < self.config.model.num_classes)
        if self.config.ignore_index is not None:
            valid &= label != self.config.ignore_index
        label = np.where(valid, label, IGNORE).astype(np.int64)
        if view == 0:
            h, w = self.size
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            label = cv2.resize(label.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
            return np.ascontiguousarray(image), label
        return geometric_transform(image, label, self.size, sample_rng(self.seed, view, frame), self.aug, IGNORE)

    def batch(self, items: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Network inputs (B, 3, H, W) and labels (B, H, W) of the views ``items``."""
        pairs = [self[i] for i in items]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
        labels = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
        return to_input(images, self.size, self.config.input.mean, self.config.input.std), labels


@torch.no_grad()
def features_and_losses(model: UncertainSegmenter, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen network gives the head: features (B, D, h, w) and per-pixel CE (B, H, W), NaN on void."""
    features = model.features(x)
    logits = upsample(model.head(features).float(), labels.shape[-2:])
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    return features.float(), torch.where(labels == IGNORE, torch.full_like(ce, math.nan), ce)


@torch.no_grad()
def cache_features(model: UncertainSegmenter, views: HeldOutViews, out: str | Path, device: torch.device,
                   progress: bool = True) -> Path:
    """Write the cache of every view to the folder ``out`` (memory-mapped .npy, one view in memory at a time)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    x, labels = views.batch([0], device)
    f, l = features_and_losses(model, x, labels)
    feats = np.lib.format.open_memmap(out / FEATURES_FILE, mode="w+", dtype=np.float32, shape=(len(views), *f.shape[1:]))
    losses = np.lib.format.open_memmap(out / LOSSES_FILE, mode="w+", dtype=np.float32, shape=(len(views), *l.shape[1:]))
    for i in tqdm(range(len(views)), desc="cache features", unit="view", disable=not progress):
        if i:
            x, labels = views.batch([i], device)
            f, l = features_and_losses(model, x, labels)
        feats[i], losses[i] = f[0].cpu().numpy(), l[0].cpu().numpy()
    feats.flush()
    losses.flush()
    del feats, losses
    atomic_write_text(out / INFO_FILE, json.dumps({"views": len(views), "frames": len(views.folder), "views_per_frame": views.views,
                                                   "data": str(views.folder.root), "seed": views.seed}, indent=2))
    return out


class CachedBatches:
    """Batches of (features, losses) read from a cache, in the order ``order`` (view indices per step)."""

    def __init__(self, cache: str | Path, order: list[list[int]], device: torch.device) -> None:
        self.features = np.load(Path(cache) / FEATURES_FILE, mmap_mode="r")
        self.losses = np.load(Path(cache) / LOSSES_FILE, mmap_mode="r")
        self.order, self.device = order, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for items in self.order:
            idx = np.sort(np.asarray(items))  # memory-mapped reads in file order
            back = np.argsort(np.argsort(np.asarray(items)))
            f = torch.from_numpy(np.ascontiguousarray(self.features[idx][back])).to(self.device)
            l = torch.from_numpy(np.ascontiguousarray(self.losses[idx][back])).to(self.device)
            yield f, l


class ComputedBatches:
    """The same batches computed by the frozen network on every step (what the cache saves)."""

    def __init__(self, model: UncertainSegmenter, views: HeldOutViews, order: list[list[int]], device: torch.device) -> None:
        self.model, self.views, self.order, self.device = model.eval().to(device), views, order, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for items in self.order:
            yield features_and_losses(self.model, *self.views.batch(items, self.device))


def batch_order(views: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """View indices of each step: successive seeded permutations of all views, cut into batches."""
    g = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(views, generator=g).tolist()
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@dataclass(frozen=True)
class HeadTraining:
    """How the loss-prediction head is trained (AdamW, cosine decay to 1% of ``lr``)."""

    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    pairs: int = 4096
    margin: float = 0.1
    seed: int = 0


def train_loss_head(batches, in_channels: int, hidden: int, cfg: HeadTraining, device: torch.device,
                    progress: bool = True) -> tuple[UncertaintyHead, list[float]]:
    """A fresh head (seeded) trained by the ranking loss on ``batches`` of (features, losses); returns it and the losses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = UncertaintyHead(in_channels, hidden)
    head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.steps), eta_min=cfg.lr * 0.01)
    pairs = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    history = []
    for features, losses in tqdm(batches, total=cfg.steps, desc="loss head", unit="step", disable=not progress):
        predicted = upsample(head(features), losses.shape[-2:])[:, 0]
        valid = ~torch.isnan(losses)
        loss = ranking_loss(predicted, torch.nan_to_num(losses), valid, cfg.pairs, cfg.margin, generator=pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    return head.eval(), history


def fit_loss_head(model: UncertainSegmenter, config: BundleConfig, folder: LabelledFolder, cache_dir: str | Path,
                  views_per_frame: int, training: HeadTraining, device: torch.device, progress: bool = True) -> tuple[UncertaintyHead, dict]:
    """Cache the frozen network's features on the held-out ``folder`` (reused when ``cache_dir`` holds
    them) and train a fresh loss-prediction head from the cache; returns it and what was done."""
    views = HeldOutViews(folder, config, views_per_frame, training.seed)
    cache_dir = Path(cache_dir)
    if not (cache_dir / INFO_FILE).is_file():
        cache_features(model, views, cache_dir, device, progress)
    order = batch_order(len(views), training.batch_size, training.steps, training.seed)
    channels = config.model.backbone.embed_dim * config.model.n_last_blocks
    head, history = train_loss_head(CachedBatches(cache_dir, order, device), channels, config.model.uncertainty_hidden,
                                    training, device, progress)
    tail = history[-max(1, len(history) // 10):]
    return head, {"data": str(folder.root), "frames": len(folder), "views": len(views), "steps": training.steps,
                  "batch_size": training.batch_size, "lr": training.lr, "seed": training.seed,
                  "final_ranking_loss": float(np.mean(tail))}

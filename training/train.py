"""Supervised training of the segmenter and its loss-prediction uncertainty head.

Readable in one sitting, like nanoGPT's train.py: the configuration is the dataclass below, the
loop is in :func:`train`. Runs on one process or under ``torchrun`` (DistributedDataParallel,
NCCL on GPUs, gloo on CPUs); checkpoints every ``checkpoint_every`` steps and ``--resume``
continues exactly where the last checkpoint left off (same batches, same augmentations).
"""
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from uncertain_seg_ros import __version__
from uncertain_seg_ros.atomic_io import atomic_write_text
from uncertain_seg_ros.bundle import BundleConfig, InputSpec, load_bundle, save_bundle
from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter, backbone_config, dinov2_backbone
from uncertain_seg_ros.prediction import upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.uncertainty import UNCERTAINTY_SOURCES

from . import distributed
from .augment import AugmentConfig, sample_rng, train_transform
from .checkpoint import LOADED_FROM, load_checkpoint, save_checkpoint, settle_checkpoint
from .datasets import LabelledFolder
from .losses import CLASS_WEIGHTINGS, class_weights, ranking_loss
from .masking import mask_generator, random_ratio_mask

log = logging.getLogger(__name__)
IGNORE = -100


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoopConfig:
    """Options every training stage shares: optimisation, augmentation, logging, checkpoints."""

    out: str = _opt("runs/train", "output folder: checkpoint/, train_log.jsonl, bundle/")
    val_data: str = _opt("", "labelled validation folder, evaluated every --val-every steps (optional)")
    steps: int = _opt(2000, "optimisation steps")
    batch_size: int = _opt(8, "images per step per process")
    lr: float = _opt(1e-3, "peak AdamW learning rate of the heads")
    backbone_lr_mult: float = _opt(1.0, "backbone LR = lr x this (e.g. 0.1 when fine-tuning pretrained weights, 0 freezes)")
    mask_token_lr_mult: float = _opt(1.0, "mask token LR = lr x this, whatever the backbone's (so it trains with a frozen backbone)")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not on norms, biases, tokens)")
    warmup_steps: int = _opt(100, "linear warm-up steps, then cosine decay")
    min_lr_ratio: float = _opt(0.01, "final LR as a fraction of the peak")
    grad_clip: float = _opt(1.0, "gradient norm clip (0 disables)")
    class_weighting: str = _opt("none", "cross-entropy class weights; source = the starting bundle's own (from its provenance)",
                                choices=("source", *CLASS_WEIGHTINGS))
    ranking_weight: float = _opt(1.0, "weight of the uncertainty head's ranking loss")
    ranking_pairs: int = _opt(4096, "pixel pairs per step for the ranking loss")
    scale_min: float = _opt(0.6, "smallest random scale, relative to fitting the image height")
    scale_max: float = _opt(1.6, "largest random scale, relative to fitting the image height")
    hflip: bool = _opt(True, "random horizontal flips")
    color_jitter: float = _opt(0.3, "brightness/contrast/saturation jitter amplitude")
    amp: str = _opt("auto", "mixed precision: auto (bf16/fp16 on CUDA, off on CPU), bf16, fp16, off", choices=("auto", "bf16", "fp16", "off"))
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N")
    workers: int = _opt(2, "data-loading worker processes")
    seed: int = _opt(0, "seed of initialisation, data order and augmentation")
    log_every: int = _opt(10, "steps between log lines")
    checkpoint_every: int = _opt(200, "steps between checkpoints")
    val_every: int = _opt(500, "steps between validations")
    resume: bool = _opt(False, "continue from <out>/checkpoint")
    stop_after: int = _opt(0, "end this invocation after N steps with a checkpoint (for time-limited jobs); continue with --resume")

    def augmentation(self) -> AugmentConfig:
        c = self.color_jitter
        return AugmentConfig(self.scale_min, self.scale_max, self.hflip, c, c, c)


@dataclass
class TrainConfig(LoopConfig):
    data: str = _opt("", "labelled training folder (images/ + labels/, classes.yaml in it or a parent)")
    name: str = _opt("", "bundle name (default: <backbone>-<data folder>, or the --init-bundle's name)")
    init_bundle: str = _opt("", "continue training this bundle (folder or shipped name): its weights, architecture, "
                                "classes and input size; --backbone, --pretrained, --input-size and the head options are then unused")
    mask_ratio_max: float = _opt(0.0, "random patch masking: each image gets a fraction drawn uniformly from [0, this] of its "
                                      "patches replaced by the trainable mask_token (0: no masking, the token stays frozen)")
    backbone: str = _opt("dinov2_vits14", "backbone by official hub name (dinov2_vits14, dinov2_vitb14_reg, ...) or demo_vitt14")
    pretrained: str = _opt("", "official DINOv2 backbone weights (.pth or .safetensors) to start from")
    download_pretrained: bool = _opt(False, "download the official weights for --backbone (needs internet)")
    input_size: tuple[int, int] = _opt((476, 644), "network input height width (multiples of 14)", nargs=2)
    n_last_blocks: int = _opt(4, "blocks whose patch tokens feed the heads")
    uncertainty_hidden: int = _opt(512, "hidden width of the uncertainty MLP")
    drop_path: float = _opt(0.0, "stochastic depth rate of the backbone")
    uncertainty_source: str = _opt("max_softmax", "uncertainty the bundle publishes", choices=UNCERTAINTY_SOURCES)
    mask_threshold: float = _opt(0.5, "misclassification-mask threshold written to the bundle")


class TrainSet(Dataset):
    """Items are (index, epoch) pairs so that each augmentation is a pure function of them."""

    def __init__(self, folder: LabelledFolder, size: tuple[int, int], aug: AugmentConfig, seed: int) -> None:
        self.folder, self.size, self.aug, self.seed = folder, size, aug, seed
        self.num_classes = folder.classes.num_classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = item
        image, label = self.folder.read(index)
        label[(label < 0) | (label >= self.num_classes)] = IGNORE
        image, label = train_transform(image, label, self.size, sample_rng(self.seed, epoch, index), self.aug, IGNORE)
        return torch.from_numpy(image), torch.from_numpy(label)


class StepBatches:
    """Batch sampler over an endless stream of per-epoch permutations, starting at any step.

    Global batch ``s`` is items ``[s*B*W, (s+1)*B*W)`` of the stream; process ``r`` of ``W`` takes
    its ``B`` of them. Resuming at step ``s`` reproduces the remaining batches exactly.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, start: int, steps: int) -> None:
        self.n, self.batch, self.world, self.rank, self.seed = n, batch, world, rank, seed
        self.start, self.steps = start, steps

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        per_step = self.batch * self.world
        cache: dict[int, list[int]] = {}
        for step in range(self.start, self.steps):
            first = step * per_step + self.rank * self.batch
            items = []
            for pos in range(first, first + self.batch):
                epoch, offset = divmod(pos, self.n)
                if epoch not in cache:
                    cache = {epoch: self._perm(epoch)}
                items.append((cache[epoch][offset], epoch))
            yield items


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: UncertainSegmenter, cfg: LoopConfig) -> list[dict]:
    """AdamW groups: backbone / heads x decay / no decay (norms, biases, tokens, layer scales), and the
    mask token on its own (``mask_token_lr_mult``, no decay), so that it is trained with a frozen backbone."""
    groups = {(b, d): [] for b in (True, False) for d in (True, False)}
    token = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "backbone.mask_token":
            token.append(p)
            continue
        is_backbone = name.startswith("backbone.")
        no_decay = p.ndim < 2 or name.endswith(("_token", "pos_embed", "register_tokens", "gamma"))
        groups[(is_backbone, not no_decay)].append(p)
    out = []
    for (is_backbone, decay), params in groups.items():
        mult = cfg.backbone_lr_mult if is_backbone else 1.0
        if params and mult > 0:
            out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult})
    if token and cfg.mask_token_lr_mult > 0:
        out.append({"params": token, "weight_decay": 0.0, "lr_mult": cfg.mask_token_lr_mult})
    return out


def source_class_weighting(provenance: dict) -> str:
    """The class weighting a bundle was trained with, from its provenance (following ``previous`` back)."""
    record = provenance
    while record:
        if record.get("class_weighting") in CLASS_WEIGHTINGS:
            return record["class_weighting"]
        for key in ("train_config", "adapt_config"):
            if (record.get(key) or {}).get("class_weighting") in CLASS_WEIGHTINGS:
                return record[key]["class_weighting"]
        record = record.get("previous") or {}
    raise ValueError("the bundle's provenance does not say which class weighting it was trained with; "
                     f"pass --class-weighting (one of {CLASS_WEIGHTINGS})")


def resolve_class_weighting(cfg: LoopConfig, provenance: dict | None) -> str:
    """``cfg.class_weighting``, with "source" replaced by the starting bundle's own."""
    if cfg.class_weighting != "source":
        return cfg.class_weighting
    if provenance is None:
        raise ValueError("--class-weighting source needs a starting bundle (--init-bundle)")
    return source_class_weighting(provenance)


def bundle_config(cfg: TrainConfig, folder: LabelledFolder, model_cfg: SegmenterConfig) -> BundleConfig:
    return BundleConfig(
        name=cfg.name or f"{cfg.backbone}-{Path(cfg.data).resolve().name}",
        backbone_name=cfg.backbone,
        model=model_cfg,
        classes=folder.classes.classes,
        ignore_index=folder.classes.ignore_index,
        input=InputSpec(*cfg.input_size),
        uncertainty_source=cfg.uncertainty_source,
        mask_threshold=cfg.mask_threshold,
    )


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "off":
        return nullcontext(), None
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: LoopConfig, step: int) -> None:
    for g in optimizer.param_groups:
        g["lr"] = cfg.lr * g["lr_mult"] * lr_factor(step, cfg)


def supervised_losses(
    logits: torch.Tensor, predicted_loss: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, cfg: LoopConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation cross-entropy (ignore-aware, optionally class-weighted) and the uncertainty head's
    ranking loss against the per-pixel CE, on one labelled batch at label resolution."""
    logits = upsample(logits.float(), labels.shape[-2:])
    valid = labels != IGNORE
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    if weights is not None:
        w = weights[labels.clamp_min(0)] * valid
        seg_loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
    else:
        seg_loss = ce.sum() / valid.sum().clamp_min(1)
    rank_loss = ranking_loss(upsample(predicted_loss.float(), labels.shape[-2:])[:, 0], ce, valid, cfg.ranking_pairs)
    return seg_loss, rank_loss


def optimisation_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, grad_clip: float) -> float:
    """Backward, unscale (fp16), clip, step; returns the gradient norm (0 when not clipping)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)) if grad_clip > 0 else 0.0
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss became {loss.item()}; lower --lr or check the data")
    return grad_norm


def checkpoint_due(cfg: LoopConfig, step: int, start: int) -> tuple[bool, bool]:
    """(save a checkpoint now, then stop this invocation) after ``step``; ``start`` is where it began."""
    stopping = cfg.stop_after > 0 and step - start == cfg.stop_after and step < cfg.steps
    return step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping, stopping


def start_or_resume(cfg: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path,
                    dist: distributed.DistInfo) -> tuple[int, dict]:
    """(first step, checkpoint state): 0 and a fresh log for a new run; with ``resume`` the last
    checkpoint's step and state, its log cut back to that step."""
    log_path = out / "train_log.jsonl"
    if cfg.resume:
        state = load_checkpoint(out / "checkpoint", model, optimizer)
        distributed.barrier()  # every process has read it before the main one tidies the folder
        if dist.is_main:
            settle_checkpoint(out / "checkpoint", Path(state[LOADED_FROM]))
            _trim_log(log_path, state["step"])
            log.info("resumed from %s at step %d", state[LOADED_FROM], state["step"])
        return state["step"], state
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
    return 0, {}


def loss_weights(folder: LabelledFolder, scheme: str, device: torch.device) -> torch.Tensor | None:
    weights = class_weights(folder.class_frequencies(), scheme)
    return weights.to(device) if weights is not None else None


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` by a run that died before its next checkpoint."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))


def train(cfg: TrainConfig) -> Path:
    """Train, checkpointing as it goes, and export a bundle to ``<out>/bundle``; returns its path.

    With ``stop_after`` the invocation ends early and returns the checkpoint's path instead.
    """
    dist = distributed.setup(cfg.device)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    folder = LabelledFolder(cfg.data)
    if not 0.0 <= cfg.mask_ratio_max <= 1.0:
        raise ValueError(f"--mask-ratio-max must lie in [0, 1], got {cfg.mask_ratio_max}")
    model, bcfg, init = _initial_model(cfg, folder)
    scheme = resolve_class_weighting(cfg, init["provenance"] if init else None)
    size = (bcfg.input.height, bcfg.input.width)
    grid = (size[0] // bcfg.model.backbone.patch_size, size[1] // bcfg.model.backbone.patch_size)
    if cfg.backbone_lr_mult == 0:
        model.backbone.requires_grad_(False)
    model.backbone.mask_token.requires_grad_(cfg.mask_ratio_max > 0)  # trained only when patches are masked
    model.to(dist.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    weights = loss_weights(folder, scheme, dist.device)
    log_path, ckpt_path = out / "train_log.jsonl", out / "checkpoint"
    step, _ = start_or_resume(cfg, model, optimizer, out, dist)
    ddp = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None) if dist.enabled else model

    dataset = TrainSet(folder, size, cfg.augmentation(), cfg.seed)
    batches = StepBatches(len(dataset), cfg.batch_size, dist.world_size, dist.rank, cfg.seed, step, cfg.steps)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda",
                        persistent_workers=cfg.workers > 0 and step < cfg.steps,
                        generator=torch.Generator().manual_seed(cfg.seed))
    autocast, scaler = _autocast(dist.device, cfg.amp)
    mean, std = bcfg.input.mean, bcfg.input.std
    extra = {"config": asdict(cfg)}
    t0, cpu0, last, start = time.time(), time.process_time(), {}, step
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not dist.is_main)
    model.train()
    for images, labels in loader:
        set_learning_rate(optimizer, cfg, step)
        images = images.to(dist.device, non_blocking=True)
        labels = labels.to(dist.device, non_blocking=True)
        masks = None
        if cfg.mask_ratio_max > 0:
            generator = mask_generator(cfg.seed * dist.world_size + dist.rank, step)
            masks = random_ratio_mask(len(images), grid, cfg.mask_ratio_max, dist.device, generator)
        with autocast:
            logits, predicted_loss = ddp(to_input(images, size, mean, std), masks)
        seg_loss, rank_loss = supervised_losses(logits, predicted_loss, labels, weights, cfg)
        loss = seg_loss + cfg.ranking_weight * rank_loss
        grad_norm = optimisation_step(loss, model, optimizer, scaler, cfg.grad_clip)
        step += 1
        bar.update(1)
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
            last = {"step": step, "loss": loss.item(), "seg_loss": seg_loss.item(), "rank_loss": rank_loss.item(),
                    "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "elapsed_s": round(time.time() - t0, 2),
                    "cpu_s": round(time.process_time() - cpu0, 2)}
            with open(log_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", seg=f"{last['seg_loss']:.3f}", rank=f"{last['rank_loss']:.3f}")
        if cfg.val_data and (step % cfg.val_every == 0 or step == cfg.steps):
            last.update(_validate(model, bcfg, cfg.val_data, dist, step, log_path))
        save, stopping = checkpoint_due(cfg, step, start)
        if save:
            if dist.is_main:
                save_checkpoint(ckpt_path, model, optimizer, step, extra)
            distributed.barrier()
        if stopping:
            break
    bar.close()
    if step < cfg.steps:
        if dist.is_main:
            log.info("stopped at step %d of %d; continue with --resume", step, cfg.steps)
        distributed.teardown()
        return ckpt_path

    bundle_path = out / "bundle"
    if dist.is_main:
        bcfg.provenance = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tool": f"uncertain_seg_ros {__version__}, torch {torch.__version__}",
            "stage": "supervised" if init is None else "supervised (continued)",
            "data": {"train": str(cfg.data), "val": cfg.val_data or None, "train_frames": len(folder)},
            "pretrained": cfg.pretrained or ("official download" if cfg.download_pretrained else None),
            "steps": cfg.steps,
            "batch_size": cfg.batch_size * dist.world_size,
            "processes": dist.world_size,
            "class_weighting": scheme,
            "mask_ratio_max": cfg.mask_ratio_max,
            "train_config": asdict(cfg),
            "metrics": {k: v for k, v in last.items() if k not in ("elapsed_s", "cpu_s")},
        }
        if init is not None:
            bcfg.provenance.update(init_bundle={k: init[k] for k in ("path", "model_id", "name")}, previous=init["provenance"])
        save_bundle(bundle_path, model, bcfg)
    distributed.barrier()
    distributed.teardown()
    return bundle_path


def _initial_model(cfg: TrainConfig, folder: LabelledFolder) -> tuple[UncertainSegmenter, BundleConfig, dict | None]:
    """(model, bundle config, None) built from the options, or continued from ``cfg.init_bundle``
    (then the third item describes that bundle: path, model id, name, provenance)."""
    if not cfg.init_bundle:
        model_cfg = SegmenterConfig(
            num_classes=folder.classes.num_classes,
            backbone=backbone_config(cfg.backbone, drop_path_rate=cfg.drop_path),
            n_last_blocks=cfg.n_last_blocks,
            uncertainty_hidden=cfg.uncertainty_hidden,
        )
        bcfg = bundle_config(cfg, folder, model_cfg)
        bcfg.validate()
        model = UncertainSegmenter(model_cfg)
        if cfg.pretrained or cfg.download_pretrained:
            pretrained = dinov2_backbone(cfg.backbone, cfg.pretrained or None, cfg.download_pretrained, drop_path_rate=cfg.drop_path)
            model.backbone.load_state_dict(pretrained.state_dict(), strict=True)
        return model, bcfg, None
    if cfg.pretrained or cfg.download_pretrained:
        raise ValueError("--init-bundle continues a trained bundle; --pretrained / --download-pretrained do not apply")
    path = resolve_bundle(cfg.init_bundle)
    bundle = load_bundle(path, "cpu")
    if folder.classes.num_classes != bundle.config.model.num_classes:
        raise ValueError(f"{cfg.data} has {folder.classes.num_classes} classes, the bundle {path} {bundle.config.model.num_classes}")
    model = bundle.model
    model.set_selector(None)
    bcfg = replace(bundle.config, name=cfg.name or bundle.config.name, model=model.cfg, calibration=Calibration(), provenance={})
    info = {"path": str(path), "model_id": bundle.model_id, "name": bundle.config.name, "provenance": bundle.config.provenance}
    return model, bcfg, info


def _validate(model: UncertainSegmenter, bcfg: BundleConfig, data: str, dist: distributed.DistInfo, step: int, log_path: Path) -> dict:
    """mIoU and max-softmax AUROC on the validation folder, split across processes."""
    from .evaluate import run_evaluation

    folder = LabelledFolder(data)
    indices = list(range(dist.rank, len(folder), dist.world_size))
    ev = run_evaluation(model, bcfg, folder, dist.device, indices, progress=False)
    result = {"val_miou": float(ev.confusion.miou()), "val_auroc": ev.curves["max_softmax"].auroc()}
    if dist.is_main:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        log.info("step %d: val mIoU %.4f, max-softmax AUROC %.4f", step, result["val_miou"], result["val_auroc"])
    return result

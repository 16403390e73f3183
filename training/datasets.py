"""Labelled image folders: ``images/`` + ``labels/`` (same file stems) + a ``classes.yaml``.

The CamVid copy in shared/data follows this layout with ``classes.yaml`` at the dataset root and
one folder per split; any folder of that shape works, ``classes.yaml`` being looked up in the
folder and its parents.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from uncertain_seg_ros.bundle import ClassInfo
from uncertain_seg_ros.image_files import IMAGE_SUFFIXES, read_rgb

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ClassSet:
    classes: list[ClassInfo]
    ignore_index: int | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def find_classes_file(folder: Path, levels: int = 3) -> Path:
    """``classes.yaml`` in ``folder`` or one of its ``levels`` parents."""
    folder = Path(folder).resolve()
    for candidate in [folder, *folder.parents][: levels + 1]:
        if (candidate / "classes.yaml").is_file():
            return candidate / "classes.yaml"
    raise FileNotFoundError(f"no classes.yaml in {folder} or its {levels} parent folders")


def load_classes(path: Path) -> ClassSet:
    """Parse a ``classes.yaml``: ``ignore_index`` and ``classes: [{id, name, color: [r, g, b]}]``."""
    raw = yaml.safe_load(Path(path).read_text())
    classes = sorted(
        (ClassInfo(int(c["id"]), str(c["name"]), tuple(int(v) for v in c["color"])) for c in raw["classes"]),
        key=lambda c: c.id,
    )
    if [c.id for c in classes] != list(range(len(classes))):
        raise ValueError(f"{path}: class ids must be 0..K-1, got {[c.id for c in classes]}")
    ignore = raw.get("ignore_index")
    return ClassSet(classes, None if ignore is None else int(ignore))


def read_label(path: Path) -> np.ndarray:
    """A label PNG of class indices as (H, W) int64."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot decode label {path}")
    if lab.ndim != 2:
        raise ValueError(f"label {path} must be single-channel class indices, got shape {lab.shape}")
    return lab.astype(np.int64)


class LabelledFolder:
    """Pairs ``images/<stem>.*`` with ``labels/<stem>.png``, sorted by name."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        images_dir, labels_dir = self.root / "images", self.root / "labels"
        if not self.root.exists():
            raise FileNotFoundError(f"labelled folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"labelled folder {self.root} is not a folder")
        missing = [f"{d.name}/" for d in (images_dir, labels_dir) if not d.is_dir()]
        if missing:
            raise FileNotFoundError(f"labelled folder {self.root} has no {' and no '.join(missing)} folder "
                                    "(it must contain images/ and labels/ with the same file stems)")
        self.classes = load_classes(find_classes_file(self.root))
        self.images: list[Path] = []
        self.labels: list[Path] = []
        for img in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            lab = labels_dir / f"{img.stem}.png"
            if lab.is_file():
                self.images.append(img)
                self.labels.append(lab)
            else:
                log.warning("no label for %s, skipped", img.name)
        if not self.images:
            raise FileNotFoundError(f"no labelled images in {self.root}")

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = read_rgb(self.images[i]), read_label(self.labels[i])
        if image.shape[:2] != label.shape:
            raise ValueError(f"{self.images[i].name}: image {image.shape[:2]} and label {label.shape} sizes differ")
        return image, label

    def class_frequencies(self) -> np.ndarray:
        """Pixel count per class over the folder (ignore index and out-of-range values excluded)."""
        counts = np.zeros(self.classes.num_classes, dtype=np.int64)
        for lab in self.labels:
            counts += np.bincount(read_label(lab).ravel(), minlength=256)[: self.classes.num_classes]
        return counts

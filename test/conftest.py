"""Shared fixtures: tiny models, bundles and labelled folders made in the test, plus the CamVid location."""
import os
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import torch

from uncertain_seg_ros.bundle import Bundle, BundleConfig, ClassInfo, InputSpec, save_bundle
from uncertain_seg_ros.image_files import read_rgb
from uncertain_seg_ros.prediction import Prediction, decode
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter, backbone_config

REPO = Path(__file__).resolve().parents[1]
CAMVID = Path(os.environ.get("UNCERTAIN_SEG_CAMVID", REPO.parent / "shared" / "data" / "camvid"))
TINY_CLASSES = [ClassInfo(0, "sky", (128, 128, 128)), ClassInfo(1, "road", (128, 64, 128)), ClassInfo(2, "car", (64, 0, 128))]


def camvid_frames(split: str, n: int) -> list[np.ndarray]:
    """The first ``n`` frames of a CamVid split (e.g. "dusk/test") as RGB arrays."""
    return [read_rgb(p) for p in sorted((CAMVID / split / "images").iterdir())[:n]]


def installed_script(name: str = "uncertain-seg") -> str:
    """The installed console script, found where each kind of install puts it: beside this Python
    (pip, a virtual environment), in the package's ``lib/uncertain_seg_ros`` (colcon, where ``ros2 run``
    looks; setup.cfg's script_dir), else on PATH."""
    folders = [Path(sys.executable).parent]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix

        try:
            folders.append(Path(get_package_prefix("uncertain_seg_ros")) / "lib" / "uncertain_seg_ros")
        except (PackageNotFoundError, OSError):  # not built with colcon, or no sourced workspace
            pass
    except ImportError:
        pass
    found = next((p for p in (shutil.which(name, path=str(f)) for f in folders) if p), None) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: looked in {', '.join(map(str, folders))} and on PATH")
    return found


def tiny_model_config(num_classes: int = 3) -> SegmenterConfig:
    return SegmenterConfig(num_classes, backbone_config("demo_vitt14", embed_dim=48, depth=2, num_heads=2),
                           n_last_blocks=2, uncertainty_hidden=16)


def tiny_bundle_config(num_classes: int = 3) -> BundleConfig:
    return BundleConfig(name="tiny", model=tiny_model_config(num_classes), classes=TINY_CLASSES[:num_classes],
                        input=InputSpec(56, 70), ignore_index=255, backbone_name="demo_vitt14")


def core_prediction(bundle: Bundle, image: np.ndarray) -> Prediction:
    """One frame through the core functions directly (no Predictor, no node): the reference outputs."""
    cfg = bundle.config
    x = to_input(torch.from_numpy(np.ascontiguousarray(image))[None], (cfg.input.height, cfg.input.width),
                 cfg.input.mean, cfg.input.std)
    with torch.no_grad():
        logits, loss = bundle.model(x)
    return decode(logits, loss, image.shape[:2], cfg.calibration, cfg.uncertainty_source, cfg.mask_threshold,
                  selector=bundle.model.selector)


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Path:
    """Compiled artefacts of this test session (nodes started by tests inherit it), not ~/.cache."""
    path = tmp_path_factory.mktemp("engines")
    os.environ["UNCERTAIN_SEG_CACHE"] = str(path)
    return path


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A freshly exported bundle of a randomly initialised tiny model."""
    config = tiny_bundle_config()
    return save_bundle(tmp_path / "bundle", UncertainSegmenter(config.model), config)


def write_labelled_folder(root: Path, n: int = 6, size: tuple[int, int] = (60, 80), seed: int = 0) -> Path:
    """A generic labelled folder: sky on top, road below, a car box; void (255) on a border row."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    h, w = size
    for i in range(n):
        label = np.zeros((h, w), np.uint8)
        horizon = int(rng.integers(h // 3, h // 2))
        label[horizon:] = 1
        y, x = int(rng.integers(horizon, h - 10)), int(rng.integers(0, w - 20))
        label[y : y + 10, x : x + 20] = 2
        label[-1] = 255
        colours = np.array([[150, 180, 230], [90, 90, 90], [200, 30, 30]], np.uint8)
        image = colours[np.minimum(label, 2)] + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"f{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "labels" / f"f{i:03d}.png"), label)
    classes = {"ignore_index": 255, "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in TINY_CLASSES]}
    (root / "classes.yaml").write_text(yaml.safe_dump(classes))
    return root


@pytest.fixture
def labelled_folder(tmp_path: Path) -> Path:
    return write_labelled_folder(tmp_path / "data")


def stopped_and_resumed(cli, args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Run ``args`` uninterrupted into tmp_path/full, and stopped after 2 steps then resumed into
    tmp_path/part; returns both exported bundles' weights (to compare)."""
    from safetensors.torch import load_file

    assert cli([*args, "--out", str(tmp_path / "full")]) == 0
    assert cli([*args, "--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert cli([*args, "--out", str(tmp_path / "part"), "--resume"]) == 0
    return (load_file(str(tmp_path / "full" / "bundle" / "model.safetensors")),
            load_file(str(tmp_path / "part" / "bundle" / "model.safetensors")))

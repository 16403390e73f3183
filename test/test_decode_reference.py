"""``decode`` against the per-pixel reference on real CamVid frames (the shipped, selectively calibrated demo bundle).

The reference is the decoding as it was before the selector moved to a coarser grid: the
selector scores every output pixel and flagged logits are picked with ``torch.where``. It lives
only here. The one intended change is where the selector runs (``selector_flags``), so:

- with the same flags, both give the same bytes: dividing by a per-pixel temperature map of ``T`` and
  ``T_sel`` is the same arithmetic as choosing between ``z / T`` and ``z / T_sel``;
- with their own flags, labels can differ only at a float tie of the top two logits (a temperature
  never moves an argmax), and the mask only where the flags differ and the two temperatures put
  the uncertainty on both sides of the threshold. Those pixels sit on the selector's decision
  boundary; the bar for them is the label-agreement bar of the issue, 99.5% of each frame's pixels.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.prediction import Prediction, decode, selector_flags, upsample
from uncertain_seg_ros.preprocessing import to_input
from uncertain_seg_ros.uncertainty import uncertainty
from uncertain_seg_training.datasets import LabelledFolder

from conftest import CAMVID, REPO

FRAMES_PER_SPLIT = 3
AGREEMENT = 0.995
# A tie "within rounding": logits of a few units carry ~1e-7 relative error per operation.
TIE = 1e-5


def reference_decode(logits, predicted_loss, size, calibration, source, mask_threshold, flagged) -> Prediction:
    """The former decode with the selector's ``flagged`` (B, H, W) given: per-pixel ``torch.where`` of the
    logits divided by ``selective_temperature`` (flagged) or by the plain ``temperature`` (the others)."""
    up = upsample(logits.float(), size)
    calibrated = torch.where(flagged.unsqueeze(1), up / calibration.selective_temperature, up / calibration.temperature)
    probs = calibrated.softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    loss = upsample(predicted_loss.float(), size)[:, 0]
    unc = uncertainty(source, probs, loss)
    return Prediction(labels, confidence, unc, unc > mask_threshold, probs, loss)


@pytest.mark.skipif(not (CAMVID / "dusk" / "test").is_dir(),
                    reason=f"CamVid data not found at {CAMVID} (set UNCERTAIN_SEG_CAMVID to the camvid folder)")
@pytest.mark.parametrize("split", ["day/test", "dusk/test"])
def test_decode_matches_per_pixel_selector_reference(split):
    bundle = load_bundle(REPO / "models" / "camvid_demo")
    cfg, model = bundle.config, bundle.model
    assert cfg.calibration.method == "selective"
    folder = LabelledFolder(CAMVID / split)
    for i in np.linspace(0, len(folder) - 1, FRAMES_PER_SPLIT).round().astype(int):
        image, _ = folder.read(int(i))
        size = image.shape[:2]
        with torch.no_grad():
            logits, loss = model(to_input(torch.from_numpy(image)[None], (cfg.input.height, cfg.input.width),
                                          cfg.input.mean, cfg.input.std))
            args = (logits, loss, size, cfg.calibration, cfg.uncertainty_source, cfg.mask_threshold)
            new = decode(*args, selector=model.selector)
            new_flags = selector_flags(model.selector, logits, size)
            pixel_flags = model.selector(upsample(logits, size))[:, 0] > 0
            same_flags = reference_decode(*args, new_flags)
            reference = reference_decode(*args, pixel_flags)
            at_one = reference_decode(*args, torch.zeros_like(pixel_flags))
            at_sel = reference_decode(*args, torch.ones_like(pixel_flags))
        for name in ("labels", "confidence", "uncertainty", "mask", "probs", "predicted_loss"):
            assert torch.equal(getattr(new, name), getattr(same_flags, name)), name

        top2 = upsample(logits, size).topk(2, dim=1).values
        tie = top2[:, 0] - top2[:, 1] <= TIE * top2[:, 0].abs().clamp_min(1.0)
        moved = new.labels != reference.labels
        assert not (moved & ~tie).any()
        assert (~moved).float().mean().item() >= AGREEMENT

        straddles = at_one.mask != at_sel.mask
        mask_moved = new.mask != reference.mask
        assert not (mask_moved & ~((new_flags != pixel_flags) & straddles)).any()
        assert (~mask_moved).float().mean().item() >= AGREEMENT, f"frame {i}"


def test_decode_resolution_benchmark_runs_on_the_shipped_samples(tmp_path):
    """The script behind benchmarks/results/decode_resolution.md, on the 5 shipped dusk frames: the shipped
    grid's labels and masks agree with the per-pixel selector's to the bar, and it writes JSON and Markdown."""
    out = tmp_path / "decode.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_resolution.py"), "--camvid", str(REPO / "samples"),
                    "--splits", "camvid_dusk", "--scales", "4", "--timing-frames", "1", "--timing-rounds", "1",
                    "--json", str(out), "--markdown", str(tmp_path / "decode.md")], check=True, timeout=600)
    rows = json.loads(out.read_text())["splits"]["camvid_dusk"]["variants"]
    assert set(rows) == {"every pixel", "4x grid", "grid maps"}
    assert rows["every pixel"]["mask_equal"] == 1.0
    assert rows["4x grid"]["labels_equal_worst_frame"] >= AGREEMENT and rows["4x grid"]["mask_equal_worst_frame"] >= AGREEMENT
    assert "| 4x grid |" in (tmp_path / "decode.md").read_text()

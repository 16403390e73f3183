"""The core predictor: outputs equal the plain computation, only requested outputs, batching, options."""
import numpy as np
import pytest
import torch

from uncertain_seg_ros.bundle import load_bundle, save_bundle
from uncertain_seg_ros.colormap import colorize_scalar
from uncertain_seg_ros.image_files import list_images, read_rgb
from uncertain_seg_ros.inference import OUTPUT_KINDS, Predictor, PredictorOptions
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.overlay import overlay
from uncertain_seg_ros.prediction import decode

from conftest import REPO, core_prediction, tiny_bundle_config


@pytest.fixture
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


def test_outputs_equal_plain_computation_with_mixed_sizes(bundle):
    """Two cameras of one size batch together, a third of another size runs apart; results are per frame."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(60, 80, 3), (60, 80, 3), (45, 70, 3)]]
    outs = Predictor(bundle).run(images)
    for image, out in zip(images, outs):
        ref = core_prediction(bundle, image)
        assert np.array_equal(out.labels, ref.labels[0].numpy().astype(np.uint8))
        np.testing.assert_allclose(out.uncertainty, ref.uncertainty[0].numpy(), atol=1e-5)
        assert np.array_equal(out.mask, ref.mask[0].numpy().astype(np.uint8) * 255)
        assert out.labels.shape == image.shape[:2] and out.labels.dtype == np.uint8
        assert out.uncertainty.dtype == np.float32 and out.overlay.shape == image.shape
        assert out.labels_color.shape == image.shape and out.uncertainty_color.dtype == np.uint8
        assert np.array_equal(out.labels_color, bundle.config.palette[out.labels])
        assert out.uncertain_fraction == pytest.approx(ref.mask.float().mean().item())


def test_shipped_selective_bundle_outputs_keep_their_meaning():
    """The demo bundle (selective scaling) on a shipped 480x360 frame: every output at the camera's size, with
    its dtype and meaning, equal to decode of the backend's outputs; uint8 labels, uncertainty in [0, 1],
    mask = u > threshold."""
    bundle = load_bundle(REPO / "models" / "camvid_demo")
    cfg = bundle.config
    image = read_rgb(list_images(REPO / "samples" / "camvid_dusk" / "images")[0])
    h, w = image.shape[:2]
    predictor = Predictor(bundle)
    prepared = predictor.prepare([image])
    network_out = predictor.infer(prepared)
    out = predictor.finish(prepared, network_out, [set(OUTPUT_KINDS)])[0]
    ref = decode(*network_out[(h, w)], (h, w), cfg.calibration, cfg.uncertainty_source, cfg.mask_threshold,
                 selector=bundle.model.selector)
    assert out.labels.shape == (h, w) and out.labels.dtype == np.uint8
    assert np.array_equal(out.labels, ref.labels[0].numpy())
    assert out.uncertainty.shape == (h, w) and out.uncertainty.dtype == np.float32
    assert np.array_equal(out.uncertainty, ref.uncertainty[0].numpy())
    assert 0.0 <= out.uncertainty.min() and out.uncertainty.max() <= 1.0
    assert out.mask.dtype == np.uint8 and set(np.unique(out.mask)) <= {0, 255}
    assert np.array_equal(out.mask == 255, out.uncertainty > bundle.config.mask_threshold)
    assert out.uncertain_fraction == pytest.approx(float((out.mask == 255).mean()))
    assert np.array_equal(out.labels_color, bundle.config.palette[out.labels])
    assert np.array_equal(out.uncertainty_color, colorize_scalar(out.uncertainty))
    expected = overlay(torch.from_numpy(image), torch.from_numpy(out.labels_color), torch.from_numpy(out.mask == 255))
    assert out.overlay.shape == image.shape and np.array_equal(out.overlay, expected.numpy())


def test_only_requested_outputs_are_computed(bundle):
    out = Predictor(bundle).run([np.zeros((28, 42, 3), np.uint8)], {"mask"})[0]
    assert out.mask is not None
    assert all(getattr(out, k) is None for k in OUTPUT_KINDS if k != "mask")
    with pytest.raises(ValueError, match="unknown outputs"):
        Predictor(bundle).run([np.zeros((28, 42, 3), np.uint8)], {"depth"})


def test_threshold_override(bundle):
    image = np.random.default_rng(1).integers(0, 255, (28, 42, 3), dtype=np.uint8)
    none = Predictor(bundle, PredictorOptions(mask_threshold=1.0)).run([image], {"mask"})[0]
    all_ = Predictor(bundle, PredictorOptions(mask_threshold=0.0)).run([image], {"mask"})[0]
    assert not none.mask.any() and (all_.mask == 255).all()


def test_many_classes_give_uint16_labels(tmp_path):
    cfg = tiny_bundle_config()
    classes = [type(cfg.classes[0])(i, f"c{i}", (i % 256, 0, 0)) for i in range(300)]
    cfg.classes = classes
    cfg.model = type(cfg.model)(300, cfg.model.backbone, cfg.model.n_last_blocks, cfg.model.uncertainty_hidden)
    bundle = load_bundle(save_bundle(tmp_path / "b", UncertainSegmenter(cfg.model), cfg))
    out = Predictor(bundle).run([np.zeros((28, 42, 3), np.uint8)], {"labels"})[0]
    assert out.labels.dtype == np.uint16


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int4"}, "precision"), ({"colormap": "jet"}, "colormap"),
    ({"overlay_alpha": 1.5}, "overlay_alpha"), ({"mask_threshold": -0.1}, "mask_threshold")])
def test_invalid_options_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PredictorOptions(**kwargs)


def test_fp16_on_cpu_rejected(bundle):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Predictor(bundle, PredictorOptions(precision="fp16"))


@pytest.mark.parametrize("source", ["max_softmax", "entropy", "learned"])
def test_non_finite_network_outputs_fail_closed(source):
    """NaN and inf logits or predicted loss: those pixels are uncertain (1), mask on, counted; finite
    pixels are untouched. Without the step NaN > threshold is False: 'certain'."""
    from uncertain_seg_ros.calibration import Calibration
    from uncertain_seg_ros.prediction import decode

    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    loss = torch.rand(2, 1, 4, 5, generator=torch.Generator().manual_seed(1))
    clean = decode(logits, loss, (4, 5), Calibration(), source, 0.5)
    logits[0, :, 1, 2] = float("nan")
    logits[0, 0, 3, 4], logits[0, 1, 3, 4] = float("inf"), float("-inf")
    loss[0, 0, 1, 2] = loss[0, 0, 3, 4] = float("nan")
    pred = decode(logits, loss, (4, 5), Calibration(), source, 0.5)
    bad = torch.zeros(2, 4, 5, dtype=torch.bool)
    bad[0, 1, 2] = bad[0, 3, 4] = True
    assert pred.nonfinite.tolist() == [2, 0]
    assert pred.mask[bad].all() and (pred.uncertainty[bad] == 1.0).all() and (pred.confidence[bad] == 0.0).all()
    assert torch.equal(pred.uncertainty[~bad], clean.uncertainty[~bad]) and torch.equal(pred.mask[~bad], clean.mask[~bad])


def test_frames_above_max_output_pixels_are_answered_reduced(bundle):
    """A frame above max_output_pixels gives outputs at the reduced size (same aspect ratio), equal to
    the outputs of the frame shrunk by area averaging; frames within the limit keep their size."""
    import cv2

    from uncertain_seg_ros.preprocessing import reduced_size

    assert reduced_size(3000, 4000, 1920 * 1080) == (1247, 1662)
    assert reduced_size(1, 5000, 100) == (1, 100) and reduced_size(60, 80, 4800) == (60, 80)
    rng = np.random.default_rng(3)
    big, small = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    predictor = Predictor(bundle, PredictorOptions(max_output_pixels=40 * 30))
    out_big, out_small = predictor.run([big, small], {"labels", "overlay"})
    assert out_big.labels.shape == (30, 40) and out_big.overlay.shape == (30, 40, 3)
    shrunk = cv2.resize(big, (40, 30), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out_big.labels, Predictor(bundle).run([shrunk], {"labels"})[0].labels)
    assert out_small.labels.shape == (30, 40)
    with pytest.raises(ValueError, match="max_output_pixels must be >= 1"):
        PredictorOptions(max_output_pixels=0)

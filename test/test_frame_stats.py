"""Per-frame sufficient statistics of an evaluation and the block bootstrap over them."""
import numpy as np
import pytest
import torch

from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_training.bootstrap import block_bootstrap_weights, percentile_interval
from uncertain_seg_training.datasets import LabelledFolder
from uncertain_seg_training.evaluate import run_evaluation
from uncertain_seg_training.frame_stats import FrameStatistics

from conftest import tiny_bundle_config


def test_block_bootstrap_on_a_known_case():
    """20 frames in 4 blocks of 5: every replicate counts whole blocks, 4 in all; the bootstrap variance of
    the frame mean is that of the mean of 4 block means drawn with replacement, var_pop(block means) / 4.
    20000 replicates estimate a variance to about sqrt(2 / 20000) = 1% (relative standard error): 5% allowed."""
    x = np.array([0.0] * 5 + [1.0] * 5 + [4.0] * 5 + [9.0] * 5) + np.linspace(0, 0.1, 20)
    w = block_bootstrap_weights(20, 5, 20_000, seed=0)
    assert w.shape == (20_000, 20) and (w.sum(axis=1) == 20).all()
    assert (w.reshape(20_000, 4, 5) == w.reshape(20_000, 4, 5)[:, :, :1]).all(), "frames of a block are drawn together"
    means = w @ x / 20
    block_means = x.reshape(4, 5).mean(axis=1)
    assert means.var() == pytest.approx(block_means.var() / 4, rel=0.05)
    assert means.mean() == pytest.approx(x.mean(), abs=3 * np.sqrt(block_means.var() / 4 / 20_000))
    single = block_bootstrap_weights(20, 1, 20_000, seed=1) @ x / 20
    assert single.var() == pytest.approx(x.var() / 20, rel=0.05), "block 1: the ordinary bootstrap"
    assert single.var() < means.var() / 3, "independent draws understate the spread of correlated frames"
    uneven = block_bootstrap_weights(7, 3, 100, seed=2)
    assert (uneven[:, 6] == 0).sum() > 0 and (uneven[:, :3] == uneven[:, :1]).all(), "the last block is frame 6 alone"
    low, high = percentile_interval(means)
    assert low < x.mean() < high and percentile_interval(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        block_bootstrap_weights(5, 0, 10, seed=0)


@pytest.fixture
def evaluated(labelled_folder):
    config = tiny_bundle_config()
    torch.manual_seed(0)
    model = UncertainSegmenter(config.model)
    heads = {"other_head": UncertainSegmenter(config.model).uncertainty_head.eval()}
    variants = {"temperature": (Calibration(2.0), None)}
    return run_evaluation(model, config, LabelledFolder(labelled_folder), torch.device("cpu"), progress=False,
                          variants=variants, heads=heads, frame_bins=10000)


def test_frame_statistics_add_up_to_the_pooled_evaluation(evaluated, tmp_path):
    """At the pooled resolution the frames' counts sum to the evaluator's own accumulators, so every
    figure of every score and calibration is the same; a file round trip keeps them."""
    ev = evaluated
    fs = ev.frame_stats
    assert len(fs) == 6 and fs.frames[0] == "f000"
    assert set(fs.curves) == {"max_softmax", "entropy", "learned", "temperature/max_softmax", "temperature/entropy", "other_head"}
    confusion, curves, calibration = fs.pooled()
    assert np.array_equal(confusion.matrix, ev.confusion.matrix)
    for name, c in ev.curves.items():
        assert curves[name].to_dict() == c.to_dict(), name
    for name, b in ev.calibration.items():
        assert calibration[name].ece() == pytest.approx(b.ece(), rel=1e-12, abs=1e-15), name
    loaded = FrameStatistics.load(fs.save(tmp_path / "stats.npz"))
    assert loaded.frames == fs.frames and loaded.metrics() == fs.metrics()


def test_frame_statistics_weights_subsets_and_image_ece(evaluated):
    """Weights count frames again (two copies of frame 0 pool like frame 0 twice); a subset is its frames
    alone; image-wise ECE is the mean of the frames' own ECEs, by hand."""
    fs = evaluated.frame_stats
    twice = fs.pooled(np.array([2, 0, 0, 0, 0, 0]))[0].matrix
    assert np.array_equal(twice, 2 * fs.subset([0]).pooled()[0].matrix)
    part = fs.subset([3, 4, 5])
    assert part.frames == ["f003", "f004", "f005"]
    assert part.metrics()["miou"] == fs.metrics(np.array([0, 0, 0, 1, 1, 1]))["miou"]
    own = [fs.subset([i]).pooled()[2]["temperature"].ece() for i in range(6)]
    assert fs.image_ece("temperature") == pytest.approx(np.mean(own), rel=1e-12)
    with pytest.raises(ValueError, match="weights"):
        fs.pooled(np.ones(5))

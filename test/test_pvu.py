"""Pretrained Visual Uncertainties from cached features: the cache, and that it trains the same head."""
import numpy as np
import torch

from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_training.datasets import LabelledFolder
from uncertain_seg_training.pvu import (
    FEATURES_FILE,
    LOSSES_FILE,
    CachedBatches,
    ComputedBatches,
    HeadTraining,
    HeldOutViews,
    batch_order,
    cache_features,
    features_and_losses,
    fit_loss_head,
    train_loss_head,
)

from conftest import tiny_bundle_config

CPU = torch.device("cpu")


def test_cached_and_uncached_training_give_the_same_head(labelled_folder, tmp_path):
    """Same batches, same pairs: the head trained from the memory-mapped cache equals the one trained on
    features computed each step. The only difference is float32 rounding of features computed for a
    batch of 3 views instead of one at a time (relative 1e-7); Adam moves a weight by about lr = 1e-3
    per step, so the heads agree to 1e-5 after 10 steps (1% of one step), far below any real difference."""
    config = tiny_bundle_config()
    torch.manual_seed(0)
    model = UncertainSegmenter(config.model).eval()
    views = HeldOutViews(LabelledFolder(labelled_folder), config, views=2, seed=0)
    cache = cache_features(model, views, tmp_path / "cache", CPU, progress=False)
    feats, losses = np.load(cache / FEATURES_FILE, mmap_mode="r"), np.load(cache / LOSSES_FILE, mmap_mode="r")
    assert feats.shape == (12, 96, 4, 5) and losses.shape == (12, 56, 70), "2 views of 6 frames, input 56x70, patch grid 4x5"
    f, l = features_and_losses(model, *views.batch([3], CPU))
    np.testing.assert_allclose(feats[3], f[0].numpy(), rtol=0, atol=0)
    void = np.isnan(np.asarray(losses))
    assert void.any() and not void.all(), "void and padded pixels carry no loss"

    training = HeadTraining(steps=10, batch_size=3, lr=1e-3)
    order = batch_order(len(views), 3, 10, seed=0)
    assert sorted(i for step in order[:4] for i in step) == list(range(12)), "each pass covers every view once"
    channels = config.model.backbone.embed_dim * config.model.n_last_blocks
    cached, history = train_loss_head(CachedBatches(cache, order, CPU), channels, 16, training, CPU, progress=False)
    computed, _ = train_loss_head(ComputedBatches(model, views, order, CPU), channels, 16, training, CPU, progress=False)
    for a, b in zip(cached.state_dict().values(), computed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(history) == 10
    initial, _ = train_loss_head(CachedBatches(cache, order[:0], CPU), channels, 16, training, CPU, progress=False)
    assert not torch.equal(initial.mlp[0].weight, cached.mlp[0].weight), "it trained"


def test_fit_loss_head_reuses_its_cache(labelled_folder, tmp_path):
    config = tiny_bundle_config()
    model = UncertainSegmenter(config.model).eval()
    folder = LabelledFolder(labelled_folder)
    head, info = fit_loss_head(model, config, folder, tmp_path / "c", 1, HeadTraining(steps=3, batch_size=2), CPU, progress=False)
    stamp = (tmp_path / "c" / FEATURES_FILE).stat().st_mtime_ns
    again, _ = fit_loss_head(model, config, folder, tmp_path / "c", 1, HeadTraining(steps=3, batch_size=2), CPU, progress=False)
    assert (tmp_path / "c" / FEATURES_FILE).stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert info["views"] == 6 and info["steps"] == 3

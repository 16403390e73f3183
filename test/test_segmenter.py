"""Segmenter outputs and config, uncertainty sources and the shared prediction decoder."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from uncertain_seg_ros.calibration import Calibration
from uncertain_seg_ros.model import BackboneConfig, SegmenterConfig, UncertainSegmenter
from uncertain_seg_ros.prediction import decode
from uncertain_seg_ros.uncertainty import (
    entropy_uncertainty,
    learned_uncertainty,
    max_softmax_uncertainty,
    uncertainty,
)


def tiny_config(num_classes=3):
    """A small segmenter config: 32-dim, two-block backbone on a 4x4 pretrained grid."""
    backbone = BackboneConfig(embed_dim=32, depth=2, num_heads=2, img_size=56)
    return SegmenterConfig(num_classes=num_classes, backbone=backbone, n_last_blocks=2, uncertainty_hidden=16)


# --------------------------------------------------------------------------- segmenter


def test_segmenter_output_shapes_and_nonnegative_loss():
    """Logits are (B, K, H/14, W/14) and the predicted loss (B, 1, H/14, W/14) is >= 0."""
    torch.manual_seed(0)
    model = UncertainSegmenter(tiny_config(num_classes=5)).eval()
    with torch.no_grad():
        logits, loss = model(torch.randn(2, 3, 42, 70))
    assert logits.shape == (2, 5, 3, 5)
    assert loss.shape == (2, 1, 3, 5)
    assert (loss >= 0).all()
    masks = torch.zeros(2, 15, dtype=torch.bool)
    masks[:, ::2] = True
    with torch.no_grad():
        masked_logits, _ = model(torch.randn(2, 3, 42, 70), masks)
    assert masked_logits.shape == (2, 5, 3, 5)


def test_uncertainty_head_sees_detached_features():
    """Backprop of the predicted loss alone reaches only the uncertainty head, never backbone or seg head."""
    torch.manual_seed(0)
    model = UncertainSegmenter(tiny_config()).train()
    logits, loss = model(torch.randn(2, 3, 42, 56))
    loss.sum().backward()
    for name, p in [*model.backbone.named_parameters(), *model.head.named_parameters()]:
        assert p.grad is None or not p.grad.any(), name
    assert all(p.grad is not None and p.grad.any() for p in model.uncertainty_head.parameters())


def test_segmentation_loss_does_not_train_uncertainty_head():
    """Backprop of the logits alone reaches backbone and seg head but not the uncertainty head."""
    torch.manual_seed(0)
    model = UncertainSegmenter(tiny_config()).train()
    logits, _ = model(torch.randn(2, 3, 42, 56))
    logits.square().sum().backward()
    assert all(p.grad is None for p in model.uncertainty_head.parameters())
    assert model.head.conv.weight.grad.any()
    assert model.backbone.blocks[-1].attn.qkv.weight.grad.any()


def test_n_last_blocks_out_of_range_rejected():
    """n_last_blocks must lie in [1, depth]."""
    cfg = tiny_config()
    with pytest.raises(ValueError, match="n_last_blocks"):
        UncertainSegmenter(SegmenterConfig(num_classes=3, backbone=cfg.backbone, n_last_blocks=3))
    with pytest.raises(ValueError, match="n_last_blocks"):
        UncertainSegmenter(SegmenterConfig(num_classes=3, backbone=cfg.backbone, n_last_blocks=0))


def test_segmenter_config_round_trip():
    """SegmenterConfig survives to_dict -> JSON -> from_dict unchanged."""
    cfg = SegmenterConfig(
        num_classes=7,
        backbone=BackboneConfig(embed_dim=64, depth=3, num_heads=4, num_register_tokens=4, interpolate_offset=0.0),
        n_last_blocks=2,
        uncertainty_hidden=32,
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert SegmenterConfig.from_dict(d) == cfg
    assert d["backbone"]["num_register_tokens"] == 4


def test_segmenter_config_rejects_unknown_keys():
    """Unknown keys, at the top level or inside the backbone, raise ValueError naming them."""
    d = tiny_config().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        SegmenterConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        SegmenterConfig.from_dict({**d, "backbone": {**d["backbone"], "bogus": 1}})


# --------------------------------------------------------------------------- uncertainty sources


def test_max_softmax_uncertainty_values():
    """max_softmax is 1 - max_k p_k over the class dimension."""
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 3)
    u = max_softmax_uncertainty(probs)
    assert u.shape == (1, 1, 3)
    torch.testing.assert_close(u[0, 0], torch.tensor([0.3, 2 / 3, 0.0]))


def test_entropy_uncertainty_normalised():
    """Entropy / log K: uniform -> 1, one-hot -> 0, two of four classes at 0.5 -> 0.5."""
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]]).T.reshape(1, 4, 1, 3)
    u = entropy_uncertainty(probs)
    assert u.shape == (1, 1, 3)
    torch.testing.assert_close(u[0, 0], torch.tensor([1.0, 0.0, 0.5]))
    random = torch.rand(2, 6, 5, 5).softmax(dim=1)
    e = entropy_uncertainty(random)
    assert ((e >= 0) & (e <= 1)).all()


def test_learned_uncertainty_monotone_map():
    """learned = 1 - exp(-l): 0 -> 0, log 2 -> 0.5, log 4 -> 0.75, strictly increasing, below 1."""
    l = torch.tensor([0.0, math.log(2), math.log(4)])
    torch.testing.assert_close(learned_uncertainty(l), torch.tensor([0.0, 0.5, 0.75]))
    grid = torch.linspace(0, 10, 101)
    u = learned_uncertainty(grid)
    assert (u[1:] > u[:-1]).all()
    assert (u >= 0).all() and (u < 1).all()


def test_uncertainty_dispatch():
    """uncertainty() dispatches by source name; unknown source or missing predicted loss raise ValueError."""
    probs = torch.tensor([0.7, 0.2, 0.1]).reshape(1, 3, 1, 1)
    loss = torch.tensor([math.log(2)]).reshape(1, 1, 1)
    torch.testing.assert_close(uncertainty("max_softmax", probs), torch.tensor([[[0.3]]]))
    torch.testing.assert_close(uncertainty("entropy", probs), entropy_uncertainty(probs))
    torch.testing.assert_close(uncertainty("learned", probs, loss), torch.tensor([[[0.5]]]))
    with pytest.raises(ValueError, match="unknown uncertainty source"):
        uncertainty("variance", probs)
    with pytest.raises(ValueError, match="predicted loss"):
        uncertainty("learned", probs)


# --------------------------------------------------------------------------- prediction.decode


def _net_outputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 3, 5) * 3, F.softplus(torch.randn(2, 1, 3, 5))


@pytest.mark.parametrize("source", ["max_softmax", "entropy", "learned"])
def test_decode_sizes_and_labels(source):
    """Outputs are at the requested size; labels are the argmax of the upsampled calibrated logits; mask = u > t."""
    logits, loss = _net_outputs()
    size = (42, 70)
    calib = Calibration(temperature=1.5)
    pred = decode(logits, loss, size, calib, source, mask_threshold=0.3)
    for t in (pred.labels, pred.confidence, pred.uncertainty, pred.mask, pred.predicted_loss):
        assert t.shape == (2, *size)
    assert pred.probs.shape == (2, 4, *size)
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False) / 1.5
    assert torch.equal(pred.labels, up.argmax(dim=1))
    torch.testing.assert_close(pred.confidence, up.softmax(dim=1).amax(dim=1))
    assert torch.equal(pred.mask, pred.uncertainty > 0.3)
    assert pred.mask.any() and not pred.mask.all()
    up_loss = F.interpolate(loss, size=size, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(pred.predicted_loss, up_loss)
    if source == "learned":
        torch.testing.assert_close(pred.uncertainty, 1 - torch.exp(-up_loss))


def test_decode_temperature_changes_confidence_not_labels():
    """A larger temperature lowers the confidence but leaves the labels unchanged."""
    logits, loss = _net_outputs()
    cold = decode(logits, loss, (28, 42), Calibration(1.0), "max_softmax", 0.5)
    hot = decode(logits, loss, (28, 42), Calibration(3.0), "max_softmax", 0.5)
    assert torch.equal(cold.labels, hot.labels)
    assert (hot.confidence <= cold.confidence + 1e-6).all()
    assert (hot.confidence < cold.confidence).any()
    torch.testing.assert_close(hot.uncertainty, 1 - hot.confidence)


def test_decode_at_patch_resolution_is_identity_resize():
    """Decoding at the network's own resolution does not resample."""
    logits, loss = _net_outputs()
    pred = decode(logits, loss, (3, 5), Calibration(), "max_softmax", 0.5)
    assert torch.equal(pred.labels, logits.argmax(dim=1))
    assert torch.equal(pred.predicted_loss, loss[:, 0])


def test_decode_rejects_unknown_source():
    """decode() raises ValueError for an unknown uncertainty source."""
    logits, loss = _net_outputs()
    with pytest.raises(ValueError, match="unknown uncertainty source"):
        decode(logits, loss, (3, 5), Calibration(), "nope", 0.5)


def test_node_and_evaluator_share_one_decode():
    """What is evaluated is what is published: the Predictor (the node's core) and the evaluator call this decode."""
    import uncertain_seg_ros.inference.predictor as predictor_module
    import uncertain_seg_training.evaluate as evaluate_module

    assert predictor_module.decode is decode and evaluate_module.decode is decode

"""The overlay's rule: class blend everywhere, masked regions outlined and hatched in the mark colour.

Expected images are computed here in numpy, independently of the torch code: the blend in float32
(alpha 0.25 and 0.5 are exact in binary, so both sides round the same numbers) and the erosion as
an AND over the 9 shifts of the mask padded with True (the frame's edge is not a region border).
Every comparison is exact: the rule says which colour each pixel takes, bytes included.
"""
import numpy as np
import pytest
import torch

from uncertain_seg_ros.overlay import HATCH_PERIOD, MARK_COLOR, erode, marked, overlay


def _blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    out = image.astype(np.float32) * np.float32(1 - alpha) + colours.astype(np.float32) * np.float32(alpha)
    return np.rint(out).astype(np.uint8)


def _eroded(mask: np.ndarray, width: int = 1) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, width, constant_values=True)
    out = np.ones_like(mask)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _hatch(h: int, w: int) -> np.ndarray:
    return (np.arange(h)[:, None] + np.arange(w)) % HATCH_PERIOD == 0


def _frame(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(image, colours, mask, alpha=0.5, **kwargs) -> np.ndarray:
    return overlay(torch.from_numpy(image), torch.from_numpy(colours), torch.from_numpy(mask), alpha, **kwargs).numpy()


def test_overlay_hand_worked():
    """alpha 0.25: 0.75*image + 0.25*colour; a lone masked pixel is all outline: magenta."""
    image = torch.tensor([[[100, 100, 100], [0, 0, 0]]], dtype=torch.uint8)
    colours = torch.tensor([[[200, 0, 0], [0, 200, 0]]], dtype=torch.uint8)
    mask = torch.tensor([[False, True]])
    out = overlay(image, colours, mask, alpha=0.25)
    assert out[0, 0].tolist() == [125, 75, 75]
    assert out[0, 1].tolist() == list(MARK_COLOR)


def test_rectangle_outline_hatch_and_interior():
    """A 12x20 masked rectangle inside a 20x30 frame: its 1-pixel border ring and the masked pixels on
    every 6th diagonal are magenta; its other interior pixels and every unmasked pixel keep the blend."""
    h, w = 20, 30
    image, colours = _frame(h, w)
    mask = np.zeros((h, w), bool)
    mask[3:15, 5:25] = True
    out = _run(image, colours, mask, 0.25)
    blend = _blend(image, colours, 0.25)
    ring = mask.copy()
    ring[4:14, 6:24] = False
    hatch = mask & _hatch(h, w)
    interior_plain = mask & ~ring & ~hatch
    assert ring.sum() == 2 * 12 + 2 * 18 and interior_plain.sum() > 100 and (hatch & ~ring).sum() > 10
    assert (out[ring] == MARK_COLOR).all()
    assert (out[hatch] == MARK_COLOR).all()
    assert np.array_equal(out[interior_plain], blend[interior_plain])
    assert np.array_equal(out[~mask], blend[~mask])
    # the hatch lines are the "/" diagonals: along one, the pixel one step down-left is on it too
    r, c = 8, 12 - (8 + 12) % HATCH_PERIOD
    assert hatch[r, c] and hatch[r + 1, c - 1] and not hatch[r, c + 1]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("width", [1, 2])
def test_random_mask_follows_the_rule(seed, width):
    """Blobs of every shape, touching the frame's edge: marked = mask & ~(eroded & ~hatch) exactly."""
    h, w = 37, 53
    image, colours = _frame(h, w, seed)
    rng = np.random.default_rng(seed + 10)
    coarse = rng.random((h // 4 + 1, w // 4 + 1)) < 0.45
    mask = np.kron(coarse, np.ones((4, 4), bool))[:h, :w] | (rng.random((h, w)) < 0.03)
    expected_marked = mask & ~(_eroded(mask, width) & ~_hatch(h, w))
    assert np.array_equal(marked(torch.from_numpy(mask), outline_width=width).numpy(), expected_marked)
    assert np.array_equal(erode(torch.from_numpy(mask), width).numpy(), _eroded(mask, width))
    out = _run(image, colours, mask, outline_width=width)
    expected = _blend(image, colours, 0.5)
    expected[expected_marked] = MARK_COLOR
    assert np.array_equal(out, expected)


def test_all_masked_frame_is_hatched_without_an_outline():
    """The frame's edge is not a region border: an all-masked frame shows the hatch lines only."""
    h, w = 12, 18
    image, colours = _frame(h, w, 2)
    out = _run(image, colours, np.ones((h, w), bool))
    hatch = _hatch(h, w)
    assert (out[hatch] == MARK_COLOR).all()
    assert np.array_equal(out[~hatch], _blend(image, colours, 0.5)[~hatch])


def test_empty_mask_is_the_plain_blend():
    image, colours = _frame(12, 18, 3)
    assert np.array_equal(_run(image, colours, np.zeros((12, 18), bool)), _blend(image, colours, 0.5))


def test_mark_colour_as_a_device_tensor_and_inputs_left_alone():
    image, colours = _frame(10, 14, 4)
    mask = np.zeros((10, 14), bool)
    mask[2:8, 3:11] = True
    mask_t = torch.from_numpy(mask.copy())
    a = overlay(torch.from_numpy(image), torch.from_numpy(colours), mask_t, 0.5, torch.tensor([0.0, 255.0, 0.0]))
    assert np.array_equal(mask_t.numpy(), mask)
    assert (a.numpy()[2, 3:11] == [0, 255, 0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlay_on_cuda_equals_cpu():
    image, colours = _frame(45, 61, 5)
    mask = np.random.default_rng(5).random((45, 61)) < 0.4
    gpu = overlay(torch.from_numpy(image).cuda(), torch.from_numpy(colours).cuda(), torch.from_numpy(mask).cuda(),
                  0.5, torch.tensor(MARK_COLOR, dtype=torch.float32, device="cuda"))
    assert gpu.device.type == "cuda"
    assert np.array_equal(gpu.cpu().numpy(), _run(image, colours, mask))

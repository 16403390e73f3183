"""Colourising label maps and scalar maps, for numpy arrays and for torch tensors on any device.

The node colourises on the inference device and the evaluation report on the CPU; both go through
the same two functions so that a label or an uncertainty value looks the same everywhere. The
perceptual colormaps are rebuilt at import from compact tables (no matplotlib in the core).
"""
import functools

import numpy as np
import torch

# Every 5th entry (indices 0, 5, ..., 255) of matplotlib's 256-entry LUTs as RGB bytes; linear
# interpolation between them reproduces matplotlib's tables within one 8-bit level.
_CONTROL_STEP = 5
_CONTROL_HEX = {
    "inferno": (
        "00000402020c0504170a072210092d160b391e0c45260c512f0a5b380962400a67490b6a510e6c59106e61136e69166e"
        "71196e781c6d801f6c88226a902568982766a02a63a82e5fb0315bb73557bf3952c63d4dcc4248d34743d94d3ddf5337"
        "e45a31e9612bed6925f1711ff47918f78212f98b0bfa9407fb9d07fca60cfcb014fbba1ffac42af8cd37f6d746f4e156"
        "f2ea69f2f27df5f992fcffa4"
    ),
    "turbo": (
        "30123b36215f3b2f803f3e9c424bb54559cb4666dd4773eb4680f6458cfd4099ff38a5fb2fb2f427bee91fc9dd1ad4d0"
        "18ddc21ae4b622ebaa2ff19b3ff68a52fa7a65fd6979fe598bff4b9cfe40a9fb39b7f735c3f134d0ea34dbe236e5d938"
        "eecf3af5c53afaba39fdae35fea130fe932afc8423f9751df46617ef5811e84b0ce14109d83706ce2d04c32503b71d02"
        "a916019b0f018b09027a0403"
    ),
}
COLORMAPS = tuple(_CONTROL_HEX)


def _build_lut(hex_table: str) -> np.ndarray:
    control = np.frombuffer(bytes.fromhex(hex_table), dtype=np.uint8).reshape(-1, 3).astype(np.float64)
    knots = np.arange(len(control)) * _CONTROL_STEP
    index = np.arange(256)
    channels = [np.interp(index, knots, control[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


_LUTS = {name: _build_lut(table) for name, table in _CONTROL_HEX.items()}
for _lut in _LUTS.values():
    _lut.setflags(write=False)


def lut(name: str = "inferno") -> np.ndarray:
    """The 256 x 3 uint8 RGB lookup table of a colormap (read-only)."""
    try:
        return _LUTS[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; choose one of {COLORMAPS}") from None


@functools.lru_cache(maxsize=16)
def _lut_tensor(name: str, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(lut(name).copy()).to(device)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` (..., 3) as one ``index_select`` of rows: 0.4 ms on a 480x360 frame with 2 CPU
    threads, where advanced indexing took 1.3 ms."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[-1])


def default_palette(num_classes: int) -> np.ndarray:
    """A K x 3 uint8 palette of well-separated colours, for label sets that come without one."""
    if num_classes <= 0:
        return np.zeros((0, 3), dtype=np.uint8)
    # Golden-ratio steps through turbo spread neighbouring class ids far apart in hue.
    positions = (np.arange(num_classes) * 0.6180339887498949 + 0.1) % 1.0
    return lut("turbo")[np.minimum((positions * 256).astype(np.int64), 255)].copy()


def colorize_labels(labels: np.ndarray | torch.Tensor, palette: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """RGB image (..., 3) uint8 of a label map via ``palette`` (K, 3); ignore / out-of-range labels are black.

    Returns the type it is given: numpy in, numpy out; a tensor comes back on its own device (pass
    the palette as a tensor on that device to avoid a host-to-device copy per call).
    """
    if isinstance(labels, torch.Tensor):
        pal = torch.as_tensor(palette, dtype=torch.uint8, device=labels.device).reshape(-1, 3)
        k = pal.shape[0]
        table = torch.cat([pal, pal.new_zeros(1, 3)])
        idx = labels.long()
        return _lookup(table, torch.where((idx >= 0) & (idx < k), idx, k))
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    k = pal.shape[0]
    table = np.concatenate([pal, np.zeros((1, 3), dtype=np.uint8)])
    idx = np.asarray(labels).astype(np.int64)
    idx = np.where((idx >= 0) & (idx < k), idx, k)
    return table[idx]


def colorize_scalar(
    values: np.ndarray | torch.Tensor, name: str = "inferno", vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray | torch.Tensor:
    """RGB image (..., 3) uint8 of a scalar map through a colormap; values are clipped to [vmin, vmax].

    Index ``min(floor(x * 256), 255)`` of the normalised value, as matplotlib maps it; NaN maps to
    the colour of ``vmin``. Numpy in, numpy out; a tensor stays on its device.
    """
    scale = 1.0 / (vmax - vmin) if vmax > vmin else 0.0
    if isinstance(values, torch.Tensor):
        x = (values.float() - vmin) * scale
        x = torch.nan_to_num(x, nan=0.0).clamp(0.0, 1.0)
        idx = torch.floor(x * 256.0).long().clamp_max(255)
        return _lookup(_lut_tensor(name, idx.device), idx)
    x = (np.asarray(values, dtype=np.float32) - np.float32(vmin)) * np.float32(scale)
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0)
    idx = np.minimum(np.floor(x * np.float32(256.0)).astype(np.int64), 255)
    return lut(name)[idx]

"""sensor_msgs/Image and CompressedImage payloads <-> numpy arrays, with cv_bridge's semantics.

Core module (no ROS imports): it works on the plain fields of a message (encoding, height, width,
step, is_bigendian, data), so the node and an offline bag reader share one implementation.

What follows ROS 2 ``cv_bridge`` (``vision_opencv/cv_bridge/src/cv_bridge.cpp``) and
``sensor_msgs/image_encodings.hpp``, as ``cv_bridge.toCvCopy(msg, "rgb8")`` would do it:

* 16-bit to 8-bit: ``convertTo(CV_8U, 255.0 / 65535.0)`` after the colour conversion, i.e.
  ``round(v / 257)`` (saturating, round to nearest); not ``v >> 8``. 257 * k maps to k exactly.
* Bayer: the ROS pattern names the 2x2 tile from the top-left pixel; OpenCV's legacy names are offset
  by one pixel, so ``bayer_rggb`` -> ``COLOR_BayerBG2RGB``, ``bayer_bggr`` -> ``BayerRG``,
  ``bayer_gbrg`` -> ``BayerGR``, ``bayer_grbg`` -> ``BayerGB``. 16-bit Bayer is demosaiced at 16 bit,
  then scaled.
* ``yuv422`` / ``uyvy`` are UYVY byte order (``COLOR_YUV2RGB_UYVY``); ``yuv422_yuy2`` / ``yuyv`` are
  YUYV (``COLOR_YUV2RGB_YUY2``).
* Multi-byte samples whose ``is_bigendian`` differs from the host are byte-swapped (a copy); the rest
  is a view of the message buffer.
* The generic OpenCV types (``8UC1``, ``8UC3``, ...) are rejected for conversion to RGB, as cv_bridge
  does ("[8UC3] is not a color format. but [rgb8] is"): their channel order is unknown.

One deliberate difference: cv_bridge demands ``len(data) == height * step`` exactly. Here data may be
longer (the excess is ignored) and the last row may omit its padding, i.e. the minimum is
``(height - 1) * step + width * bytes_per_pixel``; shorter data is an error. A robot should not drop
frames for a harmless layout quirk of a driver, and nothing outside the described pixels is read.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from .image_header import HeaderError, compressed_size
from .native_stderr import captured_stderr

__all__ = [
    "ImageDataError",
    "ImageTooLargeError",
    "OUTPUT_ENCODINGS",
    "SUPPORTED_ENCODINGS",
    "UnsupportedEncodingError",
    "array_to_raw",
    "bytes_per_pixel",
    "channels",
    "compressed_to_rgb8",
    "image_to_rgb8",
    "raw_to_array",
    "to_rgb8",
]

log = logging.getLogger(__name__)

_U8 = np.dtype(np.uint8)
_U16 = np.dtype(np.uint16)
_F32 = np.dtype(np.float32)

# encoding -> (channels, sample dtype) of the native layout.
_LAYOUTS: dict[str, tuple[int, np.dtype]] = {
    "rgb8": (3, _U8),
    "bgr8": (3, _U8),
    "rgba8": (4, _U8),
    "bgra8": (4, _U8),
    "mono8": (1, _U8),
    "mono16": (1, _U16),
    "rgb16": (3, _U16),
    "bgr16": (3, _U16),
    "rgba16": (4, _U16),
    "bgra16": (4, _U16),
    "bayer_rggb8": (1, _U8),
    "bayer_bggr8": (1, _U8),
    "bayer_gbrg8": (1, _U8),
    "bayer_grbg8": (1, _U8),
    "bayer_rggb16": (1, _U16),
    "bayer_bggr16": (1, _U16),
    "bayer_gbrg16": (1, _U16),
    "bayer_grbg16": (1, _U16),
    "yuv422": (2, _U8),
    "uyvy": (2, _U8),
    "yuv422_yuy2": (2, _U8),
    "yuyv": (2, _U8),
    "32FC1": (1, _F32),
}

# encoding -> OpenCV conversion to RGB (None: already RGB order, only the depth may change).
_RGB_CONVERSIONS: dict[str, int | None] = {
    "rgb8": None,
    "bgr8": cv2.COLOR_BGR2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "mono16": cv2.COLOR_GRAY2RGB,
    "rgb16": None,
    "bgr16": cv2.COLOR_BGR2RGB,
    "rgba16": cv2.COLOR_RGBA2RGB,
    "bgra16": cv2.COLOR_BGRA2RGB,
    "bayer_rggb8": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr8": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg8": cv2.COLOR_BayerGB2RGB,
    "bayer_rggb16": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr16": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg16": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg16": cv2.COLOR_BayerGB2RGB,
    "yuv422": cv2.COLOR_YUV2RGB_UYVY,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2,
    "yuyv": cv2.COLOR_YUV2RGB_YUY2,
}

SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_RGB_CONVERSIONS)
"""Input encodings that :func:`to_rgb8` / :func:`image_to_rgb8` convert to RGB."""

OUTPUT_ENCODINGS: tuple[str, ...] = ("mono8", "mono16", "rgb8", "32FC1")
"""Encodings the node publishes (labels, mask, overlay, uncertainty); :func:`array_to_raw` builds them."""

_RAW_ENCODINGS: tuple[str, ...] = tuple(_LAYOUTS)
_YUV422 = frozenset({"yuv422", "uyvy", "yuv422_yuy2", "yuyv"})
_HOST_IS_BIGENDIAN = sys.byteorder == "big"
# OpenCV's saturating convertTo with cv_bridge's 16 -> 8 bit scale factor.
_SCALE_16_TO_8 = 255.0 / 65535.0


class UnsupportedEncodingError(ValueError):
    """An encoding (or compressed format) this module cannot convert; says which ones it can."""

    def __init__(self, encoding: str, supported: tuple[str, ...] = SUPPORTED_ENCODINGS, reason: str = "") -> None:
        self.encoding = encoding
        self.supported = supported
        detail = f": {reason}" if reason else ""
        super().__init__(f"unsupported image encoding {encoding!r}{detail}; supported: {', '.join(supported)}")


class ImageDataError(ValueError):
    """The message's fields or bytes do not describe a valid image; the message says what is wrong."""


class ImageTooLargeError(ImageDataError):
    """The image declares more pixels than the caller allows; refused before anything is decoded."""

    def __init__(self, what: str, width: int, height: int, max_pixels: int) -> None:
        self.width, self.height, self.max_pixels = width, height, max_pixels
        super().__init__(f"{what} is {width}x{height} ({width * height / 1e6:.1f} MP), above the limit of "
                         f"{max_pixels} pixels ({max_pixels / 1e6:.1f} MP); not decoded")


def _check_pixels(what: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(what, width, height, max_pixels)


def channels(encoding: str) -> int:
    """Channels per pixel of ``encoding`` in its native layout (yuv422 variants: 2 bytes, 2 channels)."""
    return _layout(encoding, _RAW_ENCODINGS)[0]


def bytes_per_pixel(encoding: str) -> int:
    """Bytes per pixel of ``encoding`` (the minimum ``step`` is ``width * bytes_per_pixel``)."""
    n, dtype = _layout(encoding, _RAW_ENCODINGS)
    return n * dtype.itemsize


def raw_to_array(
    encoding: str, height: int, width: int, step: int, is_bigendian: bool | int, data: Any
) -> np.ndarray:
    """The pixels of a sensor_msgs/Image in their native layout, a view of ``data`` where possible.

    Accepts every encoding in SUPPORTED_ENCODINGS plus ``32FC1`` (to read back the node's uncertainty
    images). Shape (H, W) for one channel, else (H, W, C); dtype uint8, uint16 (native byte order) or
    float32 (``32FC1``); the yuv422 variants give the raw interleaved (H, W, 2) uint8. Row padding
    (``step > width * bytes_per_pixel``) becomes a strided view, so nothing is copied unless the
    data's byte order differs from the host's. ``data`` may be bytes, bytearray, memoryview,
    ``array.array('B')`` (what rclpy gives) or a numpy uint8 array. The view is read-only when
    ``data`` is (bytes).

    Raises UnsupportedEncodingError for an unknown encoding and ImageDataError for inconsistent
    fields or too little data (see the module docstring for the length rule).
    """
    n_channels, dtype = _layout(encoding, _RAW_ENCODINGS)
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDataError(f"empty image (height {height} x width {width})")
    pixel_bytes = n_channels * dtype.itemsize
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise ImageDataError(f"step {step} < width {width} x {pixel_bytes} bytes ({encoding})")
    if step % dtype.itemsize:
        raise ImageDataError(f"step {step} is not a multiple of the {dtype.itemsize}-byte sample size of {encoding}")
    if encoding in _YUV422 and width % 2:
        raise ImageDataError(f"{encoding} packs pixel pairs, so its width must be even, got {width}")
    buffer = _as_byte_array(data)
    needed = (height - 1) * step + row_bytes
    if buffer.size < needed:
        padding = f", the last row may omit its {step - row_bytes} bytes of padding" if step > row_bytes else ""
        raise ImageDataError(
            f"data has {buffer.size} bytes, expected at least {needed} (height {height} x step {step}{padding})"
        )
    swap = dtype.itemsize > 1 and bool(is_bigendian) != _HOST_IS_BIGENDIAN
    stored = dtype.newbyteorder(">" if is_bigendian else "<") if swap else dtype
    shape: tuple[int, ...] = (height, width) if n_channels == 1 else (height, width, n_channels)
    strides: tuple[int, ...] = (step, pixel_bytes) if n_channels == 1 else (step, pixel_bytes, dtype.itemsize)
    view = np.ndarray(shape, dtype=stored, buffer=buffer, strides=strides)
    return view.astype(dtype) if swap else view


def to_rgb8(array: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a native-layout array, as ``cv_bridge.toCvCopy(msg, "rgb8")`` gives it.

    BGR is swapped, alpha dropped, mono replicated to three channels, Bayer demosaiced (bilinear,
    OpenCV's code for the ROS pattern), YUV 4:2:2 converted with OpenCV's BT.601 formulas, and 16-bit
    data scaled with ``round(v * 255 / 65535)`` (cv_bridge's ``convertTo`` scale). The input itself
    is returned when it is already contiguous rgb8; otherwise a new contiguous array.
    """
    n_channels, dtype = _layout(encoding, SUPPORTED_ENCODINGS)
    expected_ndim = 2 if n_channels == 1 else 3
    if (
        array.ndim != expected_ndim
        or (n_channels > 1 and array.shape[2] != n_channels)
        or array.dtype.kind != dtype.kind
        or array.dtype.itemsize != dtype.itemsize
    ):
        layout = "(H, W)" if n_channels == 1 else f"(H, W, {n_channels})"
        raise ImageDataError(
            f"{encoding} expects a {layout} {dtype.name} array, got shape {array.shape} dtype {array.dtype}"
        )
    if not array.dtype.isnative:
        array = array.astype(dtype)
    code = _RGB_CONVERSIONS[encoding]
    rgb = array if code is None else cv2.cvtColor(array, code)
    if dtype == _U16:
        rgb = cv2.convertScaleAbs(rgb, alpha=_SCALE_16_TO_8)
    return rgb if rgb.flags.c_contiguous else np.ascontiguousarray(rgb)


def image_to_rgb8(
    encoding: str, height: int, width: int, step: int, is_bigendian: bool | int, data: Any,
    max_pixels: int | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a sensor_msgs/Image's fields: :func:`raw_to_array` then :func:`to_rgb8`.

    For unpadded rgb8 the result is a view of ``data`` (no copy). An image of more than
    ``max_pixels`` pixels raises ImageTooLargeError before anything is converted.
    """
    if encoding not in _RGB_CONVERSIONS:
        raise UnsupportedEncodingError(encoding)
    _check_pixels(f"{encoding} image", int(width), int(height), max_pixels)
    return to_rgb8(raw_to_array(encoding, height, width, step, is_bigendian, data), encoding)


def compressed_to_rgb8(
    fmt: str, data: Any, max_pixels: int | None = None, decoder_log: Callable[[str], None] | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a sensor_msgs/CompressedImage payload (JPEG or PNG).

    ``fmt`` is informational ("jpeg", or image_transport's "rgb8; jpeg compressed bgr8"): the
    compressed plugin always stores BGR (or mono) pixels, which is what ``cv2.imdecode`` returns, so
    the decoded channel count decides the conversion. 16-bit PNGs are scaled like :func:`to_rgb8`.
    ``compressedDepth`` payloads (a custom header before the PNG, depth not colour) are rejected.

    The size is read from the PNG/JPEG header first (:mod:`.image_header`): a payload that is
    neither, or whose header is broken, is ImageDataError, and one declaring more than
    ``max_pixels`` pixels is ImageTooLargeError, both without decoding. What the decoders print on
    stderr is caught: for a payload that does not decode it is part of the error; for one that
    decodes with warnings (e.g. a JPEG with extraneous bytes) each line goes to ``decoder_log``
    (default: this module's logger, WARNING).
    """
    if "compresseddepth" in fmt.lower():
        raise UnsupportedEncodingError(
            fmt,
            ("jpeg", "png", "<encoding>; jpeg compressed <encoding>", "<encoding>; png compressed <encoding>"),
            "compressedDepth images carry depth, not colour",
        )
    buffer = _as_byte_array(data)
    if buffer.size == 0:
        raise ImageDataError(f"empty compressed image (format {fmt!r}, 0 bytes)")
    corrupt = f"corrupt or unsupported compressed image (format {fmt!r}, {buffer.size} bytes)"
    try:
        width, height = compressed_size(buffer)
    except HeaderError as exc:
        raise ImageDataError(f"{corrupt}: {exc}") from None
    _check_pixels(f"compressed image (format {fmt!r})", width, height, max_pixels)
    with captured_stderr() as decoder_lines:
        try:
            decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            decoded = None
    if decoded is None:
        raise ImageDataError(corrupt + (f": {'; '.join(decoder_lines)}" if decoder_lines else ""))
    for line in decoder_lines:
        (decoder_log or _log_decoder_line)(line)
    if decoded.dtype not in (_U8, _U16):
        raise ImageDataError(
            f"compressed image (format {fmt!r}) decodes to {decoded.dtype}; only 8- and 16-bit images are supported"
        )
    n_channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if n_channels not in codes:
        raise ImageDataError(f"compressed image (format {fmt!r}) decodes to {n_channels} channels; expected 1, 3 or 4")
    rgb = cv2.cvtColor(decoded.reshape(decoded.shape[:2]) if n_channels == 1 else decoded, codes[n_channels])
    if rgb.dtype == _U16:
        rgb = cv2.convertScaleAbs(rgb, alpha=_SCALE_16_TO_8)
    return rgb


def _log_decoder_line(line: str) -> None:
    log.warning("image decoder: %s", line)


def array_to_raw(array: np.ndarray, encoding: str) -> tuple[int, int, int, bytes]:
    """(height, width, step, data) of an output image, unpadded, for building a sensor_msgs/Image.

    ``mono8``: (H, W) uint8; ``mono16``: (H, W) uint16; ``rgb8``: (H, W, 3) uint8; ``32FC1``: (H, W)
    float32. Multi-byte samples are written little-endian whatever the host, so the caller sets
    ``is_bigendian = 0``. ``data`` is ``bytes`` because rclpy's ``array.array('B', data)`` copies bytes
    in one block but iterates a memoryview element by element (~40x slower for a 1080p frame).
    """
    if encoding not in OUTPUT_ENCODINGS:
        raise UnsupportedEncodingError(encoding, OUTPUT_ENCODINGS)
    n_channels, dtype = _LAYOUTS[encoding]
    expected_shape = "(H, W)" if n_channels == 1 else f"(H, W, {n_channels})"
    if array.dtype.kind != dtype.kind or array.dtype.itemsize != dtype.itemsize:
        raise ImageDataError(f"{encoding} needs a {expected_shape} {dtype.name} array, got dtype {array.dtype}")
    if (n_channels == 1 and array.ndim != 2) or (n_channels > 1 and (array.ndim != 3 or array.shape[2] != n_channels)):
        raise ImageDataError(f"{encoding} needs a {expected_shape} {dtype.name} array, got shape {array.shape}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageDataError(f"empty image (height {height} x width {width})")
    little = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    return height, width, width * n_channels * dtype.itemsize, little.tobytes()


def _layout(encoding: str, allowed: tuple[str, ...]) -> tuple[int, np.dtype]:
    """(channels, dtype) of an encoding in ``allowed``, else UnsupportedEncodingError listing them."""
    if encoding not in allowed:
        raise UnsupportedEncodingError(encoding, allowed)
    return _LAYOUTS[encoding]


def _as_byte_array(data: Any) -> np.ndarray:
    """A flat uint8 view of a bytes-like payload (copied only for a plain sequence of ints)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)

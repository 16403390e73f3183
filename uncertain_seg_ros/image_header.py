"""Width and height of a PNG or JPEG payload, read from its header before anything is decoded.

A compressed camera frame costs what its header says, not what it weighs: a 12 KB 1-bit PNG can
declare 10000x10000 pixels, which the decoder would expand to 300 MB of RGB and the network's
outputs to tens of GB. Reading the size first lets the caller refuse such a frame for the price of
a few bytes. Only the two formats of image_transport's ``compressed`` plugin are read.

- PNG: the signature, then the IHDR chunk (the PNG specification requires it first) holds width
  and height as big-endian uint32.
- JPEG: SOI, then marker segments up to the first start-of-frame (SOF0..SOF15 except DHT 0xC4,
  JPG 0xC8 and DAC 0xCC), whose fields are precision, height, width (big-endian uint16). Reaching
  the scan (SOS) or the end of the data first means there is no size to read.

Behind this check, :func:`limit_opencv_decoders` sets OpenCV's own cap (it would otherwise decode
up to 2^30 pixels). OpenCV reads it once, when ``cv2`` loads, which is why it lives here, in a
module that does not import ``cv2``.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["DECODER_PIXEL_LIMIT", "HeaderError", "compressed_size", "limit_opencv_decoders"]

DECODER_PIXEL_LIMIT = 8192 * 8192
"""OpenCV's decoder cap set by :func:`limit_opencv_decoders`: 67 MP, above any camera frame."""
OPENCV_PIXEL_VARIABLE = "OPENCV_IO_MAX_IMAGE_PIXELS"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length field
_SOS = 0xDA


class HeaderError(ValueError):
    """The payload is not a PNG or JPEG whose size can be read; the message says what is wrong."""


def limit_opencv_decoders(max_pixels: int = DECODER_PIXEL_LIMIT) -> int:
    """Cap OpenCV's image decoders at ``max_pixels`` unless ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set already;
    return the cap in effect. Effective only in a process that has not loaded ``cv2`` yet."""
    os.environ.setdefault(OPENCV_PIXEL_VARIABLE, str(int(max_pixels)))
    return int(os.environ[OPENCV_PIXEL_VARIABLE])


def compressed_size(data: np.ndarray | bytes) -> tuple[int, int]:
    """(width, height) declared by a PNG or JPEG payload (a flat uint8 array or bytes).

    Raises HeaderError when the payload is neither format or its header is cut short or malformed.
    """
    head = bytes(data[:8])
    if head == PNG_SIGNATURE:
        return _png_size(data)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    raise HeaderError(f"neither PNG nor JPEG (first bytes {head.hex(' ')})")


def _png_size(data: np.ndarray | bytes) -> tuple[int, int]:
    ihdr = bytes(data[8:24])
    if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk after its signature")
    return int.from_bytes(ihdr[8:12], "big"), int.from_bytes(ihdr[12:16], "big")


def _jpeg_size(data: np.ndarray | bytes) -> tuple[int, int]:
    view = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data)).cast("B")
    n, i = len(view), 2
    while i < n:
        if view[i] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {i}, found 0x{view[i]:02x}")
        while i < n and view[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = view[i]
        i += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == _SOS or marker == 0xD9:
            raise HeaderError(f"JPEG reaches its {'scan' if marker == _SOS else 'end'} without a frame header (SOF)")
        if i + 2 > n:
            break
        length = int.from_bytes(view[i : i + 2], "big")
        if length < 2:
            raise HeaderError(f"JPEG segment 0x{marker:02x} at byte {i - 2} has length {length}")
        if marker in _SOF_MARKERS:
            if i + 7 > n:
                break
            height, width = int.from_bytes(view[i + 3 : i + 5], "big"), int.from_bytes(view[i + 5 : i + 7], "big")
            if height == 0 or width == 0:
                raise HeaderError(f"JPEG frame header declares {width}x{height} pixels")
            return width, height
        i += length
    raise HeaderError(f"JPEG ends after {n} bytes without a frame header (SOF)")

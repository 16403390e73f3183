"""Hostile camera messages against a running perception_node: does it stay up, answer, and stay small?

PLACEHOLDER: builders first, runner below.
"""
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: 12 KB for 10000x10000,
    300 MB once decoded to RGB (what crashed the node)."""
    rows = (b"\x00" * (1 + (width + 7) // 8)) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b"")


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the size fields of its frame header (SOF) rewritten to ``width`` x ``height``."""
    data = bytearray(jpeg)
    i = 2
    while data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no frame header in the JPEG")

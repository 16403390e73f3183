"""sensor_msgs image payloads -> RGB, pinned against byte layouts written here with independent numpy code."""
import array
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from uncertain_seg_ros.image_encoding import (
    OUTPUT_ENCODINGS,
    SUPPORTED_ENCODINGS,
    ImageDataError,
    ImageTooLargeError,
    UnsupportedEncodingError,
    array_to_raw,
    bytes_per_pixel,
    channels,
    compressed_to_rgb8,
    image_to_rgb8,
    raw_to_array,
    to_rgb8,
)
from uncertain_seg_ros.image_header import HeaderError, compressed_size
from uncertain_seg_ros.native_stderr import captured_stderr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz_node import jpeg_declaring, png_bomb  # noqa: E402  (the fuzz run's hostile payloads)
H, W = 12, 16
COLOUR = (200, 120, 40)
BAYER = ("bayer_rggb8", "bayer_bggr8", "bayer_gbrg8", "bayer_grbg8",
         "bayer_rggb16", "bayer_bggr16", "bayer_gbrg16", "bayer_grbg16")
YUV = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")


def smooth_rgb(h: int = H, w: int = W) -> np.ndarray:
    """A smooth (linear ramps) RGB image whose three channels all differ."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h - 1, w - 1]).reshape(2, 1, 1)
    return np.rint(np.stack([20 + 200 * x, 30 + 180 * y, 220 - 100 * x - 90 * y], axis=-1)).astype(np.uint8)


def pair_constant(rgb: np.ndarray) -> np.ndarray:
    """The image with each horizontal pixel pair given the pair's left colour (so 4:2:2 chroma is lossless)."""
    out = rgb.copy()
    out[:, 1::2] = out[:, 0::2]
    return out


def mosaic(rgb: np.ndarray, pattern: str) -> np.ndarray:
    """Bayer mosaic: the 2x2 tile's top-left, top-right, bottom-left, bottom-right colours are ``pattern``."""
    out = np.empty(rgb.shape[:2], rgb.dtype)
    for k, letter in enumerate(pattern):
        dy, dx = divmod(k, 2)
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "RGB".index(letter.upper())]
    return out


def bt601_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Limited-range BT.601 Y, U (Cb), V (Cr) per pixel, rounded to uint8."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


def yuv422(rgb: np.ndarray, order: str) -> np.ndarray:
    """(H, W, 2) interleaved 4:2:2 bytes, ``order`` "uyvy" or "yuyv", chroma from each pair's left pixel."""
    y, u, v = bt601_yuv(rgb)
    chroma = np.empty_like(y)
    chroma[:, 0::2] = u[:, 0::2]
    chroma[:, 1::2] = v[:, 0::2]
    return np.stack([chroma, y] if order == "uyvy" else [y, chroma], axis=-1)


def encode(rgb: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(native pixels, expected rgb8) for ``encoding`` made from an 8-bit RGB image."""
    gray = rgb[..., 1]
    wide = rgb.astype(np.uint16) * 257
    alpha8 = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    layouts = {
        "rgb8": (rgb, rgb),
        "bgr8": (rgb[..., ::-1], rgb),
        "rgba8": (np.concatenate([rgb, alpha8], -1), rgb),
        "bgra8": (np.concatenate([rgb[..., ::-1], alpha8], -1), rgb),
        "mono8": (gray, np.stack([gray] * 3, -1)),
        "mono16": (gray.astype(np.uint16) * 257, np.stack([gray] * 3, -1)),
        "rgb16": (wide, rgb),
        "bgr16": (wide[..., ::-1], rgb),
        "rgba16": (np.concatenate([wide, alpha8.astype(np.uint16) * 257], -1), rgb),
        "bgra16": (np.concatenate([wide[..., ::-1], alpha8.astype(np.uint16) * 257], -1), rgb),
    }
    if encoding in layouts:
        native, expected = layouts[encoding]
    elif encoding.startswith("bayer_"):
        pattern = encoding[len("bayer_"):len("bayer_") + 4]
        native, expected = mosaic(wide if encoding.endswith("16") else rgb, pattern), rgb
    else:
        native, expected = yuv422(rgb, "uyvy" if encoding in ("yuv422", "uyvy") else "yuyv"), rgb
    return np.ascontiguousarray(native), expected


def pack(native: np.ndarray, step: int | None = None, bigendian: bool = False, fill: int = 0xEE) -> tuple[int, bytes]:
    """(step, bytes) of native pixels as a message row layout, padding filled with ``fill``."""
    rows = native.astype(native.dtype.newbyteorder(">" if bigendian else "<")).reshape(native.shape[0], -1)
    row_bytes = rows.view(np.uint8).reshape(native.shape[0], -1)
    step = row_bytes.shape[1] if step is None else step
    out = np.full((native.shape[0], step), fill, np.uint8)
    out[:, :row_bytes.shape[1]] = row_bytes
    return step, out.tobytes()


def interior(a: np.ndarray, margin: int = 2) -> np.ndarray:
    """The image without a ``margin``-pixel border (where demosaicing has no full neighbourhood)."""
    return a[margin:-margin, margin:-margin]


@pytest.mark.parametrize("encoding", [e for e in SUPPORTED_ENCODINGS if e not in BAYER + YUV])
def test_exact_encodings_round_trip(encoding):
    """rgb/bgr/alpha/mono, 8 and 16 bit: the encoded bytes decode to exactly the original RGB."""
    rgb = smooth_rgb()
    native, expected = encode(rgb, encoding)
    step, data = pack(native)
    out = image_to_rgb8(encoding, H, W, step, 0, data)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_reproduces_colours(encoding):
    """Bayer: a constant colour is reproduced exactly and linear ramps within 2 in the interior."""
    constant = np.broadcast_to(np.array(COLOUR, np.uint8), (H, W, 3))
    native, _ = encode(constant, encoding)
    step, data = pack(native)
    np.testing.assert_array_equal(interior(image_to_rgb8(encoding, H, W, step, 0, data)),
                                  interior(np.ascontiguousarray(constant)))
    rgb = smooth_rgb()
    native, _ = encode(rgb, encoding)
    step, data = pack(native)
    error = np.abs(interior(image_to_rgb8(encoding, H, W, step, 0, data)).astype(int) - interior(rgb))
    assert error.max() <= 2


@pytest.mark.parametrize("encoding", BAYER)
def test_bayer_pattern_not_swapped(encoding):
    """Pure red stays red (and pure blue blue) for every Bayer pattern, 8 and 16 bit."""
    for colour in ((255, 0, 0), (0, 0, 255)):
        native, _ = encode(np.broadcast_to(np.array(colour, np.uint8), (H, W, 3)), encoding)
        step, data = pack(native)
        out = interior(image_to_rgb8(encoding, H, W, step, 0, data))
        assert (out == colour).all(), (encoding, colour, out[0, 0])


@pytest.mark.parametrize("encoding", YUV)
def test_yuv422_decodes_bt601(encoding):
    """yuv422/uyvy are UYVY and yuv422_yuy2/yuyv are YUYV; decoded colours within 3 of the original."""
    rgb = pair_constant(smooth_rgb())
    native, expected = encode(rgb, encoding)
    step, data = pack(native)
    out = image_to_rgb8(encoding, H, W, step, 0, data)
    assert np.abs(out.astype(int) - expected).max() <= 3
    other = "yuyv" if encoding in ("yuv422", "uyvy") else "uyvy"
    assert np.abs(image_to_rgb8(other, H, W, step, 0, data).astype(int) - expected).max() > 20


def test_sixteen_bit_scaling_is_cv_bridge_convert_to():
    """16 -> 8 bit is round(v * 255 / 65535) for every v (cv_bridge's convertTo), not v >> 8."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    step, data = pack(values)
    out = image_to_rgb8("mono16", 256, 256, step, 0, data)
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert (out[..., 0] != (values >> 8)).any()


@pytest.mark.parametrize("encoding, pad", [("bgr8", 7), ("mono8", 5), ("rgb16", 10), ("bayer_grbg16", 6),
                                           ("yuv422", 6), ("yuyv", 4)])
def test_row_padding_never_leaks(encoding, pad):
    """step > width x bpp with garbage padding gives the same pixels as the unpadded message."""
    rgb = pair_constant(smooth_rgb())
    native, _ = encode(rgb, encoding)
    tight_step, tight = pack(native)
    reference = image_to_rgb8(encoding, H, W, tight_step, 0, tight)
    for fill in (0x00, 0xFF):
        step, data = pack(native, tight_step + pad, fill=fill)
        np.testing.assert_array_equal(image_to_rgb8(encoding, H, W, step, 0, data), reference)
    step, data = pack(native, tight_step + pad)
    np.testing.assert_array_equal(image_to_rgb8(encoding, H, W, step, 0, data[:-pad]), reference)


@pytest.mark.parametrize("encoding", ["mono16", "rgb16"])
def test_big_endian_matches_little_endian(encoding):
    """is_bigendian=1 bytes decode to the same values and RGB as is_bigendian=0 bytes."""
    native, expected = encode(smooth_rgb(), encoding)
    native = native + np.uint16(3)
    little_step, little = pack(native)
    big_step, big = pack(native, bigendian=True)
    assert little != big
    np.testing.assert_array_equal(raw_to_array(encoding, H, W, big_step, True, big), native)
    np.testing.assert_array_equal(raw_to_array(encoding, H, W, little_step, 0, little), native)
    np.testing.assert_array_equal(image_to_rgb8(encoding, H, W, big_step, 1, big), expected)
    np.testing.assert_array_equal(image_to_rgb8(encoding, H, W, little_step, False, little), expected)


@pytest.mark.parametrize("kind", ["bytes", "array", "numpy", "bytearray", "memoryview"])
@pytest.mark.parametrize("pad", [0, 8])
def test_rgb8_is_zero_copy(kind, pad):
    """raw_to_array on rgb8 (padded or not) is a view of the message buffer, for every buffer type."""
    rgb = smooth_rgb()
    step, data = pack(rgb, W * 3 + pad)
    buffer = {"bytes": data, "array": array.array("B", data), "numpy": np.frombuffer(data, np.uint8).copy(),
              "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]
    view = raw_to_array("rgb8", H, W, step, 0, buffer)
    np.testing.assert_array_equal(view, rgb)
    assert np.shares_memory(view, np.frombuffer(buffer, np.uint8))
    if pad == 0:
        out = image_to_rgb8("rgb8", H, W, step, 0, buffer)
        assert np.shares_memory(out, np.frombuffer(buffer, np.uint8))
    else:
        assert not np.shares_memory(image_to_rgb8("rgb8", H, W, step, 0, buffer), np.frombuffer(buffer, np.uint8))


def test_to_rgb8_returns_contiguous_rgb8_itself():
    """to_rgb8 of a contiguous rgb8 array is the very same object; other encodings give new arrays."""
    rgb = smooth_rgb()
    assert to_rgb8(rgb, "rgb8") is rgb
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    out = to_rgb8(bgr, "bgr8")
    assert out is not bgr and not np.shares_memory(out, bgr)


def test_to_rgb8_rejects_wrong_layout():
    """An array whose shape or dtype does not match the encoding is an ImageDataError naming both."""
    with pytest.raises(ImageDataError, match=r"rgb8 expects an? \(H, W, 3\) uint8 array, got shape \(12, 16\)"):
        to_rgb8(np.zeros((H, W), np.uint8), "rgb8")
    with pytest.raises(ImageDataError, match="uint16"):
        to_rgb8(np.zeros((H, W), np.uint8), "mono16")


def test_unknown_encoding_lists_supported():
    """Unknown or generic (8UC3, cv_bridge refuses them as colour) encodings name themselves and the supported list."""
    for encoding in ("8UC3", "nv12", "RGB8"):
        with pytest.raises(UnsupportedEncodingError) as info:
            image_to_rgb8(encoding, H, W, W * 3, 0, bytes(H * W * 3))
        message = str(info.value)
        assert repr(encoding) in message and "rgb8" in message and "bayer_grbg16" in message and "yuyv" in message
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("args, message", [
    (("rgb8", H, W, W * 3 - 1, 0, bytes(H * W * 3)), f"step {W * 3 - 1} < width {W} x 3 bytes"),
    (("rgb16", H, W, W * 5, 0, bytes(H * W * 6)), f"step {W * 5} < width {W} x 6 bytes"),
    (("rgb8", H, W, W * 3, 0, bytes(H * W * 3 - 1)),
     rf"data has {H * W * 3 - 1} bytes, expected at least {H * W * 3} \(height {H} x step {W * 3}\)"),
    (("rgb8", H, W, W * 3 + 4, 0, bytes((H - 1) * (W * 3 + 4) + W * 3 - 1)),
     rf"expected at least {(H - 1) * (W * 3 + 4) + W * 3} \(height {H} x step {W * 3 + 4}, the last row"),
    (("rgb8", 0, W, W * 3, 0, b""), f"empty image \\(height 0 x width {W}\\)"),
    (("mono8", H, 0, W, 0, bytes(H * W)), "empty image \\(height 12 x width 0\\)"),
    (("mono16", H, W, W * 2 + 1, 0, bytes(H * (W * 2 + 1))), f"step {W * 2 + 1} is not a multiple of the 2-byte"),
    (("yuv422", H, W - 1, W * 2, 0, bytes(H * W * 2)), "width must be even"),
])
def test_malformed_messages_say_what_is_wrong(args, message):
    """Inconsistent step, truncated data, empty or odd-step images raise ImageDataError with the numbers."""
    with pytest.raises(ImageDataError, match=message):
        image_to_rgb8(*args)


def test_jpeg_and_png_decode_to_rgb():
    """JPEG and PNG from cv2.imencode decode to RGB whatever the format string says."""
    rgb = smooth_rgb(48, 64)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    png = cv2.imencode(".png", bgr)[1]
    for fmt in ("jpeg", "bgr8; jpeg compressed bgr8", "rgb8; jpeg compressed bgr8"):
        out = compressed_to_rgb8(fmt, array.array("B", jpeg))
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - rgb).mean() < 3
    for fmt, data in (("png", png.tobytes()), ("bgr8; png compressed bgr8", png)):
        np.testing.assert_array_equal(compressed_to_rgb8(fmt, data), rgb)


def test_mono_and_sixteen_bit_png():
    """mono8 PNG is replicated to 3 channels; 16-bit PNGs (mono and colour) are scaled like to_rgb8."""
    gray = smooth_rgb(20, 24)[..., 1]
    mono = cv2.imencode(".png", gray)[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb8("mono8; png compressed mono8", mono), np.stack([gray] * 3, -1))
    mono16 = cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb8("mono16; png compressed mono16", mono16),
                                  np.stack([gray] * 3, -1))
    rgb = smooth_rgb(20, 24)
    bgr16 = cv2.imencode(".png", rgb[..., ::-1].astype(np.uint16) * 257 + 100)[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb8("rgb16; png compressed bgr16", bgr16), rgb)
    bgra = cv2.imencode(".png", np.concatenate([rgb[..., ::-1], np.full((20, 24, 1), 9, np.uint8)], -1))[1]
    np.testing.assert_array_equal(compressed_to_rgb8("bgra8; png compressed bgra8", bgra.tobytes()), rgb)


def test_bad_compressed_payloads():
    """Corrupt or empty payloads are ImageDataError with format and size; compressedDepth is unsupported."""
    jpeg = cv2.imencode(".jpg", smooth_rgb())[1].tobytes()
    corrupt = jpeg[:2] + bytes(range(256)) * 4
    expected = rf"corrupt or unsupported compressed image \(format 'jpeg', {len(corrupt)} bytes\)"
    with pytest.raises(ImageDataError, match=expected):
        compressed_to_rgb8("jpeg", corrupt)
    with pytest.raises(ImageDataError, match="corrupt"):
        compressed_to_rgb8("png", b"not an image at all")
    with pytest.raises(ImageDataError, match=r"empty compressed image \(format 'jpeg', 0 bytes\)"):
        compressed_to_rgb8("jpeg", array.array("B"))
    with pytest.raises(UnsupportedEncodingError, match="16UC1; compressedDepth png"):
        compressed_to_rgb8("16UC1; compressedDepth png", jpeg)


@pytest.mark.parametrize("encoding, value", [
    ("mono8", np.arange(H * W, dtype=np.uint8).reshape(H, W)),
    ("mono16", (np.arange(H * W, dtype=np.uint16) * 300).reshape(H, W)),
    ("rgb8", smooth_rgb()),
    ("32FC1", np.linspace(-1.5, 7.25, H * W, dtype=np.float32).reshape(H, W)),
])
def test_array_to_raw_round_trips(encoding, value):
    """array_to_raw output read back by raw_to_array (is_bigendian=0) is the original array."""
    height, width, step, data = array_to_raw(value, encoding)
    assert (height, width, step) == (H, W, W * bytes_per_pixel(encoding)) and len(data) == H * step
    np.testing.assert_array_equal(raw_to_array(encoding, height, width, step, 0, data), value)
    strided = np.repeat(value, 2, axis=1)[:, ::2]
    assert not strided.flags.c_contiguous
    assert array_to_raw(strided, encoding) == (height, width, step, data)


def test_array_to_raw_writes_little_endian():
    """mono16 and 32FC1 payloads are little-endian whatever the host (the caller sets is_bigendian=0)."""
    assert array_to_raw(np.array([[0x0102]], np.uint16), "mono16")[3] == b"\x02\x01"
    assert array_to_raw(np.array([[0x0102]], ">u2"), "mono16")[3] == b"\x02\x01"
    assert array_to_raw(np.array([[1.0]], np.float32), "32FC1")[3] == np.array([1.0], "<f4").tobytes()


@pytest.mark.parametrize("encoding, value, message", [
    ("mono8", np.zeros((H, W), np.uint16), "dtype uint16"),
    ("mono16", np.zeros((H, W), np.int16), "dtype int16"),
    ("32FC1", np.zeros((H, W), np.float64), "dtype float64"),
    ("rgb8", np.zeros((H, W), np.uint8), r"shape \(12, 16\)"),
    ("rgb8", np.zeros((H, W, 4), np.uint8), r"shape \(12, 16, 4\)"),
    ("mono8", np.zeros((0, W), np.uint8), "empty image"),
])
def test_array_to_raw_rejects_wrong_arrays(encoding, value, message):
    """A dtype or shape that does not fit the output encoding is an ImageDataError saying which."""
    with pytest.raises(ImageDataError, match=message):
        array_to_raw(value, encoding)


def test_array_to_raw_rejects_input_only_encodings():
    """Only the published encodings are written; others raise UnsupportedEncodingError listing them."""
    with pytest.raises(UnsupportedEncodingError, match="supported: mono8, mono16, rgb8, 32FC1"):
        array_to_raw(smooth_rgb(), "bgr8")
    assert OUTPUT_ENCODINGS == ("mono8", "mono16", "rgb8", "32FC1")


def test_layout_queries():
    """bytes_per_pixel and channels follow sensor_msgs/image_encodings for every supported encoding."""
    expected = {"rgb8": (3, 3), "bgra8": (4, 4), "mono16": (1, 2), "rgba16": (4, 8), "bgr16": (3, 6),
                "bayer_gbrg8": (1, 1), "bayer_rggb16": (1, 2), "yuv422": (2, 2), "yuyv": (2, 2), "32FC1": (1, 4)}
    for encoding, (n, bpp) in expected.items():
        assert (channels(encoding), bytes_per_pixel(encoding)) == (n, bpp)
    for encoding in SUPPORTED_ENCODINGS:
        native, _ = encode(smooth_rgb(), encoding)
        assert native.nbytes == H * W * bytes_per_pixel(encoding)
    with pytest.raises(UnsupportedEncodingError):
        bytes_per_pixel("8UC3")


def test_core_module_imports_no_ros():
    """The core module loads without rclpy or any ROS message package."""
    code = ("import sys, uncertain_seg_ros.image_encoding; "
            "ros = ('rclpy', 'sensor_msgs', 'std_msgs', 'rosidl_runtime_py'); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ros]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


CAMERA_LIMIT = 4096 * 3072


def test_png_bomb_refused_from_its_header():
    """The 12 KB PNG that declares 10000x10000 pixels (300 MB as RGB) is refused before decoding,
    with its size and the limit in the message; within the limit it decodes."""
    bomb = png_bomb()
    assert len(bomb) < 16_000 and compressed_size(np.frombuffer(bomb, np.uint8)) == (10_000, 10_000)
    with pytest.raises(ImageTooLargeError, match=r"10000x10000 \(100\.0 MP\), above the limit of 12582912 pixels"):
        compressed_to_rgb8("png", bomb, max_pixels=CAMERA_LIMIT)
    assert compressed_to_rgb8("png", png_bomb(40, 30), max_pixels=1200).shape == (30, 40, 3)


def test_jpeg_size_read_from_its_frame_header():
    """Baseline and progressive JPEGs, with an EXIF-like segment first: the frame header's size is read;
    one rewritten to declare 30000x30000 is refused unread."""
    bgr = smooth_rgb(48, 64)
    app1 = b"\xff\xe1" + (2 + 300).to_bytes(2, "big") + bytes(300)
    for params in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
        jpeg = cv2.imencode(".jpg", bgr, params)[1].tobytes()
        jpeg = jpeg[:2] + app1 + jpeg[2:]
        assert compressed_size(jpeg) == (64, 48)
        with pytest.raises(ImageTooLargeError, match="30000x30000"):
            compressed_to_rgb8("jpeg", jpeg_declaring(jpeg, 30_000, 30_000), max_pixels=CAMERA_LIMIT)


@pytest.mark.parametrize("payload, message", [
    (b"GIF89a" + bytes(20), "neither PNG nor JPEG"),
    (b"\x89PNG\r\n\x1a\n" + bytes(4), "PNG without an IHDR chunk"),
    (b"\xff\xd8\xff\xda" + bytes(10), "scan without a frame header"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", "ends after 10 bytes without a frame header"),
    (b"\xff\xd8\x00\x00", "marker expected at byte 2"),
])
def test_unreadable_headers_are_corrupt_payloads(payload, message):
    with pytest.raises(HeaderError, match=message):
        compressed_size(payload)
    with pytest.raises(ImageDataError, match="corrupt or unsupported compressed image.*" + message):
        compressed_to_rgb8("png", payload)


def test_raw_image_above_the_limit_refused_before_conversion():
    big = image_to_rgb8("mono8", 3072, 4096, 4096, 0, bytes(4096 * 3072), max_pixels=CAMERA_LIMIT)
    assert big.shape == (3072, 4096, 3)
    with pytest.raises(ImageTooLargeError, match=r"rgb8 image is 4097x3072"):
        image_to_rgb8("rgb8", 3072, 4097, 4097 * 3, 0, b"", max_pixels=CAMERA_LIMIT)


def test_decoder_messages_do_not_reach_stderr(capfd):
    """libpng's error on a damaged PNG becomes part of the ImageDataError; libjpeg's warning on a JPEG
    that still decodes goes to ``decoder_log``; nothing is written to the process's stderr."""
    png = bytearray(cv2.imencode(".png", smooth_rgb(48, 64))[1].tobytes())
    png[60] ^= 0xFF  # inside IDAT: its CRC no longer matches
    with pytest.raises(ImageDataError, match="libpng error: IDAT: "):
        compressed_to_rgb8("png", bytes(png))
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    jpeg = bytearray(cv2.imencode(".jpg", noise)[1].tobytes())
    jpeg[len(jpeg) // 2 : len(jpeg) // 2 + 10] = b"\xff\xd0" * 5  # restart markers inside the scan
    said: list[str] = []
    assert compressed_to_rgb8("jpeg", bytes(jpeg), decoder_log=said.append).shape == (48, 64, 3)
    assert said and said[0].startswith("Corrupt JPEG data")
    assert capfd.readouterr().err == ""


def test_captured_stderr_passes_console_lines_back(capfd):
    """Lines that other threads' loggers write meanwhile ("[WARN] ...") go back to stderr unchanged."""
    with captured_stderr() as lines:
        os.write(2, b"[WARN] [1.0] [node]: a log line\nlibpng error: bad\n")
    assert lines == ["libpng error: bad"]
    assert capfd.readouterr().err == "[WARN] [1.0] [node]: a log line\n"


def test_node_floor_caps_opencv_decoders():
    """Importing the node's package caps OpenCV itself (the second barrier, behind the header check)
    at 8192x8192: a larger PNG fails inside OpenCV instead of decoding. OpenCV reads the cap when it
    loads, so this runs in a fresh process."""
    code = ("import uncertain_seg_ros.ros, cv2, numpy as np, sys; sys.path.insert(0, 'benchmarks'); "
            "from fuzz_node import png_bomb; buf = np.frombuffer(png_bomb(8192, 8193), np.uint8); "
            "ok = cv2.imdecode(np.frombuffer(png_bomb(8192, 8192), np.uint8), cv2.IMREAD_UNCHANGED).shape; "
            "assert ok == (8192, 8192), ok\n"
            "try:\n    cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)\nexcept cv2.error as e:\n"
            "    assert 'CV_IO_MAX_IMAGE_PIXELS' in str(e)\nelse:\n    raise AssertionError('decoded')")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60, env=env)

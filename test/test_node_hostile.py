"""perception_node under hostile input and with broken models, on a real ROS 2 graph.

The node must never die, never lie and say what is wrong: frames that declare more pixels than a
camera has are refused from their headers (the node's memory stays flat), frames above
``max_output_pixels`` are answered at a reduced size, decoder noise goes through the throttled
logger, a network that outputs NaN publishes "uncertain" instead of "certain", and /diagnostics
names every active condition at the right level.
"""
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import CompressedImage, Image

from uncertain_seg_ros.bundle import save_bundle
from uncertain_seg_ros.model import UncertainSegmenter

from conftest import REPO, tiny_bundle_config
from ros_graph import NodeProcess, Tester, isolate
from test_node import _header, as_array, latest_status, next_stamp, raw_message, scene

sys.path.insert(0, str(REPO / "benchmarks"))
from fuzz_node import png_bomb  # noqa: E402  (the fuzz run's hostile payloads)

BIG = "/hz_big/image_raw"
SMALL = "/hz_small/image_raw"
RAW = "/hz_raw/image_raw"
MAX_OUTPUT = 1920 * 1080


def _png(rgb: np.ndarray, stamp: int) -> CompressedImage:
    msg = _header(CompressedImage(format="png"), stamp, "cam")
    msg.data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    return msg


def _start(tmp: Path, bundle: Path, cameras: dict[str, type], outputs: tuple[str, ...], **params) -> tuple:
    """A node on ``cameras`` (topic -> message type) and a tester serving ``outputs`` of each."""
    isolate()
    topics = [t + "/compressed" if kind is CompressedImage else t for t, kind in cameras.items()]
    node = NodeProcess({"model": str(bundle), "device": "cpu", "backend": "torch", "input_qos": "reliable",
                        "diagnostics_period": "0.5", "camera_topics": "[" + ",".join(topics) + "]", **params},
                       tmp / "node.log")
    tester = Tester("hostile_tester")
    tester.subscribe(DiagnosticArray, "/diagnostics")
    for topic, kind, source in zip(cameras, cameras.values(), topics):
        tester.publisher(kind, source)
        for output in outputs:
            tester.subscribe(Image, f"{topic.rsplit('/', 1)[0]}/segmentation/{output}")
    view = {"tester": tester}
    try:
        tester.connected(timeout=90)
        for topic in cameras:
            latest_status(view, topic, lambda s: s["outputs_subscribed"] == ",".join(sorted(outputs)), 60)
    except TimeoutError:
        tester.close()
        node.stop()
        pytest.fail("node did not come up:\n" + node.log())
    return node, tester, view


def _answer(tester: Tester, camera: str, output: str, stamp: int, timeout: float = 60.0) -> Image:
    topic = f"{camera.rsplit('/', 1)[0]}/segmentation/{output}"
    tester.wait(lambda: tester.messages(topic, stamp), timeout, f"{output} of {camera} at {stamp}")
    return tester.messages(topic, stamp)[0]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Default limits; two compressed cameras and a raw one; uncertainty_alarm 0, so the alarm is on
    whenever a pixel is uncertain (to see it reported beside other conditions)."""
    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = tiny_bundle_config()
    bundle = save_bundle(tmp / "bundle", UncertainSegmenter(config.model), config)
    node, tester, view = _start(tmp, bundle, {BIG: CompressedImage, SMALL: CompressedImage, RAW: Image},
                                ("labels", "mask"), uncertainty_alarm="0.0")
    yield {"node": node, "tester": tester, "view": view}
    tester.close()
    assert node.stop() == 0, node.log()


def test_png_bomb_is_refused_and_memory_stays_flat(hostile):
    """The 12 KB PNG declaring 10000x10000 (300 MB as RGB; it had the node OOM-killed at 22 GB) is
    refused from its header: counted bad, logged with its size, and the node's peak RSS rises by
    less than the 100 MB its 8-bit grey decode alone would take. The next good frame is answered."""
    node, tester = hostile["node"], hostile["tester"]
    pub = tester.pubs[SMALL + "/compressed"]
    node.reset_peak_rss()
    before = node.peak_rss_mb()
    bomb = _header(CompressedImage(format="png"), next_stamp(), "cam")
    bomb.data = png_bomb()
    pub.publish(bomb)
    latest_status(hostile["view"], SMALL, lambda s: int(s["frames_bad"]) >= 1, 30)
    stamp = next_stamp()
    pub.publish(_png(scene(seed=1), stamp))
    _answer(tester, SMALL, "labels", stamp)
    assert node.peak_rss_mb() - before < 100, (before, node.peak_rss_mb())
    assert "10000x10000 (100.0 MP), above the limit of 12582912 pixels" in node.log()
    assert node.alive()


def test_large_frame_is_answered_at_reduced_size(hostile):
    """A 4000x3000 frame (within max_input_pixels) is answered at the largest size with its aspect
    ratio within max_output_pixels, and the node says so once."""
    tester = hostile["tester"]
    stamp = next_stamp()
    big = cv2.resize(scene(seed=2), (4000, 3000), interpolation=cv2.INTER_NEAREST)
    tester.pubs[BIG + "/compressed"].publish(_png(big, stamp))
    labels = _answer(tester, BIG, "labels", stamp)
    h, w = 1247, 1662  # 3000 and 4000 times sqrt(1920 * 1080 / 12e6), rounded down
    assert (labels.height, labels.width) == (h, w) and h * w <= MAX_OUTPUT < (h + 1) * (w + 1)
    assert labels.header.frame_id == "cam"
    assert hostile["node"].log().count("above max_output_pixels") == 1


def test_decoder_noise_goes_through_the_throttled_logger(hostile):
    """Thirty damaged PNGs: libpng's complaint appears in the node's log at most once per 5 s
    throttle period, inside the node's own warning, never as a bare stderr line."""
    node, tester = hostile["node"], hostile["tester"]
    pub = tester.pubs[SMALL + "/compressed"]
    png = bytearray(_png(scene(seed=3), 0).data)
    png[60] ^= 0xFF
    start = time.monotonic()
    for _ in range(30):
        msg = _header(CompressedImage(format="png"), next_stamp(), "cam")
        msg.data = bytes(png)
        pub.publish(msg)
        time.sleep(0.02)
    stamp = next_stamp()
    pub.publish(_png(scene(seed=4), stamp))
    _answer(tester, SMALL, "labels", stamp)
    elapsed = time.monotonic() - start
    lines = [ln for ln in node.log().splitlines() if "libpng error" in ln]
    assert 1 <= len(lines) <= 1 + elapsed / 5.0, lines
    assert all("bad frame skipped" in ln for ln in lines), lines


def test_unsupported_encodings_are_logged_once_per_topic(hostile):
    """Six different unsupported encodings on one camera: one error line, six bad frames."""
    node, tester = hostile["node"], hostile["tester"]
    bad_before = int(latest_status(hostile["view"], RAW)["frames_bad"])
    for i in range(6):
        msg = raw_message(scene(seed=i), "rgb8", next_stamp())
        msg.encoding = f"fuzz{i}"
        tester.pubs[RAW].publish(msg)
        time.sleep(0.1)
    latest_status(hostile["view"], RAW, lambda s: int(s["frames_bad"]) >= bad_before + 6, 30)
    assert node.log().count("unsupported image encoding") == 1


def test_diagnostics_report_every_active_condition(hostile):
    """A bad frame right after an uncertain one: the message names both, the alarm does not hide it."""
    tester = hostile["tester"]
    stamp = next_stamp()
    tester.pubs[RAW].publish(raw_message(scene(seed=5), "rgb8", stamp))
    _answer(tester, RAW, "labels", stamp)
    status = latest_status(hostile["view"], RAW, lambda s: float(s["uncertain_fraction"]) >= 0, 10)
    if float(status["uncertain_fraction"]) == 0:
        pytest.skip("this random model is certain everywhere, so the alarm cannot be on")
    truncated = raw_message(scene(seed=6), "rgb8", next_stamp())
    truncated.data = bytes(truncated.data)[:100]
    tester.pubs[RAW].publish(truncated)
    status = latest_status(hostile["view"], RAW, lambda s: "bad frames skipped" in s["_message"], 30)
    assert "uncertain pixels" in status["_message"] and status["_level"] == DiagnosticStatus.WARN


def _overflowing_bundle(tmp: Path) -> Path:
    """A model whose weights are all finite but whose head overflows float32: logits inf - inf = NaN."""
    torch.manual_seed(0)
    config = tiny_bundle_config()
    model = UncertainSegmenter(config.model)
    with torch.no_grad():
        w = model.head.conv.weight
        w.copy_(torch.where(torch.arange(w.shape[1]).view(1, -1, 1, 1) % 2 == 0, 3e38, -3e38).expand_as(w))
    return save_bundle(tmp / "overflowing", model, config)


def test_network_that_outputs_nan_fails_closed(tmp_path):
    """Every pixel of a NaN-emitting network is published as uncertain (mask 255, uncertainty 1) and
    /diagnostics is ERROR with the count; before, the mask said *certain* everywhere and status OK."""
    node, tester, view = _start(tmp_path, _overflowing_bundle(tmp_path), {RAW: Image}, ("mask", "uncertainty"))
    try:
        stamp = next_stamp()
        tester.pubs[RAW].publish(raw_message(scene(seed=7), "rgb8", stamp))
        mask = as_array(_answer(tester, RAW, "mask", stamp))
        uncertainty = as_array(_answer(tester, RAW, "uncertainty", stamp))
        assert (mask == 255).all() and (uncertainty == 1.0).all()
        status = latest_status(view, RAW, lambda s: s["_level"] == DiagnosticStatus.ERROR, 30)
        assert "network outputs not finite on 1 frames" in status["_message"]
        assert status["frames_nonfinite"] == "1" and int(status["nonfinite_pixels"]) == mask.size
        assert "non-finite outputs" in node.log()
    finally:
        tester.close()
        node.stop()


def test_failing_and_stalling_inference_turn_diagnostics_error(tmp_path):
    """A real out-of-memory failure, made by capping the node's address space after start-up: the
    12 MP frame's inference fails, is counted and reported ERROR, and a small frame after it is
    answered. Before the cap, the same frame's long inference shows as a stall (stall_timeout 0.2 s)."""
    torch.manual_seed(0)
    config = tiny_bundle_config()
    bundle = save_bundle(tmp_path / "bundle", UncertainSegmenter(config.model), config)
    node, tester, view = _start(tmp_path, bundle, {BIG: CompressedImage}, ("labels",), max_output_pixels="20000000",
                                stall_timeout="0.2", diagnostics_period="0.1")
    pub = tester.pubs[BIG + "/compressed"]
    big = cv2.resize(scene(seed=8), (4000, 3000), interpolation=cv2.INTER_NEAREST)
    try:
        stamp = next_stamp()
        pub.publish(_png(big, stamp))
        status = latest_status(view, BIG, lambda s: "stalled" in s["_message"], 60)
        assert status["_level"] == DiagnosticStatus.ERROR
        _answer(tester, BIG, "labels", stamp)
        latest_status(view, BIG, lambda s: s["_level"] != DiagnosticStatus.ERROR, 30)

        import resource
        cap = int((node.virtual_mb() + 300) * 2**20)
        resource.prlimit(node.proc.pid, resource.RLIMIT_AS, (cap, cap))
        pub.publish(_png(big, next_stamp()))
        status = latest_status(view, BIG, lambda s: int(s["frames_failed"]) >= 1, 60)
        assert status["_level"] == DiagnosticStatus.ERROR and "inference failed on 1 frames" in status["_message"]
        stamp = next_stamp()
        pub.publish(_png(scene(seed=9), stamp))
        _answer(tester, BIG, "labels", stamp)
        assert node.alive()
    finally:
        tester.close()
        node.stop()

"""``uncertain-seg record`` on a real graph: what it writes, and what it says when frames are incomplete."""
import os
import subprocess

import cv2
import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from uncertain_seg_ros.bundle import read_config
from uncertain_seg_ros.legend import SWATCH, Legend, class_items, swatch_layout
from uncertain_seg_ros.montage import GAP, HEADER_HEIGHT, NAME_HEIGHT
from uncertain_seg_ros.ros.camera_stream import OUTPUT_ENCODINGS
from uncertain_seg_ros.ros.conversions import array_to_message
from uncertain_seg_ros.ros.output_recorder import MASK_NOTE, MONTAGE_COLUMNS, folder_montage

from conftest import REPO, installed_script
from ros_graph import Tester, isolate

H, W = 24, 32


def _output(kind: str, header: Header) -> Image:
    encoding = OUTPUT_ENCODINGS[kind]
    if encoding == "32FC1":
        value = np.full((H, W), 0.25, np.float32)
    elif encoding == "mono8":
        value = np.full((H, W), 3, np.uint8)
    else:
        value = np.full((H, W, 3), 100, np.uint8)
    return array_to_message(value, encoding, header)


def test_record_reports_what_is_missing_and_what_the_node_says(tmp_path):
    """Three frames: one whole, one whose input the recorder never got, one without outputs; the node's
    /diagnostics says it dropped one. The recorder lists each gap, explains it, writes a README.txt for
    the folders that look black (labels, uncertainty) and still writes its PNGs."""
    isolate()
    out = tmp_path / "rec"
    proc = subprocess.Popen([installed_script(), "record", "--camera-topic", "/cam/image_raw", "--out", str(out),
                             "--duration", "12", "--model", "camvid_demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    tester = Tester("record_tester")
    try:
        pubs = {kind: tester.publisher(Image, f"/cam/segmentation/{kind}") for kind in OUTPUT_ENCODINGS}
        camera = tester.publisher(Image, "/cam/image_raw")
        diagnostics = tester.publisher(DiagnosticArray, "/diagnostics")
        tester.connected(60)
        stamps = [Header(stamp=Time(sec=100 + i), frame_id="cam") for i in range(3)]
        for i, header in enumerate(stamps):
            if i != 1:
                camera.publish(array_to_message(np.full((H, W, 3), 50 * i, np.uint8), "rgb8", header))
            if i != 2:
                for kind, pub in pubs.items():
                    pub.publish(_output(kind, header))
        counts = {"frames_received": "3", "frames_processed": "2", "frames_dropped": "1", "frames_rate_limited": "0",
                  "frames_bad": "0"}
        status = DiagnosticStatus(name="uncertain_seg_ros: /cam/image_raw", hardware_id="/cam/image_raw",
                                  values=[KeyValue(key=k, value=v) for k, v in counts.items()])
        diagnostics.publish(DiagnosticArray(status=[status]))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        tester.close()
    assert proc.returncode == 0, stderr[-2000:]
    assert "recorded labels 2, labels_color 2, uncertainty 2, uncertainty_color 2, mask 2, overlay 2, input 2" in stdout
    assert "warning: input missing for 1 of 3 frames (stamps 101.000 s)" in stderr
    assert "warning: overlay missing for 1 of 3 frames (stamps 102.000 s)" in stderr
    assert "the node answered frames whose input this recorder never got" in stderr
    assert "the node (its /diagnostics): received 3, processed 2, dropped 1, rate-limited 0, bad 0" in stdout
    readme = (out / "README.txt").read_text()
    assert "labels/" in readme and "looks black" in readme and "value x 65535" in readme and "labels_color/" in readme
    assert "class indices in labels/ (colours: labels_color/ and the montage's legend): 0 sky, 1 building, 2 pole" in readme
    montage = cv2.imread(str(out / "montage.png"))
    assert montage is not None and montage.shape[0] > 200  # one frame, the legend under it
    labels = cv2.imread(str(out / "labels" / "100000000000.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint8 and int(labels.max()) == 3
    assert cv2.imread(str(out / "uncertainty" / "100000000000.png"), cv2.IMREAD_UNCHANGED).max() == round(0.25 * 65535)


def test_folder_montage_has_the_legend_below(tmp_path):
    """Two recorded 360x480 frames: a grid of five columns, then the bundle's legend (+ the mask note)
    exactly as Legend renders it: as wide as the grid, swatch centres in the palette's colours."""
    rng = np.random.default_rng(0)
    stamps = [100_000_000_000, 101_000_000_000]
    for kind in ("input", *MONTAGE_COLUMNS):
        (tmp_path / kind).mkdir(exist_ok=True)
        for stamp in stamps:
            cv2.imwrite(str(tmp_path / kind / f"{stamp}.png"), rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))
    config = read_config(REPO / "models" / "camvid_demo")
    legend = Legend.for_bundle(config, overlay_key=True)
    montage = folder_montage(tmp_path, stamps, legend)
    width = montage.shape[1]
    tile = (width - 6 * GAP) // 5  # 391: five 480 px tiles do not fit the 1980 px limit
    grid_h = HEADER_HEIGHT + 2 * (NAME_HEIGHT + round(tile * 360 / 480)) + GAP
    below = Legend.for_bundle(config, overlay_key=True, notes=[MASK_NOTE]).render(width)
    assert montage.shape == (grid_h + below.shape[0], width, 3) and montage.dtype == np.uint8
    assert np.array_equal(montage[grid_h:], below)
    corners, _ = swatch_layout([t for t, _ in class_items(config.class_names, config.palette)], width)
    for (x, y), colour in zip(corners, config.palette.tolist()):
        assert montage[grid_h + y + SWATCH // 2, x + SWATCH // 2].tolist() == colour
    assert folder_montage(tmp_path, [], legend) is None

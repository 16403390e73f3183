"""Subscribe to a camera's inputs and outputs and write every message as a PNG, plus a montage.

Used by the demo (and usable on a robot: ``uncertain-seg record``). Files are named by topic and
header stamp, so the outputs of one frame sit side by side:
``<out>/<kind>/<stamp_ns>.png``; ``uncertainty`` (32FC1 in [0, 1]) is stored as a 16-bit PNG
(value x 65535) and ``labels`` as class indices, both data that look black in an image viewer:
``<out>/README.txt`` says so, points at the colour versions beside them and, given a legend, names
each class index. The montage carries the legend under its rows.
"""
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image

from ..atomic_io import atomic_write_bytes, atomic_write_text
from ..image_encoding import raw_to_array
from ..inference import OUTPUT_KINDS
from ..legend import Legend, class_items
from ..montage import fit, image_grid, tile_width
from .conversions import message_to_rgb8
from .qos import qos_profile

MONTAGE_COLUMNS = ("input", "overlay", "labels_color", "uncertainty_color", "mask")
FOLDER_NOTES = {
    "input": "the camera image as received (RGB)",
    "overlay": "the image blended with the labels' colours, likely-wrong regions outlined and hatched in magenta",
    "labels_color": "the labels in the bundle's palette",
    "uncertainty_color": "the uncertainty through the node's colour map (bright = likely wrong)",
    "mask": "misclassification mask: white where the uncertainty is above the bundle's threshold",
    "labels": "DATA for programs, looks black: the class index of each pixel (0..K-1); to look at: labels_color/",
    "uncertainty": "DATA for programs, looks dark: uncertainty in [0, 1] as a 16-bit PNG, value x 65535 "
                   "(cv2.imread(path, cv2.IMREAD_UNCHANGED) / 65535); to look at: uncertainty_color/",
}
MASK_NOTE = "mask: white = likely wrong (uncertainty above the mask threshold), the pixels the overlay outlines and hatches"


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


class OutputRecorder:
    """Records one camera: its input topic and the node's outputs under ``namespace``.

    ``qos`` is the outputs' subscription QoS, ``input_qos`` the input's (default: the same).
    ``legend`` (the node's classes, colour map and threshold, where known) goes under the montage
    and names the class indices in README.txt; without it the montage's legend shows only the
    overlay's marking.
    """

    def __init__(self, node: Node, input_topic: str | None, namespace: str, out_dir: Path,
                 kinds: tuple[str, ...] = OUTPUT_KINDS, qos: str = "reliable", compressed: bool = False,
                 input_qos: str | None = None, legend: Legend | None = None) -> None:
        self.out = Path(out_dir)
        self.legend = legend if legend is not None else Legend(colormap=None, overlay_key=True)
        self._lock = threading.Lock()
        self.received: dict[str, dict[int, float]] = defaultdict(dict)
        self.subscriptions = {}
        for kind in kinds:
            self.subscriptions[kind] = node.create_subscription(
                Image, f"{namespace}/{kind}", lambda msg, k=kind: self._on_output(k, msg), qos_profile(qos, 10))
        if input_topic:
            msg_type, topic = (CompressedImage, f"{input_topic}/compressed") if compressed else (Image, input_topic)
            self.subscriptions["input"] = node.create_subscription(
                msg_type, topic, lambda msg: self._on_input(msg), qos_profile(input_qos or qos, 10))
        self._write_readme()

    def _write_readme(self) -> None:
        """``<out>/README.txt``: what each folder holds, since labels/ and uncertainty/ look black in a viewer."""
        width = max(map(len, self.subscriptions)) + 2
        lines = ["One PNG per frame and topic, named by the frame's header stamp in nanoseconds: <folder>/<stamp>.png", ""]
        lines += [f"{kind + '/':{width}} {FOLDER_NOTES[kind]}" for kind in FOLDER_NOTES if kind in self.subscriptions]
        if set(MONTAGE_COLUMNS) <= set(self.subscriptions):
            lines.append(f"{'montage.png':{width}} one row per frame: {', '.join(MONTAGE_COLUMNS)}; the legend below "
                         "them: class colours, the uncertainty colour bar, the overlay's marking")
        if self.legend.palette is not None and "labels" in self.subscriptions:
            names = ", ".join(text for text, _ in class_items(self.legend.class_names, self.legend.palette))
            lines += ["", f"class indices in labels/ (colours: labels_color/ and the montage's legend): {names}"]
        atomic_write_text(self.out / "README.txt", "\n".join(lines) + "\n")

    def connected(self) -> bool:
        """True once every subscription has discovered its publisher."""
        return all(sub.get_publisher_count() > 0 for sub in self.subscriptions.values())

    def _store(self, kind: str, stamp: int, image: np.ndarray) -> None:
        atomic_write_bytes(self.out / kind / f"{stamp}.png", _png(image))
        with self._lock:
            self.received[kind][stamp] = time.monotonic()

    def _on_input(self, msg) -> None:
        self._store("input", stamp_ns(msg), message_to_rgb8(msg))

    def _on_output(self, kind: str, msg: Image) -> None:
        image = raw_to_array(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
        if msg.encoding == "32FC1":
            image = np.round(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16)
        self._store(kind, stamp_ns(msg), image)

    def stamps(self, kind: str) -> set[int]:
        with self._lock:
            return set(self.received[kind])

    def wait_for(self, stamps: set[int], kinds: tuple[str, ...], timeout_s: float) -> bool:
        """Block until every kind has been received for every stamp, or time out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(stamps <= self.stamps(k) for k in kinds):
                return True
            time.sleep(0.05)
        return False

    def missing(self) -> dict[str, list[int]]:
        """Kind -> stamps of frames seen on some other subscribed topic but never on this one."""
        with self._lock:
            got = {kind: set(self.received[kind]) for kind in self.subscriptions}
        seen = set().union(*got.values())
        return {kind: sorted(seen - stamps) for kind, stamps in got.items() if seen - stamps}

    def report(self, node_counts: dict[str, str]) -> list[str]:
        """What was recorded and, where frames are incomplete, what is missing and what the node says it did
        (``node_counts``: the camera's values in the node's last /diagnostics report, {} if none came)."""
        counts = ", ".join(f"{kind} {len(self.stamps(kind))}" for kind in self.subscriptions)
        lines = [f"recorded {counts}"]
        missing = self.missing()
        if not missing:
            return lines
        frames = len(set().union(*(self.stamps(k) for k in self.subscriptions)))
        for kind, stamps in missing.items():
            shown = ", ".join(f"{s / 1e9:.3f}" for s in stamps[:5]) + (", ..." if len(stamps) > 5 else "")
            lines.append(f"warning: {kind} missing for {len(stamps)} of {frames} frames (stamps {shown} s)")
        answered = set().union(*(self.stamps(k) for k in self.subscriptions if k != "input"))
        if set(missing.get("input", ())) & answered:
            lines.append("warning: the node answered frames whose input this recorder never got: its subscription "
                         "matched the publisher after those were sent (start the player after the recorder with "
                         "--wait-subscribers 2, or use transient_local on both sides)")
        if node_counts:
            lines.append("the node (its /diagnostics): " + ", ".join(
                f"{key.removeprefix('frames_').replace('_', '-')} {node_counts[key]}"
                for key in ("frames_received", "frames_processed", "frames_dropped", "frames_rate_limited", "frames_bad")
                if key in node_counts) + " (dropped: a newer frame arrived while it was busy)")
        else:
            lines.append("the node sent no /diagnostics for this camera")
        return lines

    def latencies_ms(self, sent_at: dict[int, float], kind: str) -> np.ndarray:
        """Milliseconds from publishing each input frame to receiving its ``kind`` output."""
        with self._lock:
            got = dict(self.received[kind])
        return np.array([(got[s] - t) * 1000.0 for s, t in sent_at.items() if s in got])

    def write_montage(self, path: Path, max_rows: int = 8) -> Path | None:
        """One row per recorded frame (at most ``max_rows``): input, overlay, labels, uncertainty, mask; the
        legend below."""
        stamps = sorted(set.intersection(*(self.stamps(k) for k in MONTAGE_COLUMNS)))
        image = folder_montage(self.out, stamps, self.legend, max_rows)
        if image is None:
            return None
        atomic_write_bytes(path, _png(image))
        return path


def folder_montage(out: Path, stamps: list[int], legend: Legend, max_rows: int = 8) -> np.ndarray | None:
    """RGB montage of the recorded ``<out>/<kind>/<stamp>.png`` of ``stamps`` (at most ``max_rows``, evenly
    picked), one row per frame, ``MONTAGE_COLUMNS`` as columns, ``legend`` (+ what the mask means) below."""
    if not stamps:
        return None
    picked = [stamps[i] for i in np.linspace(0, len(stamps) - 1, min(max_rows, len(stamps))).round().astype(int)]
    first = cv2.imread(str(out / "input" / f"{picked[0]}.png"))
    width = tile_width(len(MONTAGE_COLUMNS), first.shape[1])
    rows = []
    for stamp in picked:
        tiles = []
        for kind in MONTAGE_COLUMNS:
            image = cv2.cvtColor(cv2.imread(str(out / kind / f"{stamp}.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            tiles.append(fit(image, width, nearest=kind in ("labels_color", "mask")))
        rows.append((f"stamp {stamp / 1e9:.3f} s", tiles))
    grid = image_grid(list(MONTAGE_COLUMNS), rows, width)
    return replace(legend, notes=[*legend.notes, MASK_NOTE]).below(grid)

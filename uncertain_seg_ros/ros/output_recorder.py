"""Subscribe to a camera's inputs and outputs and write every message as a PNG, plus a montage.

Used by the demo (and usable on a robot: ``uncertain-seg record``). Files are named by topic and
header stamp, so the outputs of one frame sit side by side:
``<out>/<kind>/<stamp_ns>.png``; ``uncertainty`` (32FC1 in [0, 1]) is stored as a 16-bit PNG
(value x 65535).
"""
import threading
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image

from ..atomic_io import atomic_write_bytes
from ..image_encoding import raw_to_array
from ..inference import OUTPUT_KINDS
from ..montage import fit, image_grid, tile_width
from .conversions import message_to_rgb8
from .qos import qos_profile

MONTAGE_COLUMNS = ("input", "overlay", "labels_color", "uncertainty_color", "mask")


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
    """

    def __init__(self, node: Node, input_topic: str | None, namespace: str, out_dir: Path,
                 kinds: tuple[str, ...] = OUTPUT_KINDS, qos: str = "reliable", compressed: bool = False,
                 input_qos: str | None = None) -> None:
        self.out = Path(out_dir)
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

    def latencies_ms(self, sent_at: dict[int, float], kind: str) -> np.ndarray:
        """Milliseconds from publishing each input frame to receiving its ``kind`` output."""
        with self._lock:
            got = dict(self.received[kind])
        return np.array([(got[s] - t) * 1000.0 for s, t in sent_at.items() if s in got])

    def write_montage(self, path: Path, max_rows: int = 8) -> Path | None:
        """One row per recorded frame (at most ``max_rows``): input, overlay, labels, uncertainty, mask."""
        stamps = sorted(set.intersection(*(self.stamps(k) for k in MONTAGE_COLUMNS)))
        if not stamps:
            return None
        picked = [stamps[i] for i in np.linspace(0, len(stamps) - 1, min(max_rows, len(stamps))).round().astype(int)]
        first = cv2.imread(str(self.out / "input" / f"{picked[0]}.png"))
        width = tile_width(len(MONTAGE_COLUMNS), first.shape[1])
        rows = []
        for stamp in picked:
            tiles = []
            for kind in MONTAGE_COLUMNS:
                image = cv2.cvtColor(cv2.imread(str(self.out / kind / f"{stamp}.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                tiles.append(fit(image, width, nearest=kind in ("labels_color", "mask")))
            rows.append((f"stamp {stamp / 1e9:.3f} s", tiles))
        atomic_write_bytes(path, _png(image_grid(list(MONTAGE_COLUMNS), rows, width)))
        return path

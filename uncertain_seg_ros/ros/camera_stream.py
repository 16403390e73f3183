"""One subscribed camera: its latest-frame slot, its output publishers and its statistics."""
import threading

from rclpy.node import Node
from sensor_msgs.msg import Image

from ..inference import OUTPUT_KINDS
from .diagnostics import PeriodCounts
from .qos import qos_profile
from .stream_stats import StatsSnapshot, StreamStats
from .topics import output_namespace

OUTPUT_ENCODINGS = {
    "labels": "mono8",
    "labels_color": "rgb8",
    "uncertainty": "32FC1",
    "uncertainty_color": "rgb8",
    "mask": "mono8",
    "overlay": "rgb8",
}


class CameraStream:
    """Latest frame wins: a new frame replaces an unprocessed one, which is counted as dropped."""

    def __init__(self, node: Node, topic: str, outputs: tuple[str, ...], sub_namespace: str, qos: str, depth: int,
                 max_rate_hz: float, labels_encoding: str) -> None:
        self.topic = topic
        self.namespace = output_namespace(topic, sub_namespace)
        self.stats = StreamStats()
        self.encodings = {**OUTPUT_ENCODINGS, "labels": labels_encoding}
        self.publishers = {
            kind: node.create_publisher(Image, f"{self.namespace}/{kind}", qos_profile(qos, depth))
            for kind in OUTPUT_KINDS if kind in outputs
        }
        self._min_period = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
        self._lock = threading.Lock()
        self._slot = None
        self._last_accepted = float("-inf")
        self._warned: set[str] = set()
        self._reported = PeriodCounts()

    def offer(self, msg, now: float) -> bool:
        """Called by the subscription callback; returns True when the frame was queued for inference."""
        self.stats.arrived(now)
        with self._lock:
            if now - self._last_accepted < self._min_period:
                self.stats.count("rate_limited")
                return False
            self._last_accepted = now
            if self._slot is not None:
                self.stats.count("dropped")
            self._slot = (msg, now)
        self.stats.accepted(now)
        return True

    @property
    def pending(self) -> bool:
        """Whether a frame is waiting for inference."""
        with self._lock:
            return self._slot is not None

    def take(self):
        """The waiting (message, arrival time), or None; empties the slot."""
        with self._lock:
            item, self._slot = self._slot, None
        return item

    def settle(self, now: float) -> None:
        """The frame last taken reached its outcome (published, bad, failed, or nobody subscribed)."""
        self.stats.settled(now, self.pending)

    def since_last_report(self, snap: StatsSnapshot) -> PeriodCounts:
        """Bad, failed and non-finite frames since the previous call (one call per diagnostics report)."""
        now = PeriodCounts(bad=snap.bad, failed=snap.failed, nonfinite=snap.nonfinite)
        last, self._reported = self._reported, now
        return PeriodCounts(now.bad - last.bad, now.failed - last.failed, now.nonfinite - last.nonfinite)

    def wanted(self) -> set[str]:
        """Outputs that currently have at least one subscriber."""
        return {kind for kind, pub in self.publishers.items() if pub.get_subscription_count() > 0}

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen on this camera (for log-once warnings; keys are fixed
        names, so the set stays as small as the number of such warnings)."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

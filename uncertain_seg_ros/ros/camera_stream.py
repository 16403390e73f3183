"""One subscribed camera: its latest-frame slot, its output publishers, its calibration and its statistics."""
import threading

from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from ..inference import OUTPUT_KINDS
from .camera_info import camera_info_for
from .diagnostics import PeriodCounts
from .qos import qos_profile
from .stream_stats import StatsSnapshot, StreamStats
from .topics import camera_info_topic, output_namespace

OUTPUT_ENCODINGS = {
    "labels": "mono8",
    "labels_color": "rgb8",
    "uncertainty": "32FC1",
    "uncertainty_color": "rgb8",
    "mask": "mono8",
    "overlay": "rgb8",
}


class CameraStream:
    """Latest frame wins: a new frame replaces an unprocessed one, which is counted as dropped.

    Besides the image outputs it subscribes to the camera's ``camera_info`` (image_transport's place
    for it) and republishes the newest one with each frame's outputs, and it latches the model's
    class names and colours on ``class_info``.
    """

    def __init__(self, node: Node, topic: str, outputs: tuple[str, ...], sub_namespace: str, qos: str, depth: int,
                 max_rate_hz: float, labels_encoding: str, input_qos: str) -> None:
        self.node = node
        self.topic = topic
        self.namespace = output_namespace(topic, sub_namespace)
        self.stats = StreamStats()
        self.encodings = {**OUTPUT_ENCODINGS, "labels": labels_encoding}
        self._qos = qos_profile(qos, depth)
        self._publish_lock = threading.Lock()
        self.publishers: dict[str, object] = {}
        self.set_outputs(outputs)
        self.set_rate(max_rate_hz)
        self.info_source = camera_info_topic(topic)
        self._info: CameraInfo | None = None
        node.create_subscription(CameraInfo, self.info_source, self._on_camera_info, qos_profile(input_qos, 2))
        self._info_publisher = node.create_publisher(CameraInfo, f"{self.namespace}/camera_info", self._qos)
        self._class_info = node.create_publisher(String, f"{self.namespace}/class_info", qos_profile("transient_local", 1))
        self._lock = threading.Lock()
        self._slot = None
        self._last_accepted = float("-inf")
        self._warned: set[str] = set()
        self._reported = PeriodCounts()

    def set_outputs(self, outputs: tuple[str, ...]) -> None:
        """Publish exactly ``outputs`` from now on: publishers are created for new ones, removed for dropped ones."""
        with self._publish_lock:
            for kind in [k for k in self.publishers if k not in outputs]:
                self.node.destroy_publisher(self.publishers.pop(kind))
            for kind in OUTPUT_KINDS:
                if kind in outputs and kind not in self.publishers:
                    self.publishers[kind] = self.node.create_publisher(Image, f"{self.namespace}/{kind}", self._qos)

    def set_rate(self, max_rate_hz: float) -> None:
        self._min_period = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0

    def publish(self, kind: str, msg: Image) -> None:
        """Publish one output, unless it was removed from ``outputs`` meanwhile."""
        with self._publish_lock:
            publisher = self.publishers.get(kind)
            if publisher is not None:
                publisher.publish(msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        if self._info is None:
            self.node.get_logger().info(f"{self.info_source}: camera_info received; republished with the outputs on "
                                        f"{self.namespace}/camera_info")
        self._info = msg

    def publish_camera_info(self, header: Header, height: int, width: int) -> None:
        """The newest camera_info with the outputs' header and size (nothing if none has arrived: said once)."""
        if self._info is None:
            if self.first_time("no camera_info"):
                self.node.get_logger().warning(
                    f"no camera_info on {self.info_source}; {self.namespace}/camera_info is not published until one "
                    "arrives (RViz's Camera display and image_geometry need it; logged once per topic)")
            return
        if self._info_publisher.get_subscription_count() > 0:
            self._info_publisher.publish(camera_info_for(self._info, header, height, width))

    def publish_class_info(self, text: str) -> None:
        """Latch the class names and colours (JSON): late subscribers get the last one."""
        self._class_info.publish(String(data=text))

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
        with self._publish_lock:
            return {kind for kind, pub in self.publishers.items() if pub.get_subscription_count() > 0}

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen on this camera (for log-once warnings; keys are fixed
        names, so the set stays as small as the number of such warnings)."""
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

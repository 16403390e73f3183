"""``uncertain-seg bag play``: publish a bag's image topics into a live ROS 2 graph.

The stand-in for ``ros2 bag play`` where the ros2 CLI is not installed. Messages are published as
recorded (serialised CDR bytes, no decode/re-encode; ROS 1 bags are converted to CDR), keeping the
recorded timing scaled by ``rate``. It waits for subscribers before the first message (discovery
takes a second or two) and for reliable deliveries to be acknowledged before it returns.
"""
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rclpy.duration import Duration
from rclpy.node import Node
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from .qos import qos_profile

log = logging.getLogger(__name__)
PLAYABLE = {"sensor_msgs/msg/Image": Image, "sensor_msgs/msg/CompressedImage": CompressedImage,
            "sensor_msgs/msg/CameraInfo": CameraInfo}


@dataclass
class PlayReport:
    published: dict[str, int] = field(default_factory=dict)
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)
    duration_s: float = 0.0
    subscribers_at_start: dict[str, int] = field(default_factory=dict)
    """Subscriptions matched when each topic's first message went out."""
    subscribers_at_end: dict[str, int] = field(default_factory=dict)

    def late_subscribers(self) -> dict[str, tuple[int, int]]:
        """Topic -> (subscribers at its first message, at the end) where more matched during playback: those
        missed the messages before they matched (all of them if volatile, none if both sides are transient_local)."""
        return {t: (self.subscribers_at_start.get(t, 0), n) for t, n in self.subscribers_at_end.items()
                if n > self.subscribers_at_start.get(t, 0)}


class BagPlayer:
    """Publishes the playable topics of one or more bags from a node the caller spins."""

    def __init__(self, node: Node, paths: Sequence[str | Path], topics: Sequence[str] | None = None,
                 qos: str = "reliable", remap: dict[str, str] | None = None) -> None:
        self.node = node
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"bag {p} does not exist")
        self.remap = remap or {}
        with AnyReader(self.paths, default_typestore=get_typestore(Stores.ROS2_JAZZY)) as reader:
            available = {c.topic: c.msgtype for c in reader.connections}
        wanted = list(topics) if topics else [t for t, m in available.items() if m in PLAYABLE]
        missing = [t for t in wanted if t not in available]
        if missing:
            listing = ", ".join(f"{t} ({m})" for t, m in sorted(available.items()))
            raise ValueError(f"topics {missing} are not in the bag; it has: {listing}")
        unplayable = [t for t in wanted if available[t] not in PLAYABLE]
        if unplayable:
            raise ValueError(f"topics {unplayable} have types this player cannot publish; it plays {sorted(PLAYABLE)}")
        if not wanted:
            raise ValueError(f"no playable topics in {[str(p) for p in self.paths]}")
        self.topics = wanted
        self.publishers = {t: node.create_publisher(PLAYABLE[available[t]], self.remap.get(t, t), qos_profile(qos, 10))
                           for t in wanted}

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 30.0) -> bool:
        """Block until every topic has ``count`` subscribers (DDS discovery), or time out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() >= count for p in self.publishers.values()):
                return True
            time.sleep(0.05)
        return False

    def play(self, rate: float = 1.0, on_publish: Callable[[str, int], None] | None = None) -> PlayReport:
        """Publish every message at its recorded time offset divided by ``rate`` (0 = as fast as possible)."""
        report = PlayReport(published={t: 0 for t in self.topics})
        typestore = get_typestore(Stores.ROS2_JAZZY)
        with AnyReader(self.paths, default_typestore=typestore) as reader:
            connections = [c for c in reader.connections if c.topic in self.publishers]
            start_wall, start_bag = time.monotonic(), None
            for connection, timestamp, raw in reader.messages(connections=connections):
                start_bag = timestamp if start_bag is None else start_bag
                if rate > 0:
                    delay = start_wall + (timestamp - start_bag) / 1e9 / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if reader.is2:
                    data = bytes(raw)
                else:
                    data = bytes(reader.typestore.ros1_to_cdr(raw, connection.msgtype))
                publisher = self.publishers[connection.topic]
                if connection.topic not in report.subscribers_at_start:
                    report.subscribers_at_start[connection.topic] = publisher.get_subscription_count()
                publisher.publish(data)
                report.published[connection.topic] += 1
                report.sent_at[(connection.topic, timestamp)] = time.monotonic()
                if on_publish is not None:
                    on_publish(connection.topic, timestamp)
            report.duration_s = time.monotonic() - start_wall
        for topic, pub in self.publishers.items():
            pub.wait_for_all_acked(Duration(seconds=5.0))
            report.subscribers_at_end[topic] = pub.get_subscription_count()
        return report

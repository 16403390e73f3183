"""End-to-end latency and throughput of a running perception_node, measured from outside it.

A probe node publishes camera frames (reliable) on the node's camera topics and subscribes to the
node's outputs. A frame is answered when every subscribed output carrying its header stamp has
arrived; its latency is that arrival time minus the time it was published, on one clock, in this
process. Two protocols:

* ``round_trip``: one round (a frame on every camera) at a time; the next is sent when the last
  is answered. The unloaded latency, used to choose the paced rate.
* ``paced``: rounds at a fixed rate. Below the node's capacity, latencies are not queueing; above
  it (a camera faster than the node), the node is never idle and the answered frames per second
  are its throughput.

The node keeps only the newest frame per camera, so a frame overtaken by a newer one is dropped by
design; a frame counts as lost once a later frame of its camera has been answered.
"""
import threading
import time
from dataclasses import dataclass, field

from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image

from uncertain_seg_ros.ros.camera_stream import output_namespace
from uncertain_seg_ros.ros.qos import qos_profile

from .profiling import CameraPayload


def payload_message(payload: CameraPayload, frame_id: str = "camera") -> Image | CompressedImage:
    """The Image (raw) or CompressedImage (jpeg) a camera driver would publish for ``payload``."""
    if payload.compressed:
        msg = CompressedImage(format="jpeg")
    else:
        msg = Image(height=payload.height, width=payload.width, encoding=payload.encoding, is_bigendian=0,
                    step=payload.step)
    msg.data = payload.data
    msg.header.frame_id = frame_id
    return msg


@dataclass
class GraphResult:
    """Latencies (seconds) of answered frames, with what was sent, answered and lost."""

    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    answered: int = 0
    lost: int = 0
    duration_s: float = 0.0

    @property
    def fps(self) -> float:
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0


class GraphProbe:
    """Publishes frames on ``camera_topics`` and timestamps the node's outputs ``kinds`` as they arrive."""

    def __init__(self, node: Node, camera_topics: list[str], kinds: tuple[str, ...], compressed: bool,
                 sub_namespace: str = "segmentation", depth: int = 10) -> None:
        self.node, self.topics, self.kinds = node, list(camera_topics), tuple(kinds)
        self._lock = threading.Lock()
        self._sent: dict[tuple[str, int], float] = {}
        self._arrived: dict[tuple[str, int], dict[str, float]] = {}
        self._done: dict[tuple[str, int], float] = {}
        self._stamp = time.time_ns()
        msg_type = CompressedImage if compressed else Image
        self.publishers = {t: node.create_publisher(msg_type, f"{t}/compressed" if compressed else t, qos_profile("reliable", depth))
                           for t in self.topics}
        self.subscriptions = [
            node.create_subscription(Image, f"{output_namespace(t, sub_namespace)}/{kind}",
                                     lambda msg, t=t, k=kind: self._on_output(t, k, msg), qos_profile("reliable", depth))
            for t in self.topics for kind in self.kinds]

    def connected(self) -> bool:
        """Every camera publisher has a subscriber and every output subscription a publisher."""
        return (all(p.get_subscription_count() > 0 for p in self.publishers.values())
                and all(s.get_publisher_count() > 0 for s in self.subscriptions))

    def _on_output(self, topic: str, kind: str, msg: Image) -> None:
        now = time.perf_counter()
        key = (topic, msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
        with self._lock:
            arrived = self._arrived.setdefault(key, {})
            arrived.setdefault(kind, now)
            if len(arrived) == len(self.kinds) and key not in self._done:
                self._done[key] = now

    def send(self, topic: str, msg) -> tuple[str, int]:
        """Publish ``msg`` on camera ``topic`` with a fresh stamp; returns its (topic, stamp) key."""
        self._stamp += 1_000
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(self._stamp, 1_000_000_000)
        key = (topic, self._stamp)
        with self._lock:
            self._sent[key] = time.perf_counter()
        self.publishers[topic].publish(msg)
        return key

    def _state(self, keys: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(answered, lost) among ``keys``: lost = unanswered but overtaken by an answered later frame."""
        with self._lock:
            done = [k for k in keys if k in self._done]
            newest = {}
            for topic, stamp in done:
                newest[topic] = max(newest.get(topic, 0), stamp)
            lost = [k for k in keys if k not in self._done and k[1] < newest.get(k[0], 0)]
        return done, lost

    def _result(self, keys: list[tuple[str, int]], start: float) -> GraphResult:
        done, lost = self._state(keys)
        with self._lock:
            latencies = [self._done[k] - self._sent[k] for k in done]
            end = max((self._done[k] for k in done), default=start)
        return GraphResult(latencies, len(keys), len(done), len(lost), end - start)

    def _wait(self, keys: list[tuple[str, int]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, lost = self._state(keys)
            if len(done) + len(lost) == len(keys):
                return
            time.sleep(0.001)

    def first_answer(self, frames: list[list], timeout: float, retry_s: float = 2.0) -> float:
        """Send rounds until one is answered on every camera; returns the seconds that took.

        Seeing the node's subscription from here does not mean the node has matched this publisher
        yet (discovery completes on each side separately), and a frame sent in between is lost; so a
        round that stays unanswered is sent again, waiting twice as long each time (first inference
        can be slow too).
        """
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            sent = [self.send(t, frames[c][0]) for c, t in enumerate(self.topics)]
            self._wait(sent, min(retry_s, timeout - (time.monotonic() - start)))
            if len(self._state(sent)[0]) == len(sent):
                return time.monotonic() - start
            retry_s = min(2 * retry_s, 60.0)
        raise TimeoutError(f"no answer from the node on every camera within {timeout:.0f} s")

    def round_trip(self, frames: list[list], rounds: int, timeout: float) -> GraphResult:
        """One round (one frame per camera) in flight at a time. ``frames[c]`` are camera c's messages."""
        keys, start = [], time.perf_counter()
        for r in range(rounds):
            sent = [self.send(t, frames[c][r % len(frames[c])]) for c, t in enumerate(self.topics)]
            self._wait(sent, timeout)
            keys += sent
        return self._result(keys, start)

    def paced(self, frames: list[list], rounds: int, rate_hz: float, timeout: float) -> GraphResult:
        """A round every ``1 / rate_hz`` seconds, whether or not the last one was answered."""
        keys, start = [], time.perf_counter()
        for r in range(rounds):
            delay = start + r / rate_hz - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            keys += [self.send(t, frames[c][r % len(frames[c])]) for c, t in enumerate(self.topics)]
        self._wait(keys, timeout)
        return self._result(keys, start)

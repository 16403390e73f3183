"""Helpers for tests on a real ROS 2 graph: an isolated domain, a node process, a spinning tester node."""
import os
import threading
import time
from pathlib import Path

import rclpy

from uncertain_seg_ros.ros.background_spin import BackgroundSpin
from uncertain_seg_ros.ros.demo import isolate_graph, start_node, stop_node
from uncertain_seg_ros.ros.qos import qos_profile


def isolate() -> int:
    """A random private ROS domain on loopback, for this process and the processes it starts."""
    return isolate_graph(None)


class NodeProcess:
    """``perception_node`` in a child process with parameters (the demo's launcher); its output in a log file."""

    def __init__(self, params: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.proc = start_node(params, log_path, env={"OMP_NUM_THREADS": "1"})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _status_kb(self, field: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def peak_rss_mb(self) -> float:
        """Peak resident memory of the node process (Linux VmHWM) since start or the last reset."""
        return self._status_kb("VmHWM") / 1024

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS measurement (Linux: ``5`` to /proc/PID/clear_refs)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def virtual_mb(self) -> float:
        return self._status_kb("VmSize") / 1024

    def stop(self) -> int:
        return stop_node(self.proc)


class Tester:
    """A node in the test process, spun in the background (the node's tools' way), that collects messages by topic.

    It has its own rclpy context on the domain ``isolate()`` chose last, so successive tests on
    different domains do not share a stale context.
    """

    def __init__(self, name: str = "tester") -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=int(os.environ.get("ROS_DOMAIN_ID", "0")))
        self.node = rclpy.create_node(name, context=self.context)
        self.spin = BackgroundSpin(self.node, context=self.context)
        self.lock = threading.Lock()
        self.received: dict[str, list] = {}
        self.subs = {}
        self.pubs = {}

    def subscribe(self, msg_type, topic: str, qos: str = "reliable") -> None:
        self.received.setdefault(topic, [])

        def store(msg, t=topic):
            with self.lock:
                self.received[t].append(msg)

        self.subs[topic] = self.node.create_subscription(msg_type, topic, store, qos_profile(qos, 50))

    def unsubscribe(self, topic: str) -> None:
        self.node.destroy_subscription(self.subs.pop(topic))

    def publisher(self, msg_type, topic: str, qos: str = "reliable"):
        if topic not in self.pubs:
            self.pubs[topic] = self.node.create_publisher(msg_type, topic, qos_profile(qos, 10))
        return self.pubs[topic]

    def wait(self, condition, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.02)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}")

    def connected(self, timeout: float = 60.0) -> None:
        """Wait until every publisher has a subscriber and every subscription a publisher (discovery)."""
        self.wait(lambda: all(p.get_subscription_count() > 0 for p in self.pubs.values())
                  and all(s.get_publisher_count() > 0 for s in self.subs.values()), timeout, "discovery")

    def messages(self, topic: str, stamp_ns: int | None = None) -> list:
        with self.lock:
            msgs = list(self.received.get(topic, []))
        if stamp_ns is None:
            return msgs
        return [m for m in msgs if m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec == stamp_ns]

    def close(self) -> None:
        self.spin.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)

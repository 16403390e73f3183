"""``uncertain-seg demo``: the perception node on a bag, every output written to a folder.

Three parts on a real ROS 2 graph: the node in its own process (as on a robot), and in this
process the bag player and a recorder. The graph is isolated (a random ROS_DOMAIN_ID, discovery
on localhost only) unless a domain is given, and the result does not depend on DDS luck: frames
are published reliable and transient-local (a subscriber whose side of discovery completes a
moment after the player's still receives them), the node is started only once it reports every
output as subscribed, and the demo waits until every frame's outputs have arrived.
"""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from ..bundle import read_config
from ..inference import OUTPUT_KINDS
from ..legend import Legend
from ..resources import resolve_bundle
from .camera_stream import output_namespace
from .dds_transport import large_image_profile, use_transport_profile

log = logging.getLogger(__name__)


def isolate_graph(domain_id: int | None) -> int:
    """Put this process (and its children) on a private DDS domain reachable over loopback only."""
    domain = domain_id if domain_id is not None else random.randint(1, 101)
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    return domain


def start_node(params: dict[str, str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``perception_node`` in a child process, its log in ``log_path``; ``env`` adds environment variables."""
    args = [sys.executable, "-m", "uncertain_seg_ros.ros.perception_node", "--ros-args"]
    for name, value in params.items():
        args += ["-p", f"{name}:={value}"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def stop_node(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class ServingMonitor:
    """Watches /diagnostics for the outputs the node reports as subscribed, and its frame counts, per camera topic.

    Seeing the node's publishers from here does not mean the node has seen our subscriptions yet
    (discovery completes on each side separately), and the node computes only subscribed outputs;
    so the demo starts playing only once the node itself reports every output as subscribed.
    """

    def __init__(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self._serving: dict[str, set[str]] = {}
        self._batch: dict[str, float] = {}
        self._values: dict[str, dict[str, str]] = {}
        self._reports = 0
        self._lock = threading.Condition()
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_diagnostics(self, msg) -> None:
        with self._lock:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                self._values[status.hardware_id] = values
                if "outputs_subscribed" in values:
                    self._serving[status.hardware_id] = set(filter(None, values["outputs_subscribed"].split(",")))
                if values.get("batch_size_mean", "nan") != "nan":
                    self._batch[status.hardware_id] = float(values["batch_size_mean"])
            self._reports += 1
            self._lock.notify_all()

    def latest(self, topic: str) -> dict[str, str]:
        """The camera's values in the node's last report (frames_received, frames_dropped, ...); {} before one."""
        with self._lock:
            return dict(self._values.get(topic, {}))

    def serving(self, topic: str, kinds) -> bool:
        with self._lock:
            return set(kinds) <= self._serving.get(topic, set())

    def batch_size_mean(self, topics, timeout: float = 10.0) -> float | None:
        """Frames per network call in the node's next report (its recent window), averaged over ``topics``."""
        with self._lock:
            reports = self._reports
            self._lock.wait_for(lambda: self._reports > reports, timeout)
            seen = [self._batch[t] for t in topics if t in self._batch]
        return sum(seen) / len(seen) if seen else None


def run_demo(bag: Path, out: Path, model: str = "camvid_demo", topic: str = "/camera/image_raw", rate: float = 1.0,
             device: str = "auto", timeout_s: float = 120.0, domain_id: int | None = None) -> dict:
    """Play ``bag`` into the node, record every output under ``out``, write a montage and a summary."""
    import rclpy

    from .background_spin import BackgroundSpin
    from .bag_player import BagPlayer
    from .output_recorder import MONTAGE_COLUMNS, OutputRecorder
    from .parameters import PARAMETERS

    # the node runs with its default colormap and the bundle's mask threshold: the montage's legend says so
    legend = Legend.for_bundle(read_config(resolve_bundle(model)), colormap=PARAMETERS["colormap"][0], overlay_key=True)

    domain = isolate_graph(domain_id)
    use_transport_profile(large_image_profile())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    node_params = {"model": model, "device": device, "input_qos": "transient_local", "input_depth": "10",
                   "camera_topics": f"[{topic}]",
                   "diagnostics_period": "0.25"}
    proc = start_node(node_params, out / "node.log")
    rclpy.init(args=[])  # not this command's own arguments (rcl reads FROM:=TO ones as ROS remaps)
    node = rclpy.create_node("uncertain_seg_demo")
    spin = BackgroundSpin(node)
    try:
        player = BagPlayer(node, [bag], [topic], qos="transient_local")
        recorder = OutputRecorder(node, topic, output_namespace(topic, "segmentation"), out, input_qos="transient_local",
                                  legend=legend)
        monitor = ServingMonitor(node)
        deadline = time.monotonic() + timeout_s
        print(f"demo: ROS_DOMAIN_ID={domain}; waiting for perception_node (loading {model}) ...", flush=True)
        while not (recorder.connected() and monitor.serving(topic, OUTPUT_KINDS) and player.wait_for_subscribers(2, 0.1)):
            if proc.poll() is not None:
                raise RuntimeError(f"perception_node exited with code {proc.returncode}; see {out / 'node.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"perception_node did not come up within {timeout_s:.0f} s; see {out / 'node.log'}")
            time.sleep(0.1)
        print(f"demo: playing {bag} at rate {rate} ...", flush=True)
        report = player.play(rate)
        stamps = {stamp for (_, stamp) in report.sent_at}
        sent = {stamp: t for (_, stamp), t in report.sent_at.items()}
        complete = recorder.wait_for(stamps, OUTPUT_KINDS, 30.0)
        montage = recorder.write_montage(out / "montage.png")
        latency = recorder.latencies_ms(sent, "overlay")
        summary = {
            "bag": str(bag), "model": model, "ros_domain_id": domain, "frames_in": len(stamps),
            "frames_out": {k: len(stamps & recorder.stamps(k)) for k in OUTPUT_KINDS},
            "all_frames_answered": complete,
            "latency_ms": {"p50": float(np.percentile(latency, 50)) if latency.size else None,
                           "p95": float(np.percentile(latency, 95)) if latency.size else None,
                           "max": float(latency.max()) if latency.size else None},
            "montage": str(montage) if montage else None,
            "montage_columns": list(MONTAGE_COLUMNS),
            "outputs": str(out),
        }
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        spin.stop()
        node.destroy_node()
        rclpy.try_shutdown()
        stop_node(proc)

"""Latest frame wins, rate limiting and topic naming of one camera stream (a real rclpy node, no graph needed)."""
import pytest
import rclpy

from uncertain_seg_ros.inference import OUTPUT_KINDS
from uncertain_seg_ros.ros.camera_stream import CameraStream, output_namespace


@pytest.fixture
def node():
    rclpy.init()
    n = rclpy.create_node("camera_stream_test")
    yield n
    n.destroy_node()
    rclpy.shutdown()


def _stream(node, max_rate_hz=0.0, outputs=OUTPUT_KINDS):
    return CameraStream(node, "/front/image_raw", outputs, "segmentation", "reliable", 10, max_rate_hz, "mono8", "sensor_data")


def test_latest_frame_wins_and_stale_frames_are_counted(node):
    s = _stream(node)
    assert all(s.offer(f"m{i}", now=float(i)) for i in range(3))
    assert s.take() == ("m2", 2.0) and s.take() is None
    snap = s.stats.snapshot(now=3.0)
    assert (snap.received, snap.dropped) == (3, 2)


def test_rate_limit(node):
    s = _stream(node, max_rate_hz=10.0)
    accepted = [s.offer(i, now=t) for i, t in enumerate([0.0, 0.05, 0.12, 0.15, 0.3])]
    assert accepted == [True, False, True, False, True]
    assert s.stats.snapshot(now=0.3).rate_limited == 2


def test_output_topics_and_encodings(node):
    s = _stream(node, outputs=("labels", "overlay"))
    assert s.namespace == "/front/segmentation"
    assert sorted(p.topic_name for p in s.publishers.values()) == ["/front/segmentation/labels", "/front/segmentation/overlay"]
    assert s.encodings["labels"] == "mono8" and s.encodings["uncertainty"] == "32FC1"
    assert s.wanted() == set()
    assert s.info_source == "/front/camera_info"
    assert output_namespace("/robot/cams/left/image_rect", "seg") == "/robot/cams/left/seg"


def test_set_outputs_adds_and_removes_publishers(node):
    """Live ``outputs``: a dropped output's publisher goes (publishing to it is a no-op), a new one is created."""
    s = _stream(node, outputs=("labels", "overlay"))
    s.set_outputs(("labels", "mask"))
    assert sorted(s.publishers) == ["labels", "mask"]
    published = {name for name, _ in node.get_publisher_names_and_types_by_node("camera_stream_test", "/")}
    assert "/front/segmentation/mask" in published and "/front/segmentation/overlay" not in published
    s.publish("overlay", None)  # removed meanwhile: nothing to publish to, and no error

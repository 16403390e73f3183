"""What a ROS engineer expects of the node's parameters, camera_info and legend, on a real ROS 2 graph.

Live parameters are changed with rclpy's own parameter client (what ``ros2 param set`` uses) and their
effect is read off the published outputs; read-only ones are refused; overrides that name no
parameter are reported with the closest name; a wrong-typed value stops the node with one line;
the camera's ``camera_info`` is republished beside the outputs; the class legend is latched.
"""
import json
import time

import numpy as np
import pytest
import torch
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String

from uncertain_seg_ros.bundle import save_bundle
from uncertain_seg_ros.colormap import colorize_scalar
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.ros.camera_info import camera_info_for

from conftest import tiny_bundle_config
from ros_graph import NodeProcess, Tester, isolate
from test_node import as_array, latest_status, next_stamp, raw_message, scene, serve

CAM = "/cam_p/image_raw"
NS = "/cam_p/segmentation"
NO_INFO = "/cam_n/image_raw"  # a camera that publishes no camera_info
KINDS = ("labels", "uncertainty", "uncertainty_color", "mask")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_bundle_config()
    return save_bundle(tmp_path_factory.mktemp("params") / "bundle", UncertainSegmenter(config.model), config)


@pytest.fixture(scope="module")
def live(bundle, tmp_path_factory):
    """A node on one camera, a tester serving four outputs, camera_info and class_info, and a parameter client."""
    isolate()
    node = NodeProcess({"model": str(bundle), "device": "cpu", "backend": "torch", "input_qos": "reliable",
                        "diagnostics_period": "0.25", "camera_topics": f"[{CAM},{NO_INFO}]"},
                       tmp_path_factory.mktemp("live") / "node.log")
    tester = Tester("param_tester")
    tester.publisher(CameraInfo, "/cam_p/camera_info")
    tester.subscribe(CameraInfo, f"{NS}/camera_info")
    tester.subscribe(String, f"{NS}/class_info", qos="transient_local")
    tester.subscribe(CameraInfo, "/cam_n/segmentation/camera_info")
    client = AsyncParameterClient(tester.node, "/perception_node")
    try:
        view = serve(tester, [CAM, NO_INFO], KINDS)
        assert client.wait_for_services(timeout_sec=60), node.log()
    except TimeoutError:
        tester.close()
        node.stop()
        pytest.fail("node did not come up:\n" + node.log())
    yield {"node": node, "tester": tester, "client": client, "view": view}
    tester.close()
    assert node.stop() == 0, node.log()


def _set(live, name: str, value) -> tuple[bool, str]:
    future = live["client"].set_parameters([Parameter(name, value=value)])
    live["tester"].wait(future.done, 30, f"set {name}")
    result = future.result().results[0]
    return result.successful, result.reason


def _frame(live, kinds=KINDS, seed: int = 3) -> tuple[int, dict]:
    tester = live["tester"]
    stamp = next_stamp()
    tester.pubs[CAM].publish(raw_message(scene(seed=seed), "rgb8", stamp))
    tester.wait(lambda: all(tester.messages(f"{NS}/{k}", stamp) for k in kinds), 30, f"outputs of {stamp}")
    return stamp, {k: as_array(tester.messages(f"{NS}/{k}", stamp)[0]) for k in kinds}


def _class_info(live) -> dict:
    return json.loads(live["tester"].messages(f"{NS}/class_info")[-1].data)


def test_mask_threshold_and_colormap_change_live(live):
    """``mask_threshold`` 0 flags every pixel whose uncertainty is above 0, 1 none; ``colormap`` recolours
    the next frame; the latched class_info follows both."""
    assert _set(live, "mask_threshold", 0.0) == (True, "")
    _, out = _frame(live)
    np.testing.assert_array_equal(out["mask"], np.where(out["uncertainty"] > 0.0, 255, 0))
    assert (out["mask"] == 255).mean() > 0.99  # 1 - max softmax of an untrained 3-class model is > 0
    assert _set(live, "mask_threshold", 1.0) == (True, "")
    assert _set(live, "colormap", "turbo") == (True, "")
    _, out = _frame(live)
    assert not out["mask"].any()
    np.testing.assert_array_equal(out["uncertainty_color"], colorize_scalar(out["uncertainty"], "turbo"))
    live["tester"].wait(lambda: _class_info(live)["uncertainty"]["colormap"] == "turbo", 10, "class_info update")
    assert _class_info(live)["mask"]["threshold"] == 1.0
    assert _set(live, "mask_threshold", -1.0) == (True, "")  # back to the bundle's calibrated threshold
    assert _class_info(live)["mask"]["threshold"] == tiny_bundle_config().mask_threshold


def test_bad_live_values_are_refused_with_the_reason(live):
    assert _set(live, "overlay_alpha", 1.5) == (False, "parameter 'overlay_alpha' is 1.5; it must be in [0.0, 1.0]")
    assert _set(live, "colormap", "rainbow") == (False, "parameter 'colormap' is 'rainbow'; allowed: inferno, turbo")
    ok, reason = _set(live, "max_rate_hz", "fast")
    assert not ok and reason == "parameter 'max_rate_hz' is 'fast'; it must be a number"
    ok, reason = _set(live, "outputs", ["labels", "depth"])
    assert not ok and "parameter 'outputs' is 'depth'; allowed" in reason
    future = live["client"].get_parameters(["overlay_alpha", "colormap"])
    live["tester"].wait(future.done, 30, "get")
    assert [v.double_value if v.type == ParameterType.PARAMETER_DOUBLE else v.string_value
            for v in future.result().values] == [0.5, "turbo"]


@pytest.mark.parametrize("name, value", [("model", "camvid_day"), ("backend", "onnxruntime"),
                                         ("camera_topics", ["/other/image_raw"]), ("max_input_pixels", 10)])
def test_parameters_that_cannot_change_live_are_read_only(live, name, value):
    ok, reason = _set(live, name, value)
    assert not ok and "read-only" in reason


def test_outputs_change_live(live):
    """Dropping outputs removes their publishers (nothing more is published there); adding them back serves them."""
    tester = live["tester"]
    assert _set(live, "outputs", ["labels"]) == (True, "")
    tester.wait(lambda: tester.subs[f"{NS}/mask"].get_publisher_count() == 0, 30, "mask publisher removed")
    stamp, _ = _frame(live, kinds=("labels",))
    time.sleep(0.5)
    assert not tester.messages(f"{NS}/mask", stamp) and not tester.messages(f"{NS}/uncertainty", stamp)
    assert _set(live, "outputs", list(KINDS)) == (True, "")
    tester.wait(lambda: all(tester.subs[f"{NS}/{k}"].get_publisher_count() > 0 for k in KINDS), 30, "publishers back")
    latest_status(live["view"], CAM, lambda s: s["outputs_subscribed"] == ",".join(sorted(KINDS)), 30)
    _frame(live)


def test_camera_info_is_republished_with_the_output_header(live):
    tester = live["tester"]
    info = CameraInfo(width=62, height=46, distortion_model="plumb_bob")
    info.k = [50.0, 0.0, 31.0, 0.0, 51.0, 23.0, 0.0, 0.0, 1.0]
    info.p = [50.0, 0.0, 31.0, 0.0, 0.0, 51.0, 23.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.header.frame_id = "cam_optical"
    tester.pubs["/cam_p/camera_info"].publish(info)
    tester.wait(lambda: "camera_info received" in live["node"].log(), 30, "the node to receive camera_info")
    stamp, _ = _frame(live)
    tester.wait(lambda: tester.messages(f"{NS}/camera_info", stamp), 30, "camera_info beside the outputs")
    out = tester.messages(f"{NS}/camera_info", stamp)[0]
    labels = tester.messages(f"{NS}/labels", stamp)[0]
    assert out.header == labels.header and (out.width, out.height) == (labels.width, labels.height)
    assert list(out.k) == list(info.k) and out.distortion_model == "plumb_bob"


def test_class_info_is_latched_for_late_subscribers(live, bundle):
    """A subscriber that comes after the node started still gets the legend: names and palette of the bundle."""
    late = Tester("late_legend")
    try:
        late.subscribe(String, f"{NS}/class_info", qos="transient_local")
        late.wait(lambda: late.messages(f"{NS}/class_info"), 30, "latched class_info")
        info = json.loads(late.messages(f"{NS}/class_info")[-1].data)
    finally:
        late.close()
    config = tiny_bundle_config()
    assert [(c["id"], c["name"], tuple(c["color"])) for c in info["classes"]] == [(c.id, c.name, c.color) for c in config.classes]
    assert info["labels"]["encoding"] == "mono8" and info["uncertainty"]["encoding"] == "32FC1"


def test_no_camera_info_is_said_once(live):
    """A camera without camera_info: the node says so once, not per frame, and publishes none."""
    tester = live["tester"]
    for seed in (5, 6):
        stamp = next_stamp()
        tester.pubs[NO_INFO].publish(raw_message(scene(seed=seed), "rgb8", stamp))
        tester.wait(lambda: tester.messages("/cam_n/segmentation/labels", stamp), 30, f"outputs of {stamp}")
    assert live["node"].log().count("no camera_info on /cam_n/camera_info") == 1
    assert not tester.messages("/cam_n/segmentation/camera_info")


def test_camera_info_is_scaled_to_reduced_outputs():
    """Outputs shrunk by max_output_pixels: focal lengths, principal point and ROI scale with the image."""
    info = CameraInfo(width=4000, height=3000)
    info.k = [2000.0, 0.0, 2000.0, 0.0, 2100.0, 1500.0, 0.0, 0.0, 1.0]
    info.p = [2000.0, 0.0, 2000.0, -100.0, 0.0, 2100.0, 1500.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.roi.x_offset, info.roi.width = 400, 3200
    header = Header(frame_id="cam")
    out = camera_info_for(info, header, 1500, 2000)
    assert (out.width, out.height) == (2000, 1500) and out.header.frame_id == "cam"
    assert list(out.k) == [1000.0, 0.0, 1000.0, 0.0, 1050.0, 750.0, 0.0, 0.0, 1.0]
    assert list(out.p)[:7] == [1000.0, 0.0, 1000.0, -50.0, 0.0, 1050.0, 750.0]
    assert (out.roi.x_offset, out.roi.width) == (200, 1600)
    assert list(info.k)[0] == 2000.0  # the camera's message is not modified
    same = camera_info_for(info, header, 3000, 4000)
    assert list(same.k) == list(info.k) and same.header.frame_id == "cam"


def test_unknown_parameters_are_named_with_the_closest_match(bundle, tmp_path):
    isolate()
    node = NodeProcess({"model": str(bundle), "device": "cpu", "mask_treshold": "0.4", "bogus_param": "1",
                        "camera_topics": "[/cam_u/image_raw]"}, tmp_path / "node.log")
    try:
        deadline = time.monotonic() + 60
        while "segmenting /cam_u" not in node.log() and node.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = node.log()
        assert node.alive(), log
        assert "parameter 'mask_treshold' is not a parameter of this node and is ignored; did you mean 'mask_threshold'?" in log
        assert "parameter 'bogus_param' is not a parameter of this node and is ignored; the parameters are: model," in log
    finally:
        node.stop()


@pytest.mark.parametrize("param, value, message", [
    ("camera_topics", "/cam/image_raw",
     "parameter 'camera_topics' is '/cam/image_raw' (string); it must be a string array; e.g. camera_topics:=\"[/camera/image_raw]\""),
    ("colormap", "3", "parameter 'colormap' is 3 (integer); it must be a string"),
])
def test_wrong_type_stops_the_node_with_one_line(bundle, tmp_path, param, value, message):
    node = NodeProcess({"model": str(bundle), "device": "cpu", param: value}, tmp_path / "node.log")
    assert node.proc.wait(timeout=60) == 1
    log = node.log()
    assert message in log and "Traceback" not in log
    assert len([line for line in log.splitlines() if "FATAL" in line]) == 1

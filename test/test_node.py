"""perception_node end to end on a real ROS 2 graph: the node in its own process, this process publishes
camera frames and subscribes to every output. Isolated on a random domain over loopback; reliable QoS
and explicit discovery waits, so no frame is left to DDS luck."""
import math
import time

import numpy as np
import pytest
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import CompressedImage, Image

import cv2

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.image_encoding import SUPPORTED_ENCODINGS, image_to_rgb8
from uncertain_seg_ros.inference import OUTPUT_KINDS

from conftest import core_prediction
from ros_graph import NodeProcess, Tester, isolate

CAMERAS = ["/cam_a/image_raw", "/cam_b/image_raw", "/cam_idle/image_raw"]
MIXED = "/cam_m/image_raw/compressed"
ENCODINGS = {"labels": "mono8", "labels_color": "rgb8", "uncertainty": "32FC1", "uncertainty_color": "rgb8",
             "mask": "mono8", "overlay": "rgb8"}
_stamp = [1_000]


def next_stamp() -> int:
    _stamp[0] += 1
    return _stamp[0] * 1_000_000 + 17


def _header(msg, stamp_ns: int, frame_id: str):
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = frame_id
    return msg


def _pixels(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The pixel array of ``encoding`` made from RGB with plain numpy (independent of the node's code)."""
    h, w, _ = rgb.shape
    grey = (rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    alpha = np.full((h, w, 1), 255, np.uint8)
    base = encoding.removesuffix("16").removesuffix("8")
    if base.startswith("bayer_"):
        pattern = base[6:]
        px = np.zeros((h, w), np.uint8)
        for (dy, dx), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], pattern):
            px[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    elif encoding in ("yuv422", "uyvy", "yuv422_yuy2", "yuyv"):
        yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV)
        chroma = np.empty((h, w), np.uint8)
        chroma[:, 0::2], chroma[:, 1::2] = yuv[:, 0::2, 1], yuv[:, 0::2, 2]
        pair = [chroma, yuv[..., 0]] if encoding in ("yuv422", "uyvy") else [yuv[..., 0], chroma]
        return np.dstack(pair)
    else:
        px = {"rgb": rgb, "bgr": rgb[..., ::-1], "rgba": np.dstack([rgb, alpha]), "bgra": np.dstack([rgb[..., ::-1], alpha]),
              "mono": grey}[base]
    return px.astype(np.uint16) * 257 if encoding.endswith("16") else px


def raw_message(rgb: np.ndarray, encoding: str, stamp_ns: int, pad: int = 0, big_endian: bool = False) -> Image:
    """An Image in ``encoding`` with ``pad`` garbage bytes per row and the given byte order."""
    h, w, _ = rgb.shape
    px = _pixels(rgb, encoding)
    if px.dtype == np.uint16:
        px = px.astype(">u2" if big_endian else "<u2")
    row = np.ascontiguousarray(px).view(np.uint8).reshape(h, -1)
    row = np.hstack([row, np.full((h, pad), 77, np.uint8)])
    msg = Image(height=h, width=w, encoding=encoding, is_bigendian=int(big_endian), step=row.shape[1])
    msg.data = row.tobytes()
    return _header(msg, stamp_ns, "cam_optical")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """One node process on three cameras (two with subscribers, one idle) and a tester node."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import tiny_bundle_config
    from uncertain_seg_ros.bundle import save_bundle
    from uncertain_seg_ros.model import UncertainSegmenter

    tmp = tmp_path_factory.mktemp("node")
    torch.manual_seed(0)
    config = tiny_bundle_config()
    bundle_path = save_bundle(tmp / "bundle", UncertainSegmenter(config.model), config)
    isolate()
    node = NodeProcess({"model": str(bundle_path), "device": "cpu", "backend": "torch", "input_qos": "reliable", "diagnostics_period": "0.5",
                        "camera_topics": "[" + ",".join(CAMERAS + [MIXED]) + "]"}, tmp / "node.log")
    tester = Tester()
    tester.subscribe(DiagnosticArray, "/diagnostics")
    for cam in CAMERAS[:2]:
        ns = cam.rsplit("/", 1)[0] + "/segmentation"
        for kind in OUTPUT_KINDS:
            tester.subscribe(Image, f"{ns}/{kind}")
    for cam in CAMERAS:
        tester.publisher(Image, cam)
    tester.publisher(CompressedImage, MIXED)
    for kind in OUTPUT_KINDS:
        tester.subscribe(Image, f"/cam_m/segmentation/{kind}")
    try:
        tester.connected(timeout=90)
        graph = {"node": node, "tester": tester, "bundle": load_bundle(bundle_path)}
        for cam in CAMERAS[:2]:
            latest_status(graph, cam, lambda s: s["outputs_subscribed"] == ",".join(sorted(OUTPUT_KINDS)), 30)
    except TimeoutError:
        pytest.fail("node did not come up:\n" + node.log())
    yield graph
    tester.close()
    code = node.stop()
    assert code == 0, node.log()


def outputs_for(graph, camera: str, stamp: int, timeout: float = 30.0) -> dict:
    tester = graph["tester"]
    ns = camera.rsplit("/", 1)[0] + "/segmentation"
    tester.wait(lambda: all(tester.messages(f"{ns}/{k}", stamp) for k in OUTPUT_KINDS), timeout, f"outputs of {stamp}")
    return {k: tester.messages(f"{ns}/{k}", stamp)[0] for k in OUTPUT_KINDS}


def as_array(msg: Image) -> np.ndarray:
    dtype = {"mono8": np.uint8, "rgb8": np.uint8, "32FC1": np.float32, "mono16": np.uint16}[msg.encoding]
    array = np.frombuffer(bytes(msg.data), dtype=dtype).reshape(msg.height, msg.width, -1)
    return array[..., 0] if array.shape[-1] == 1 else array


def scene(h: int = 46, w: int = 62, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = (140, 170, 220)
    img[h // 2 :] = (90, 90, 90)
    return np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("encoding, pad, big", [
    *[(e, 0, False) for e in SUPPORTED_ENCODINGS],
    ("rgb8", 6, False), ("rgba8", 4, False), ("mono8", 3, False), ("mono16", 4, True), ("rgb16", 2, True),
    ("bgra16", 8, True), ("bayer_gbrg16", 4, True), ("yuv422", 4, False), ("yuyv", 8, False)])
def test_every_encoding_gives_the_core_prediction(graph, encoding, pad, big):
    """Outputs have the input header, the camera's size, the documented encodings, and equal the core's result."""
    rgb = scene(seed=len(encoding) + pad)
    stamp = next_stamp()
    msg = raw_message(rgb, encoding, stamp, pad, big)
    graph["tester"].pubs[CAMERAS[0]].publish(msg)
    out = outputs_for(graph, CAMERAS[0], stamp)
    expected_rgb = image_to_rgb8(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    ref = core_prediction(graph["bundle"], expected_rgb)
    for kind, m in out.items():
        assert m.encoding == ENCODINGS[kind] and (m.height, m.width) == rgb.shape[:2]
        assert m.header.frame_id == "cam_optical"
    assert np.array_equal(as_array(out["labels"]), ref.labels[0].numpy())
    np.testing.assert_allclose(as_array(out["uncertainty"]), ref.uncertainty[0].numpy(), atol=1e-5)
    assert np.array_equal(as_array(out["mask"]), ref.mask[0].numpy().astype(np.uint8) * 255)
    assert set(np.unique(as_array(out["mask"]))) <= {0, 255}
    assert np.array_equal(as_array(out["labels_color"]), graph["bundle"].config.palette[ref.labels[0].numpy()])


def test_bad_frames_interleaved_with_good_ones(graph):
    """Unsupported encoding, wrong step, truncated data and an empty image are skipped; every good frame is answered."""
    pub = graph["tester"].pubs[CAMERAS[0]]
    good = []
    for i, bad in enumerate(["unsupported", "step", "truncated", "empty", "unsupported"]):
        msg = raw_message(scene(seed=i), "rgb8", next_stamp())
        if bad == "unsupported":
            msg.encoding = "64FC1"
        elif bad == "step":
            msg.step = 10
        elif bad == "truncated":
            msg.data = bytes(msg.data)[: len(msg.data) // 2]
        else:
            msg.height = msg.width = msg.step = 0
            msg.data = b""
        pub.publish(msg)
        time.sleep(0.3)
        ok = raw_message(scene(seed=10 + i), "rgb8", next_stamp())
        pub.publish(ok)
        good.append(int(ok.header.stamp.sec * 1e9) + ok.header.stamp.nanosec)
        outputs_for(graph, CAMERAS[0], good[-1])
    assert graph["node"].alive()
    log = graph["node"].log()
    assert log.count("64FC1") == 1, "unsupported encodings are logged once per topic"
    status = latest_status(graph, CAMERAS[0], lambda s: int(s["frames_bad"]) >= 5)
    assert int(status["frames_bad"]) >= 5


def test_two_cameras_at_once(graph):
    """Frames on two cameras published together are each answered on their own camera's topics."""
    tester = graph["tester"]
    stamps = {}
    for i, cam in enumerate(CAMERAS[:2]):
        stamps[cam] = next_stamp()
        msg = raw_message(scene(seed=40 + i), "rgb8", stamps[cam])
        msg.header.frame_id = f"frame_{i}"
        tester.pubs[cam].publish(msg)
    for i, cam in enumerate(CAMERAS[:2]):
        out = outputs_for(graph, cam, stamps[cam])
        assert all(m.header.frame_id == f"frame_{i}" for m in out.values())
        ref = core_prediction(graph["bundle"], scene(seed=40 + i))
        assert np.array_equal(as_array(out["labels"]), ref.labels[0].numpy())


def latest_status(graph, camera: str, condition=lambda s: True, timeout: float = 10.0) -> dict:
    tester = graph["tester"]
    found = {}

    def check():
        for array in reversed(tester.messages("/diagnostics")):
            for s in array.status:
                if s.hardware_id == camera:
                    values = {kv.key: kv.value for kv in s.values}
                    values["_level"], values["_message"] = s.level, s.message
                    if condition(values):
                        found.update(values)
                        return True
                    return False
        return False

    tester.wait(check, timeout, f"diagnostics of {camera}")
    return found


def test_raw_and_compressed_cameras_mixed(graph):
    """A topic listed as .../compressed is read as CompressedImage; its outputs go under the base topic's namespace."""
    rgb = scene(seed=21)
    stamp = next_stamp()
    msg = _header(CompressedImage(format="png"), stamp, "cam_m")
    msg.data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    graph["tester"].pubs[MIXED].publish(msg)
    out = outputs_for(graph, "/cam_m/image_raw", stamp)
    assert np.array_equal(as_array(out["labels"]), core_prediction(graph["bundle"], rgb).labels[0].numpy())


def test_no_subscribers_no_computation(graph):
    """Frames on a camera whose outputs nobody subscribes to are received but not processed."""
    pub = graph["tester"].pubs[CAMERAS[2]]
    for _ in range(3):
        pub.publish(raw_message(scene(), "rgb8", next_stamp()))
        time.sleep(0.2)
    status = latest_status(graph, CAMERAS[2], lambda s: int(s["frames_received"]) >= 3)
    assert status["frames_processed"] == "0" and status["outputs_subscribed"] == ""


def test_diagnostics_content(graph):
    """Per camera: rates, latency percentiles, drops, backend, device, model id and the uncertainty alarm."""
    stamp = next_stamp()
    graph["tester"].pubs[CAMERAS[1]].publish(raw_message(scene(seed=3), "rgb8", stamp))
    outputs_for(graph, CAMERAS[1], stamp)
    s = latest_status(graph, CAMERAS[1], lambda s: int(s["frames_processed"]) >= 1)
    for key in ("input_rate_hz", "output_rate_hz", "latency_p50_ms", "latency_p95_ms", "frames_dropped",
                "frames_rate_limited", "uncertain_fraction", "uncertainty_alarm", "batch_size_mean"):
        assert math.isfinite(float(s[key])), key
    assert s["backend"] == "torch" and s["device"] == "cpu" and s["model_id"] == graph["bundle"].model_id
    alarm = float(s["uncertain_fraction"]) > float(s["uncertainty_alarm"])
    assert (s["_level"] == DiagnosticStatus.WARN) == alarm
    assert ("uncertain pixels" in s["_message"]) == alarm


def test_compressed_transport_and_corrupt_jpeg(graph, tmp_path):
    """transport=compressed subscribes to <topic>/compressed; JPEG and PNG frames are answered, corrupt ones skipped."""
    node = NodeProcess({"model": str(graph["bundle"].path), "device": "cpu", "input_qos": "reliable",
                        "transport": "compressed", "camera_topics": "[/cam_z/image_raw]"}, tmp_path / "node.log")
    tester = Tester("compressed_tester")
    try:
        pub = tester.publisher(CompressedImage, "/cam_z/image_raw/compressed")
        for kind in OUTPUT_KINDS:
            tester.subscribe(Image, f"/cam_z/segmentation/{kind}")
        tester.subscribe(DiagnosticArray, "/diagnostics")
        tester.connected(timeout=90)
        everything = ",".join(sorted(OUTPUT_KINDS))
        latest_status({"tester": tester}, "/cam_z/image_raw", lambda s: s["outputs_subscribed"] == everything, 30)
        rgb = scene(seed=7)
        for fmt, ext in [("jpeg", ".jpg"), ("rgb8; png compressed bgr8", ".png"), ("corrupt", ".jpg")]:
            stamp = next_stamp()
            data = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
            msg = _header(CompressedImage(format="jpeg" if fmt == "corrupt" else fmt), stamp, "cam_z")
            msg.data = data[:40] + b"garbage" if fmt == "corrupt" else data
            pub.publish(msg)
            if fmt == "corrupt":
                continue
            tester.wait(lambda: all(tester.messages(f"/cam_z/segmentation/{k}", stamp) for k in OUTPUT_KINDS), 30, fmt)
            labels = as_array(tester.messages("/cam_z/segmentation/labels", stamp)[0])
            decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            assert np.array_equal(labels, core_prediction(graph["bundle"], decoded).labels[0].numpy())
        stamp = next_stamp()
        msg = _header(CompressedImage(format="png"), stamp, "cam_z")
        msg.data = cv2.imencode(".png", rgb)[1].tobytes()
        pub.publish(msg)
        tester.wait(lambda: tester.messages("/cam_z/segmentation/overlay", stamp), 30, "frame after corrupt JPEG")
        assert node.alive()
    finally:
        tester.close()
        node.stop()


@pytest.mark.parametrize("param, value, message", [
    ("backend", "cuda_magic", "parameter 'backend' is 'cuda_magic'; allowed: auto, torch, torch_compile, onnxruntime, tensorrt, openvino"),
    ("overlay_alpha", "1.5", "parameter 'overlay_alpha' is 1.5; it must be in [0.0, 1.0]"),
    ("batch_window_ms", "-5.0", "parameter 'batch_window_ms' is -5.0; it must be >= 0.0"),
    ("batch_window_ms", "soon", "parameter 'batch_window_ms' is 'soon'; it must be a number"),
    ("outputs", "[labels,depth]", "parameter 'outputs' is 'depth'; allowed"),
    ("model", "/nonexistent/bundle", "neither a folder nor a shipped bundle"),
])
def test_invalid_parameters_rejected_at_startup(graph, tmp_path, param, value, message):
    """The node exits with an error naming the parameter and what is allowed."""
    params = {"model": str(graph["bundle"].path), "device": "cpu", param: value}
    node = NodeProcess(params, tmp_path / "node.log")
    assert node.proc.wait(timeout=60) == 1
    assert message in node.log()


def test_incompatible_qos_is_reported(graph, tmp_path):
    """A best-effort camera publisher and a reliable subscription: the node says so in its log."""
    node = NodeProcess({"model": str(graph["bundle"].path), "device": "cpu", "input_qos": "reliable",
                        "camera_topics": "[/cam_q/image_raw]"}, tmp_path / "node.log")
    tester = Tester("qos_tester")
    try:
        tester.publisher(Image, "/cam_q/image_raw", qos="best_effort")
        tester.wait(lambda: "incompatible QoS" in node.log(), 60, "incompatible-QoS warning")
        assert "RELIABILITY" in node.log()
    finally:
        tester.close()
        node.stop()


def serve(tester: Tester, cams: list[str], kinds: tuple[str, ...]) -> dict:
    """Publish on ``cams`` and subscribe to their ``kinds`` outputs and /diagnostics; return the graph view
    once the node reports that it serves them."""
    for cam in cams:
        tester.publisher(Image, cam)
        for kind in kinds:
            tester.subscribe(Image, f"{cam.rsplit('/', 1)[0]}/segmentation/{kind}")
    tester.subscribe(DiagnosticArray, "/diagnostics")
    tester.connected(timeout=90)
    view = {"tester": tester}
    for cam in cams:
        latest_status(view, cam, lambda s: s["outputs_subscribed"] == ",".join(sorted(kinds)), 60)
    return view


def test_batch_window_gathers_cameras_into_one_call(graph, tmp_path):
    """batch_window_ms: a frame waits for the other camera's frame and both go through one call
    (diagnostics report the batch size); a camera whose partner sends nothing is answered once the
    window has passed, not starved."""
    cams = ["/cam_w1/image_raw", "/cam_w2/image_raw"]
    node = NodeProcess({"model": str(graph["bundle"].path), "device": "cpu", "input_qos": "reliable",
                        "batch_window_ms": "1500", "diagnostics_period": "0.25",
                        "camera_topics": "[" + ",".join(cams) + "]"}, tmp_path / "node.log")
    tester = Tester("window_tester")
    try:
        view = serve(tester, cams, ("labels",))
        labels = {cam: cam.rsplit("/", 1)[0] + "/segmentation/labels" for cam in cams}
        stamp = next_stamp()
        tester.pubs[cams[0]].publish(raw_message(scene(seed=30), "rgb8", stamp))
        time.sleep(0.3)
        tester.pubs[cams[1]].publish(raw_message(scene(seed=31), "rgb8", stamp))
        tester.wait(lambda: all(tester.messages(labels[c], stamp) for c in cams), 30, "outputs of both cameras")
        for cam in cams:
            status = latest_status(view, cam, lambda s: int(s["frames_processed"]) >= 1 and s["batch_size_mean"] != "nan")
            assert status["batch_size_mean"] == "2.00", (cam, status)

        lone = next_stamp()
        sent = time.monotonic()
        tester.pubs[cams[0]].publish(raw_message(scene(seed=32), "rgb8", lone))
        tester.wait(lambda: tester.messages(labels[cams[0]], lone), 30, "output of the lone frame")
        assert time.monotonic() - sent >= 1.4  # it waited out the window for the silent camera, then ran alone
        assert node.alive()
    finally:
        tester.close()
        node.stop()


def test_onnxruntime_backend_through_the_graph(graph, tmp_path):
    """backend=onnxruntime, two cameras batched into one call: labels equal the core's PyTorch result,
    uncertainty within 1e-3, and /diagnostics names the backend."""
    cams = ["/cam_o1/image_raw", "/cam_o2/image_raw"]
    node = NodeProcess({"model": str(graph["bundle"].path), "device": "cpu", "backend": "onnxruntime",
                        "engine_cache": str(tmp_path / "engines"), "input_qos": "reliable", "diagnostics_period": "0.5",
                        "batch_window_ms": "2000", "camera_topics": "[" + ",".join(cams) + "]"}, tmp_path / "node.log")
    tester = Tester("onnx_tester")
    try:
        view = serve(tester, cams, ("labels", "uncertainty"))
        stamp = next_stamp()
        frames = {cam: scene(seed=20 + i) for i, cam in enumerate(cams)}
        for cam in cams:
            tester.pubs[cam].publish(raw_message(frames[cam], "rgb8", stamp))
        for cam in cams:
            ns = cam.rsplit("/", 1)[0] + "/segmentation"
            tester.wait(lambda: tester.messages(f"{ns}/labels", stamp) and tester.messages(f"{ns}/uncertainty", stamp),
                        30, f"outputs of {cam}")
            ref = core_prediction(graph["bundle"], frames[cam])
            assert np.array_equal(as_array(tester.messages(f"{ns}/labels", stamp)[0]), ref.labels[0].numpy())
            np.testing.assert_allclose(as_array(tester.messages(f"{ns}/uncertainty", stamp)[0]),
                                       ref.uncertainty[0].numpy(), atol=1e-3)
        status = latest_status(view, cams[0], lambda s: int(s["frames_processed"]) >= 1 and s["batch_size_mean"] != "nan")
        assert status["backend"] == "onnxruntime" and status["batch_size_mean"] == "2.00"
        assert list((tmp_path / "engines").glob("onnxruntime-*/model.onnx"))
    finally:
        tester.close()
        node.stop()

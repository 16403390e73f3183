"""``perception_node``: camera images in; labels, uncertainty, misclassification mask and overlay out.

Thin by design: parameters, subscriptions, publishers and short callbacks. Callbacks only park the
newest frame of each camera; one inference thread takes the newest frames of all cameras (after
waiting up to ``batch_window_ms`` for cameras that have none yet), runs them through the core's
Predictor in one batch and publishes what has subscribers, with the input header, at the camera's
resolution, with the camera's ``camera_info`` beside them. Display parameters (threshold, colours,
outputs, rates) change live through ``ros2 param set``.
"""
import json
import logging
import sys
import threading
import time

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from ..bundle import BundleError, load_bundle
from ..class_info import class_info
from ..image_encoding import ImageDataError, ImageTooLargeError, UnsupportedEncodingError
from ..inference import BackendUnavailable, Predictor, PredictorOptions, choose_backend
from ..overlay import MARK_COLOR, MARKING
from ..preprocessing import reduced_size
from ..resources import resolve_bundle
from .camera_stream import CameraStream
from .conversions import array_to_message, message_to_rgb8
from .diagnostics import camera_status
from .parameters import NodeSettings, ParameterError, changed, declare, unknown_overrides
from .qos import qos_profile


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"parameter 'device' is {name!r} but no CUDA device is available; use auto or cpu")
    return name


def _backend(name: str, device: str, precision: str) -> str:
    try:
        return choose_backend(name, device, precision)
    except BackendUnavailable as exc:
        raise ParameterError(f"parameter 'backend': {exc}") from exc


class _RosLogHandler(logging.Handler):
    """Forwards the core's ``logging`` records (e.g. engine-build progress) to the node's ROS logger."""

    def __init__(self, logger) -> None:
        super().__init__(logging.INFO)
        self.ros = logger

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno
        log = self.ros.error if level >= logging.ERROR else self.ros.warning if level >= logging.WARNING else self.ros.info
        log(f"[{record.name}] {record.getMessage()}")


class PerceptionNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("perception_node", **kwargs)
        self.settings: NodeSettings = declare(self)
        for warning in unknown_overrides(self):
            self.get_logger().warning(warning)
        s = self.settings
        core_log = logging.getLogger("uncertain_seg_ros")
        core_log.setLevel(logging.INFO)
        if not any(isinstance(h, _RosLogHandler) for h in core_log.handlers):
            core_log.addHandler(_RosLogHandler(self.get_logger()))
        device = _device(s.device)
        self.backend = _backend(s.backend, device, s.precision)
        bundle_path = resolve_bundle(s.model)
        bundle = load_bundle(bundle_path, device)
        options = PredictorOptions(device, s.precision, s.mask_threshold, s.colormap, s.overlay_alpha, backend=self.backend,
                                   max_batch=len(s.camera_topics), cache_dir=s.engine_cache or None,
                                   max_output_pixels=s.max_output_pixels, threads=s.threads,
                                   openvino_device=s.openvino_device)
        self.predictor = Predictor(bundle, options)
        self.labels_encoding = "mono8" if self.predictor.label_dtype == np.uint8 else "mono16"
        self.info = {"backend": self.backend, "device": device, "precision": s.precision,
                     "threads": str(torch.get_num_threads()), "model_id": bundle.model_id, "model_name": bundle.config.name}

        self._wake = threading.Event()
        self._stop = threading.Event()
        self.cameras: list[CameraStream] = []
        for topic in s.camera_topics:
            resolved = self.resolve_topic_name(topic)
            compressed = s.transport == "compressed" or resolved.endswith("/compressed")
            base = resolved.removesuffix("/compressed")
            source, msg_type = (f"{base}/compressed", CompressedImage) if compressed else (base, Image)
            camera = CameraStream(self, base, s.outputs, s.output_namespace, s.output_qos, s.output_depth,
                                  s.max_rate_hz, self.labels_encoding, s.input_qos)
            events = SubscriptionEventCallbacks(incompatible_qos=lambda info, t=source: self._incompatible_qos(t, info))
            self.create_subscription(msg_type, source, lambda msg, c=camera: self._on_frame(c, msg),
                                     qos_profile(s.input_qos, s.input_depth), event_callbacks=events)
            self.cameras.append(camera)
            self.get_logger().info(f"segmenting {source} ({msg_type.__name__}, QoS {s.input_qos}) -> {camera.namespace}/"
                                   f"{{{','.join(camera.publishers)}}}")
        self._publish_class_info()
        self.diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(s.diagnostics_period, self._publish_diagnostics)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._worker = threading.Thread(target=self._work, name="inference", daemon=True)
        self._worker.start()
        self.get_logger().info(f"model {bundle.config.name} ({bundle_path}, id {bundle.model_id}) on {device}, "
                               f"backend {self.predictor.backend.describe()}")

    def _check_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Accept a change only if the settings it gives pass the start-up rules (read-only ones rclpy refuses)."""
        try:
            changed(self, parameters)
        except ParameterError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        """Take accepted changes into effect: the next frame uses them."""
        s = self.settings = changed(self, parameters)
        self.predictor.configure(s.mask_threshold, s.colormap, s.overlay_alpha)
        for camera in self.cameras:
            camera.set_outputs(s.outputs)
            camera.set_rate(s.max_rate_hz)
        self._publish_class_info()
        self.get_logger().info("parameters changed: " + ", ".join(f"{p.name}={p.value!r}" for p in parameters))

    def _publish_class_info(self) -> None:
        p = self.predictor
        text = json.dumps(class_info(p.bundle.config, p.model_id, p.threshold, p.options.colormap, self.labels_encoding,
                                     MARK_COLOR, MARKING), sort_keys=True)
        for camera in self.cameras:
            camera.publish_class_info(text)

    def _incompatible_qos(self, topic: str, info) -> None:
        self.get_logger().warning(
            f"a publisher on {topic} has an incompatible QoS (policy {info.last_policy_kind.name}); no frames will "
            f"arrive from it. The subscription uses input_qos '{self.settings.input_qos}': a best-effort camera "
            "needs 'sensor_data' or 'best_effort'.")

    def _on_frame(self, camera: CameraStream, msg) -> None:
        if camera.offer(msg, time.monotonic()):
            self._wake.set()

    def _decode(self, camera: CameraStream, msg):
        """RGB array of a message, or None (logged, counted) for bad input; the node keeps running."""
        try:
            image = message_to_rgb8(msg, self.settings.max_input_pixels, lambda line: self._decoder_said(camera, line))
        except UnsupportedEncodingError as exc:
            if camera.first_time("unsupported encoding"):
                self.get_logger().error(f"{camera.topic}: {exc}; skipping such frames (logged once per topic)")
        except ImageTooLargeError as exc:
            self.get_logger().warning(f"{camera.topic}: frame refused: {exc} (parameter max_input_pixels)",
                                      throttle_duration_sec=5.0)
        except (ImageDataError, ValueError) as exc:
            self.get_logger().warning(f"{camera.topic}: bad frame skipped: {exc}", throttle_duration_sec=5.0)
        except Exception as exc:  # whatever else a message provokes must not end the inference thread
            self.get_logger().error(f"{camera.topic}: frame skipped, unexpected error reading it: {exc!r}",
                                    throttle_duration_sec=5.0)
        else:
            self._note_reduced(camera, image.shape[0], image.shape[1])
            return image
        camera.stats.count("bad")
        return None

    def _decoder_said(self, camera: CameraStream, line: str) -> None:
        self.get_logger().warning(f"{camera.topic}: image decoder: {line}", throttle_duration_sec=5.0)

    def _note_reduced(self, camera: CameraStream, height: int, width: int) -> None:
        """Say once per camera that its frames are answered at a reduced size (max_output_pixels)."""
        limit = self.settings.max_output_pixels
        if height * width > limit and camera.first_time("reduced output"):
            h, w = reduced_size(height, width, limit)
            self.get_logger().warning(f"{camera.topic}: {width}x{height} frames are above max_output_pixels ({limit}); "
                                      f"their outputs are computed and published at {w}x{h} (logged once per topic)")

    def _gather(self) -> None:
        """Wait up to ``batch_window_ms`` after a new frame until every camera has one (or the node stops)."""
        deadline = time.monotonic() + self.settings.batch_window_ms / 1e3
        while not self._stop.is_set():
            self._wake.clear()  # before the check: a frame arriving after it sets the event again
            remaining = deadline - time.monotonic()
            if remaining <= 0 or all(camera.pending for camera in self.cameras):
                return
            self._wake.wait(remaining)

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(timeout=0.1):
                continue
            self._wake.clear()
            if self.settings.batch_window_ms > 0 and len(self.cameras) > 1:
                self._gather()
            batch = []
            for camera in self.cameras:
                item = camera.take()
                if item is None:
                    continue
                wanted = camera.wanted()
                image = self._decode(camera, item[0])
                if image is not None and wanted:
                    batch.append((camera, item, image, wanted))
                else:
                    camera.settle(time.monotonic())
            if batch:
                self._infer_and_publish(batch)

    def _infer_and_publish(self, batch: list) -> None:
        """One network call for the batch, then each camera's outputs. A failure is logged and counted
        on the cameras it cost a frame, and the node goes on with the next frames."""
        done = set()
        try:
            results = self.predictor.run([b[2] for b in batch], [b[3] for b in batch])
            for (camera, (msg, arrived), _, wanted), out in zip(batch, results):
                for kind in wanted:
                    camera.publish(kind, array_to_message(getattr(out, kind), camera.encodings[kind], msg.header))
                camera.publish_camera_info(msg.header, *out.size)
                now = time.monotonic()
                camera.stats.published(now, now - arrived, out.uncertain_fraction, len(batch), out.nonfinite_pixels)
                camera.settle(now)
                done.add(camera.topic)
                if out.nonfinite_pixels:
                    self.get_logger().error(f"{camera.topic}: the network gave non-finite outputs on {out.nonfinite_pixels} "
                                            "pixels; they are published as uncertain (mask on)", throttle_duration_sec=5.0)
        except Exception as exc:  # a failing frame must not kill the node; the reason is logged and counted
            self.get_logger().error(f"inference failed: {exc!r}", throttle_duration_sec=5.0)
            now = time.monotonic()
            for camera in (b[0] for b in batch if b[0].topic not in done):
                camera.stats.inference_failed(f"{type(exc).__name__}: {exc}"[:200])
                camera.settle(now)

    def _publish_diagnostics(self) -> None:
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        s = self.settings
        for camera in self.cameras:
            snap = camera.stats.snapshot()
            info = {**self.info, "outputs_subscribed": ",".join(sorted(camera.wanted()))}
            array.status.append(camera_status(camera.topic, snap, camera.since_last_report(snap), s.uncertainty_alarm,
                                              s.stall_timeout, info))
        self.diagnostics.publish(array)

    def destroy_node(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._worker.is_alive():
            self._worker.join(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    try:
        node = PerceptionNode()
    except (ParameterError, BundleError, FileNotFoundError, ValueError) as exc:
        rclpy.logging.get_logger("perception_node").fatal(str(exc))
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

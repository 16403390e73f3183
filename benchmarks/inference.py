"""``uncertain-seg benchmark``: latency per stage and end to end, per backend, precision and camera count.

For one model on real camera frames, each backend x precision runs at batch 1 (one camera) and at
batch N (N cameras, which the node batches into one network call):

1. In this process, the node's path for one round of frames, stage by stage: decode (message
   payload -> RGB), preprocess, inference, postprocess (the core's Predictor), message conversion
   and publishing (rclpy, to a subscriber in this process). The backends take turns round by
   round, so background load that comes and goes during the run weighs on all of them alike.
2. Through a real ROS 2 graph: perception_node in its own process with the same backend and
   precision, frames published to it and its outputs received here (see :mod:`.graph_latency`):
   latency at half the node's capacity, throughput with frames coming at three times it.
3. Label agreement with PyTorch fp32 eager on the frames, and the roofline floor of the network
   (FLOPs and bytes against the device's measured peak).

All of it for each ``threads`` value (the node's thread count: PyTorch's, ONNX Runtime's and
OpenVINO's) and each competing load (``load_cores`` other processes busy-looping during each
measurement, see :mod:`.cpu_load`), so that the defaults for a CPU other nodes share come from
measurements. Backends or precisions that cannot run here are reported with the reason, not dropped.
"""
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from uncertain_seg_ros.bundle import BundleConfig, ClassInfo, InputSpec, load_bundle, save_bundle
from uncertain_seg_ros.image_files import list_images, read_rgb
from uncertain_seg_ros.inference import (
    BACKENDS,
    OUTPUT_KINDS,
    BackendUnavailable,
    Predictor,
    PredictorOptions,
    available_backends,
    choose_backend,
    default_cache_dir,
)
from uncertain_seg_ros.inference.network import DeployedNetwork
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter, backbone_config
from uncertain_seg_ros.resources import resolve_bundle
from uncertain_seg_ros.ros.dds_transport import large_image_profile, transport_settings, use_transport_profile

from .cpu_load import DEFAULT_MAX_SECONDS, CompetingLoad
from .profiling import (
    CameraPayload,
    OtherLoad,
    agreement,
    predictor_stages,
    reference_outputs,
    summarize,
    time_pipelines,
)
from .roofline import floor_seconds, measure_peak, network_cost

log = logging.getLogger(__name__)
ROS_STAGES = ("convert", "publish")
RANDOM_PREFIX = "random:"
FLOOD_FACTOR = 3.0  # the throughput run publishes at this multiple of the unloaded round-trip rate


@dataclass
class BenchmarkConfig:
    """What to measure and how long; the command's options."""

    model: str = "camvid_demo"
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] | None = None
    device: str = "auto"
    frames: tuple[Path, ...] = ()
    camera_size: tuple[int, int] | None = None
    encoding: str = "rgb8"
    cameras: int = 3
    iterations: int = 20
    warmup: int = 3
    e2e_frames: int = 20
    rate_hz: float | None = None
    batch_window_ms: float = 50.0
    agreement_frames: int | None = None
    outputs: tuple[str, ...] = OUTPUT_KINDS
    skip_ros: bool = False
    cache_dir: str | None = None
    domain_id: int | None = None
    fastdds_profile: str | None = "shipped"
    timeout_s: float = 600.0
    work_dir: Path | None = None
    threads: tuple[int, ...] = ()
    """Thread counts to measure (empty: the process's PyTorch setting only, not passed to the node)."""
    load_cores: tuple[int, ...] = (0,)
    """Competing loads to measure under: this many other processes busy-looping, one core each."""
    load_max_s: float = DEFAULT_MAX_SECONDS
    note: str = ""
    command: str = field(default_factory=lambda: " ".join(["uncertain-seg", *sys.argv[1:]]))

    def resolved_device(self) -> str:
        return ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device

    def resolved_precisions(self) -> tuple[str, ...]:
        if self.precisions:
            return self.precisions
        if self.resolved_device().startswith("cuda"):
            return ("fp32", "fp16", "bf16")
        return ("fp32", "int8") if {"onnxruntime", "openvino"} & set(self.backends) else ("fp32",)


def random_bundle(spec: str, folder: Path, num_classes: int = 11) -> Path:
    """A randomly initialised bundle from ``random:<backbone>@<W>x<H>`` (e.g. ``random:dinov2_vits14@644x476``).

    For timing only: the official weights cannot be assumed present, and speed does not depend on them.
    """
    try:
        name, size = spec.removeprefix(RANDOM_PREFIX).split("@")
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"model {spec!r}: expected random:<backbone>@<W>x<H>, e.g. random:dinov2_vits14@644x476") from exc
    torch.manual_seed(0)
    model_cfg = SegmenterConfig(num_classes, backbone_config(name))
    classes = [ClassInfo(i, f"class{i}", ((37 * i) % 256, (91 * i + 64) % 256, (151 * i + 128) % 256)) for i in range(num_classes)]
    cfg = BundleConfig(name=f"{name} (random weights)", model=model_cfg, classes=classes, input=InputSpec(height, width),
                       backbone_name=name, provenance={"weights": "random, for timing only"})
    return save_bundle(folder / "bundle", UncertainSegmenter(model_cfg), cfg)


def load_frames(folders: tuple[Path, ...], camera_size: tuple[int, int] | None) -> list[np.ndarray]:
    """RGB frames of every image in ``folders``, resized to ``camera_size`` (W, H) when given."""
    frames = [read_rgb(p) for folder in folders for p in list_images(folder)]
    if camera_size:
        frames = [cv2.resize(f, camera_size, interpolation=cv2.INTER_AREA if f.shape[1] > camera_size[0] else cv2.INTER_LINEAR)
                  for f in frames]
    return frames


def environment() -> dict:
    """What the figures depend on besides the model: versions, CPU/GPU, threads, background load, DDS."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for library in ("onnxruntime", "openvino"):
        try:
            env[library] = __import__(library).__version__
        except ImportError:
            pass
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "RMW_IMPLEMENTATION"):
        env[var] = os.environ.get(var)
    return env


class RosBench:
    """This process's side of the ROS measurements: an isolated graph, a node spun in the background."""

    def __init__(self, domain_id: int | None, fastdds_profile: str | None) -> None:
        """``fastdds_profile``: a Fast DDS XML profile for this process and the node ("shipped": the
        package's large-image profile; None: Fast DDS's defaults), unless the environment already
        chooses transports. With the default 512 KiB shared-memory segment a frame's 518 kB outputs
        were dropped and resent after the 3 s heartbeat (see dds_transport)."""
        use_transport_profile(large_image_profile() if fastdds_profile == "shipped" else fastdds_profile)
        import rclpy

        from uncertain_seg_ros.ros.background_spin import BackgroundSpin
        from uncertain_seg_ros.ros.demo import isolate_graph

        self.domain = isolate_graph(domain_id)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=self.domain)
        self.node = rclpy.create_node("uncertain_seg_benchmark", context=self.context)
        self.spin = BackgroundSpin(self.node, context=self.context)
        self._runs = 0
        self._sinks: dict = {}
        self.published = 0  # output messages published by the ROS stages
        self._taken = 0
        self._delivered = threading.Condition()

    def close(self) -> None:
        import rclpy

        self.spin.stop()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def stages(self, kinds: tuple[str, ...], labels_encoding: str) -> list:
        """Message conversion and publishing of every output of every frame, as the node does them.

        The publishers have subscribers in this process (raw, not deserialised), so publishing does the
        full serialisation and hand-over to DDS; the transport to another process is in the e2e figure.
        The ``publish`` stage times the publish calls, which is what the node's thread pays; the
        subscribers take the messages in the executor's thread afterwards, and :meth:`drain` waits
        for that outside the timed stages.
        """
        from std_msgs.msg import Header
        from sensor_msgs.msg import Image

        from uncertain_seg_ros.ros.camera_stream import OUTPUT_ENCODINGS
        from uncertain_seg_ros.ros.conversions import array_to_message
        from uncertain_seg_ros.ros.qos import qos_profile

        encodings = {**OUTPUT_ENCODINGS, "labels": labels_encoding}
        for kind in set(kinds) - set(self._sinks):
            topic = f"/uncertain_seg_benchmark/{kind}"
            self._sinks[kind] = self.node.create_publisher(Image, topic, qos_profile("reliable", 10))
            self.node.create_subscription(Image, topic, self._on_message, qos_profile("reliable", 10), raw=True)
        deadline = time.monotonic() + 30
        while not all(self._sinks[k].get_subscription_count() for k in kinds) and time.monotonic() < deadline:
            time.sleep(0.01)
        header = Header(frame_id="camera")

        def convert(outputs):
            return [(k, array_to_message(getattr(o, k), encodings[k], header)) for o in outputs for k in kinds]

        def publish(messages):
            for kind, msg in messages:
                self._sinks[kind].publish(msg)
            self.published += len(messages)

        return [("convert", convert), ("publish", publish)]

    def _on_message(self, _: bytes) -> None:
        with self._delivered:
            self._taken += 1
            self._delivered.notify_all()

    @property
    def in_flight(self) -> int:
        """Messages published by the ROS stages that this process's subscribers have not taken yet."""
        with self._delivered:
            return self.published - self._taken

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until this process's subscribers have taken every message published so far.

        Without it their work ran into the next round: on 2 CPU cores the demo's preprocessing
        stage measured 14.1 ms median (p95 65 ms) with ROS stages and 5.5 ms (p95 6.9) without.
        """
        with self._delivered:  # a Condition over an RLock, so in_flight can take it again
            if not self._delivered.wait_for(lambda: self.in_flight <= 0, timeout):
                raise TimeoutError(f"{self.in_flight} of {self.published} published benchmark "
                                   f"messages not received after {timeout:.0f} s")

    def graph(self, model: Path, backend: str, precision: str, device: str, cameras: int,
              payloads: list[CameraPayload], cfg: BenchmarkConfig, log_path: Path, threads: int | None = None,
              load_cores: int = 0) -> dict:
        """perception_node in its own process on ``cameras`` topics: latency at a paced rate, then throughput.

        ``threads`` (when given) goes to the node as its ``threads`` parameter and as OMP_NUM_THREADS
        in its environment, so the node runs that many threads whether or not its version has the
        parameter. ``load_cores`` busy processes run from the first frame to the last, so the paced
        rate is set from the node's speed under that load.
        """
        import rclpy

        from uncertain_seg_ros.ros.demo import ServingMonitor, start_node, stop_node
        from .graph_latency import GraphProbe, payload_message

        self._runs += 1
        topics = [f"/bench{self._runs}/cam{c}/image_raw" for c in range(cameras)]
        compressed = payloads[0].compressed
        params = {"model": str(model), "backend": backend, "precision": precision, "device": device,
                  "camera_topics": f"[{','.join(topics)}]", "transport": "compressed" if compressed else "raw",
                  "input_qos": "reliable", "input_depth": "2", "outputs": f"[{','.join(cfg.outputs)}]",
                  "diagnostics_period": "0.25", "engine_cache": str(cfg.cache_dir or default_cache_dir()),
                  "batch_window_ms": str(float(cfg.batch_window_ms))}
        env = None
        if threads is not None:
            params["threads"] = str(threads)
            env = {"OMP_NUM_THREADS": str(threads)}
        proc = start_node(params, log_path, env)
        node = rclpy.create_node(f"uncertain_seg_benchmark_probe{self._runs}", context=self.context)
        self.spin.add_node(node)
        try:
            probe = GraphProbe(node, topics, cfg.outputs, compressed)
            monitor = ServingMonitor(node)
            deadline = time.monotonic() + cfg.timeout_s
            while not (probe.connected() and all(monitor.serving(t, cfg.outputs) for t in topics)):
                if proc.poll() is not None:
                    raise RuntimeError(f"perception_node exited with code {proc.returncode}: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"perception_node not serving after {cfg.timeout_s:.0f} s: {_tail(log_path)}")
                time.sleep(0.05)
            per_camera = min(cfg.e2e_frames, max(1, len(payloads) // cameras))
            frames = [[payload_message(payloads[(r * cameras + c) % len(payloads)]) for r in range(per_camera)]
                      for c in range(cameras)]
            with CompetingLoad(load_cores, cfg.load_max_s) as competing:
                probe.first_answer(frames, cfg.timeout_s)
                rounds = max(3, cfg.warmup)
                single = probe.round_trip(frames, rounds, timeout=cfg.timeout_s).duration_s / rounds
                wait = max(30.0, 20 * single)
                rate = cfg.rate_hz or 0.5 / single
                log.info("node answers a round of %d frame(s) in %.1f ms (%d competing busy cores); latency at %.2f Hz, "
                         "throughput at %.2f Hz", cameras, single * 1e3, load_cores, rate, FLOOD_FACTOR / single)
                with OtherLoad([proc.pid]) as load:
                    paced = probe.paced(frames, cfg.e2e_frames, rate, timeout=wait)
                    batch_size = monitor.batch_size_mean(topics)
                    flood = probe.paced(frames, cfg.e2e_frames, FLOOD_FACTOR / single, timeout=wait)
            return {"latency": summarize(paced.latencies), "latencies_ms": [round(v * 1e3, 2) for v in paced.latencies],
                    "rate_hz": rate, "sent": paced.sent, "answered": paced.answered,
                    "lost": paced.lost, "batch_size_mean": batch_size, "throughput_fps": flood.fps,
                    "other_load_cores": load.cores,
                    "steal_cores": load.steal, "load_busy_cores": competing.busy_cores, "load_held": competing.held,
                    "throughput_run": {"rate_hz": FLOOD_FACTOR / single, "sent": flood.sent, "answered": flood.answered,
                                       "lost": flood.lost, "duration_s": flood.duration_s,
                                       "latency": summarize(flood.latencies)}}
        finally:
            self.spin.remove_node(node)
            node.destroy_node()
            stop_node(proc)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"(no log at {path})"


def _predictor(bundle, backend: str, precision: str, device: str, batch: int, threads: int, cfg: BenchmarkConfig):
    """A Predictor as the node builds it for ``batch`` cameras and ``threads`` threads, or the reason it cannot run."""
    try:
        return Predictor(bundle, PredictorOptions(device, precision, backend=backend, max_batch=batch,
                                                  cache_dir=cfg.cache_dir, threads=threads)), None
    except (BackendUnavailable, ValueError, ImportError) as exc:
        return None, str(exc)


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Measure every requested backend x precision at batch 1 and ``cfg.cameras``, for every competing
    load and thread count; the results as a dict."""
    device = cfg.resolved_device()
    precisions = cfg.resolved_precisions()
    batches = sorted({1, cfg.cameras})
    availability = available_backends(device)
    process_threads = torch.get_num_threads()
    thread_counts = cfg.threads or (process_threads,)
    with tempfile.TemporaryDirectory(prefix="uncertain_seg_benchmark_") as tmp:
        model_path = random_bundle(cfg.model, Path(tmp)) if cfg.model.startswith(RANDOM_PREFIX) else resolve_bundle(cfg.model)
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tmp)
        bundle = load_bundle(model_path, device)
        frames = load_frames(cfg.frames, cfg.camera_size)
        payloads = [CameraPayload.from_rgb(f, cfg.encoding) for f in frames]
        env = environment()
        log.info("measuring the device's peak (GEMM, copy) on %s", device)
        peak = measure_peak(device, precisions)
        input_hw = (bundle.config.input.height, bundle.config.input.width)
        network = DeployedNetwork(bundle.model, *input_hw)
        costs = {(p, b): network_cost(network, b, p) for p in precisions for b in batches}
        check = frames[: cfg.agreement_frames] if cfg.agreement_frames else frames
        reference_predictor = Predictor(bundle, PredictorOptions(device, "fp32", backend="torch"))
        reference = reference_outputs(reference_predictor, check, 1, desc="reference: torch fp32")
        del reference_predictor
        ros = None if cfg.skip_ros else RosBench(cfg.domain_id, cfg.fastdds_profile)
        env.update(transport_settings())  # after RosBench, which may set the profile
        skipped = [{"backend": b, "precision": "*", "reason": availability[b]} for b in cfg.backends if availability.get(b)]
        runnable = [(b, p) for b in cfg.backends if not availability.get(b) for p in precisions]
        rows, agreed = [], set()
        try:
            for load_cores in cfg.load_cores:
                for threads in thread_counts:
                    for batch in batches:
                        new = _measure_batch(bundle, runnable, device, batch, threads, load_cores, payloads, check,
                                             reference, ros, cfg, skipped, agreed)
                        for row in new:
                            cost = costs[(row["precision"], batch)]
                            row.update(cost={"flops": cost.flops, "int8_flops": cost.int8_flops, "bytes": cost.bytes,
                                             "weight_bytes": cost.weight_bytes},
                                       floor=floor_seconds(cost, peak, row["precision"]))
                            if ros is not None:
                                row["e2e"] = _graph(ros, model_path, row, device, payloads, cfg, work)
                        rows += new
                        runnable = [(r["backend"], r["precision"]) for r in new]
        finally:
            torch.set_num_threads(process_threads)
            if ros is not None:
                ros.close()
        _relative_to_eager(rows)
        model = {"spec": cfg.model, "name": bundle.config.name, "backbone": bundle.config.backbone_name,
                 "parameters": sum(p.numel() for p in bundle.model.parameters()), "input_hw": list(input_hw),
                 "model_id": bundle.model_id, "random_weights": cfg.model.startswith(RANDOM_PREFIX)}
    return {
        "command": cfg.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "note": cfg.note,
        "device": device, "environment": env, "device_peak": peak.to_dict(), "model": model,
        "frames": {"folders": [str(f) for f in cfg.frames], "count": len(frames), "camera_hw": list(frames[0].shape[:2]),
                   "encoding": cfg.encoding, "agreement_frames": len(check)},
        "outputs": list(cfg.outputs), "cameras": cfg.cameras,
        "threads": list(thread_counts), "threads_passed_to_node": bool(cfg.threads), "load_cores": list(cfg.load_cores),
        "load_max_s": cfg.load_max_s, "auto": {p: _auto(device, p) for p in precisions},
        "batch_window_ms": None if cfg.skip_ros else cfg.batch_window_ms, "iterations": cfg.iterations, "warmup": cfg.warmup,
        "e2e_frames": None if cfg.skip_ros else cfg.e2e_frames,
        "backends_available": availability, "skipped": skipped, "rows": rows,
    }


def _auto(device: str, precision: str) -> str:
    """The backend ``auto`` takes here for ``precision``, or why none."""
    try:
        return choose_backend("auto", device, precision)
    except BackendUnavailable as exc:
        return f"none: {exc}"


def _measure_batch(bundle, runnable: list[tuple[str, str]], device: str, batch: int, threads: int, load_cores: int,
                   payloads, check, reference, ros: RosBench | None, cfg: BenchmarkConfig, skipped: list[dict],
                   agreed: set) -> list[dict]:
    """Rows of every runnable backend x precision at ``batch`` with ``threads`` threads, ``load_cores``
    competing busy processes running during the timing: stage timings measured interleaved (see
    :func:`time_pipelines`), and agreement with the reference at the largest batch, once per backend
    and precision (``agreed``)."""
    predictors = {}
    for backend, precision in runnable:
        log.info("%s %s x%d, %d thread(s): building the predictor", backend, precision, batch, threads)
        predictor, reason = _predictor(bundle, backend, precision, device, batch, threads, cfg)
        if predictor is None:
            log.warning("%s %s: skipped: %s", backend, precision, reason)
            skipped.append({"backend": backend, "precision": precision, "reason": reason})
        else:
            predictors[(backend, precision)] = predictor
    pipelines = {}
    for key, predictor in predictors.items():
        pipelines[key] = predictor_stages(predictor, set(cfg.outputs))
        if ros is not None:
            pipelines[key] += ros.stages(cfg.outputs, "mono8" if predictor.label_dtype == np.uint8 else "mono16")
    rounds = [[payloads[(i * batch + j) % len(payloads)] for j in range(batch)] for i in range(cfg.warmup + cfg.iterations)]
    with CompetingLoad(load_cores, cfg.load_max_s) as competing, OtherLoad() as load:
        samples = time_pipelines(pipelines, rounds, device, cfg.warmup, settle=None if ros is None else ros.drain,
                                 desc=f"batch {batch}, {threads} thread(s), {load_cores} busy core(s): stages, interleaved")
    rows = []
    for (backend, precision), predictor in predictors.items():
        s = samples[(backend, precision)]
        row = {"backend": backend, "precision": precision, "batch": batch, "threads": threads, "load_cores": load_cores,
               "describe": predictor.backend.describe(),
               "stages": {name: summarize(v) for name, v in s.items() if name != "total"}, "pipeline": summarize(s["total"]),
               "other_load_cores": load.cores, "steal_cores": load.steal, "load_busy_cores": competing.busy_cores,
               "load_held": competing.held}
        row["pipeline_fps"] = batch * 1e3 / row["pipeline"]["median_ms"]
        if batch == max(1, cfg.cameras) and (backend, precision) not in agreed:
            outputs = reference_outputs(predictor, check, batch, desc=f"{backend} {precision} x{batch}: agreement")
            row["agreement"] = agreement(reference, outputs)
            agreed.add((backend, precision))
        rows.append(row)
    return rows


def _graph(ros: RosBench, model_path: Path, row: dict, device: str, payloads, cfg: BenchmarkConfig, work: Path) -> dict:
    """The row's backend and precision end to end through perception_node, or the error."""
    backend, precision, batch, threads, load = row["backend"], row["precision"], row["batch"], row["threads"], row["load_cores"]
    log.info("%s %s x%d, %d thread(s), %d busy core(s): perception_node end to end", backend, precision, batch, threads, load)
    try:
        return ros.graph(model_path, backend, precision, device, batch, payloads, cfg,
                         work / f"node_{backend}_{precision}_x{batch}_t{threads}_l{load}.log",
                         threads if cfg.threads else None, load)
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s %s x%d: end-to-end run failed: %s", backend, precision, batch, exc)
        return {"error": str(exc)}


def _group(row: dict) -> tuple[int, int, int]:
    """Rows measured together, interleaved: same batch, thread count and competing load."""
    return row["batch"], row["threads"], row["load_cores"]


def _relative_to_eager(rows: list[dict]) -> None:
    """Speed-up of each row's inference and end-to-end latency over torch fp32 eager measured with it
    (same batch, threads and competing load)."""
    eager = {_group(r): r for r in rows if r["backend"] == "torch" and r["precision"] == "fp32"}
    for r in rows:
        base = eager.get(_group(r))
        infer = r["stages"]["inference"]["median_ms"]
        r["speedup_vs_torch_fp32"] = {"inference": base["stages"]["inference"]["median_ms"] / infer if base else None,
                                      "pipeline": base["pipeline"]["median_ms"] / r["pipeline"]["median_ms"] if base else None}
        e2e = r.get("e2e", {}).get("latency", {}).get("median_ms")
        r["e2e_over_inference"] = e2e / infer if e2e else None

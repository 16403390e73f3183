"""``uncertain-seg`` commands that need a ROS 2 graph: ``bag play``, ``record``, ``demo`` and ``benchmark``.

Registered through the ``uncertain_seg_ros.commands`` entry point, so the training package's CLI
offers them without importing the node. rclpy is imported only when one of them runs
(``benchmark --skip-ros`` runs without it).
"""
import argparse
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..resources import sample_path
from .qos import QOS_PRESETS

ROS_HINT = ('this command needs the ROS 2 Python packages; without a ROS install: '
            'pip install "ros-jazzy-rclpy[fastrtps]" ros-sensor-msgs ros-std-msgs ros-diagnostic-msgs')


def _ros():
    try:
        import rclpy
    except ImportError as exc:
        raise ImportError(f"{ROS_HINT} ({exc})") from exc
    return rclpy


def init_ros() -> None:
    """``rclpy.init`` without this command's own arguments: rcl would read ``--remap FROM:=TO`` as an old-style
    ROS remap rule and print "This syntax is deprecated" (and apply it)."""
    _ros().init(args=[])


@contextmanager
def _spinning_node(name: str) -> Iterator:
    """A node spun by a background executor. On exit the spinning thread ends before the node and rclpy are shut
    down: shutting rclpy down under a thread still in the executor's wait aborted the process now and then
    ("terminate called without an active exception", exit code 134)."""
    from rclpy.executors import MultiThreadedExecutor

    rclpy = _ros()
    init_ros()
    node = rclpy.create_node(name)
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown()
        spinner.join(timeout=10.0)
        node.destroy_node()
        rclpy.try_shutdown()


def _play(args: argparse.Namespace) -> int:
    with _spinning_node("uncertain_seg_bag_player") as node:
        from .bag_player import BagPlayer

        player = BagPlayer(node, args.bags, args.topic or None, args.qos, dict(args.remap))
        if args.wait_subscribers and not player.wait_for_subscribers(args.wait_subscribers, args.wait_timeout):
            print(f"warning: fewer than {args.wait_subscribers} subscribers after {args.wait_timeout} s; playing anyway",
                  file=sys.stderr)
        for _ in range(args.loop or 1):
            report = player.play(args.rate)
            for topic, count in report.published.items():
                print(f"{topic}: {count} messages in {report.duration_s:.2f} s")
            for topic, (first, last) in report.late_subscribers().items():
                print(f"warning: {topic}: {first} subscriber(s) when playing started, {last} at the end: the later "
                      f"one(s) missed the messages sent before they matched. Give --wait-subscribers {last}, or play "
                      "with --qos transient_local to subscribers that request transient_local too", file=sys.stderr)
    return 0


def _record(args: argparse.Namespace) -> int:
    with _spinning_node("uncertain_seg_recorder") as node:
        from .camera_stream import output_namespace
        from .demo import ServingMonitor
        from .output_recorder import OutputRecorder

        recorder = OutputRecorder(node, args.camera_topic, output_namespace(args.camera_topic, args.output_namespace),
                                  Path(args.out), qos=args.qos)
        monitor = ServingMonitor(node)
        try:
            time.sleep(args.duration)
        except KeyboardInterrupt:
            pass
    montage = recorder.write_montage(Path(args.out) / "montage.png")
    for line in recorder.report(monitor.latest(args.camera_topic.removesuffix("/compressed"))):
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    print(f"{len(recorder.stamps('overlay'))} frames with overlay written to {args.out}; montage: {montage}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _ros()
    from .demo import run_demo

    bag = Path(args.bag) if args.bag else sample_path("camvid_dusk_bag")
    summary = run_demo(bag, Path(args.out), args.model, args.topic, args.rate, args.device, args.timeout, args.domain_id)
    print(f"frames in: {summary['frames_in']}, frames out: {summary['frames_out']}")
    lat = summary["latency_ms"]
    if lat["p50"] is not None:
        print(f"latency publish -> overlay received: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms")
    print(f"outputs: {summary['outputs']}/<output>/<stamp>.png; montage: {summary['montage']}")
    return 0 if summary["all_frames_answered"] else 1


def _remap(text: str) -> tuple[str, str]:
    source, sep, target = text.partition(":=")
    if not (sep and source and target):
        raise argparse.ArgumentTypeError(f"expected FROM:=TO, e.g. /camera/image_raw:=/front/image_raw, got {text!r}")
    return source, target


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from exc
    return width, height


def _benchmark(args: argparse.Namespace) -> int:
    if not args.skip_ros:
        _ros()
    from .benchmark import BenchmarkConfig, run_benchmark
    from .benchmark_report import table, write_results

    frames = tuple(Path(f) for f in args.frames) or (sample_path("camvid_dusk") / "images",)
    cfg = BenchmarkConfig(
        model=args.model, backends=tuple(args.backends), precisions=tuple(args.precisions or ()), device=args.device,
        frames=frames, camera_size=args.camera_size, encoding=args.encoding, cameras=args.cameras,
        iterations=args.iterations, warmup=args.warmup, e2e_frames=args.e2e_frames, rate_hz=args.rate,
        batch_window_ms=args.batch_window,
        agreement_frames=args.agreement_frames, outputs=tuple(args.outputs), skip_ros=args.skip_ros,
        cache_dir=args.cache, domain_id=args.domain_id, fastdds_profile=args.fastdds_profile or None,
        timeout_s=args.timeout,
        work_dir=Path(args.work) if args.work else None, note=args.note)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the node process is stopped too
    run = run_benchmark(cfg)
    print(table(run))
    write_results(run, args.json, args.markdown, args.chart, args.append)
    for what, path in (("json", args.json), ("markdown", args.markdown), ("chart", args.chart)):
        if path:
            print(f"{what}: {path}")
    return 0


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``bag play`` to the ``bag`` group and ``record``, ``demo`` and ``benchmark`` to the top level."""
    p = groups["bag"].add_parser("play", help="publish a bag's image topics into a ROS 2 graph (needs rclpy)",
                                 description="Publish the Image/CompressedImage/CameraInfo topics of rosbag2 (sqlite3, "
                                             "mcap) or ROS 1 bags as recorded, at the recorded pace scaled by --rate.")
    p.add_argument("bags", nargs="+", help="bag folders or files")
    p.add_argument("--topic", action="append", default=[], help="topic to play (repeatable; default: all playable)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor; 0 = as fast as possible (default: 1)")
    p.add_argument("--qos", default="reliable", choices=QOS_PRESETS,
                   help="publisher QoS (default: reliable). transient_local makes playback deterministic: a subscriber "
                        "that finishes discovery after the first messages still receives them (it must request "
                        "transient_local too)")
    p.add_argument("--remap", action="append", default=[], type=_remap, metavar="FROM:=TO", help="publish topic FROM as TO")
    p.add_argument("--loop", type=int, default=1, help="play the bag N times (default: 1)")
    p.add_argument("--wait-subscribers", type=int, default=1, help="wait for N subscribers per topic first (default: 1)")
    p.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for subscribers (default: 30)")
    p.set_defaults(func=_play)

    p = groups[""].add_parser("record", help="write a camera's images and the node's outputs as PNGs (needs rclpy)",
                              description="Subscribe to a camera topic and the perception node's outputs for it and write "
                                          "every message as <out>/<output>/<stamp_ns>.png, then a montage.png.")
    p.add_argument("--camera-topic", default="/camera/image_raw", help="the camera topic the node segments")
    p.add_argument("--output-namespace", default="segmentation", help="the node's output_namespace parameter")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to record (default: 10; Ctrl-C stops early)")
    p.add_argument("--qos", default="reliable", help="subscription QoS (default: reliable)")
    p.set_defaults(func=_record)

    p = groups[""].add_parser("demo", help="the perception node on the bundled sample bag; outputs as PNGs + montage",
                              description="Starts perception_node in its own process, plays the sample bag (five CamVid "
                                          "dusk frames) into it with the project's player, records every output as PNG, "
                                          "writes montage.png and summary.json and prints frames in/out and latency. "
                                          "Runs on a private ROS domain on localhost unless --domain-id is given.")
    p.add_argument("--bag", default=None, help="bag to play (default: the shipped samples/camvid_dusk_bag)")
    p.add_argument("--topic", default="/camera/image_raw", help="image topic in the bag (default: /camera/image_raw)")
    p.add_argument("--model", default="camvid_demo", help="model bundle (default: the shipped camvid_demo)")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds (default: 120)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use (default: a random private one)")
    p.set_defaults(func=_demo)

    groups[""].add_parser(
        "benchmark", help="latency per stage and end to end through the node, per backend and precision",
        options=_benchmark_options)


def _benchmark_options(p: argparse.ArgumentParser) -> None:
    """Added only when ``benchmark`` runs: its choices come from the inference package, which imports torch."""
    from ..inference import BACKENDS, OUTPUT_KINDS, PRECISIONS
    from ..inference.profiling import PAYLOAD_ENCODINGS

    p.description = ("Measures, on real camera frames, the node's path per stage (decode, preprocess, inference, "
                     "postprocess, message conversion, publish: median and p95) and end to end through a real ROS 2 "
                     "graph (perception_node in its own process, latency at a fixed rate and back-to-back throughput), "
                     "for each backend and precision, at batch 1 and with --cameras cameras; label agreement with "
                     "PyTorch fp32 eager; and the floor: the network's FLOPs and bytes against the device's measured "
                     "peak. Prints a table, writes JSON / Markdown / a chart. Backends that cannot run here are listed "
                     "with the reason. Example (GPU): uncertain-seg benchmark --device cuda --model "
                     "random:dinov2_vits14@644x476 --camera-size 640x480 --precisions fp32 fp16 bf16 --json r.json")
    p.add_argument("--model", default="camvid_demo",
                   help="bundle folder or shipped name (default: camvid_demo), or random:<backbone>@<W>x<H> for a randomly "
                        "initialised DINOv2 model at that input size (timing only), e.g. random:dinov2_vits14@644x476")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                   help="backends to measure (default: all; those unavailable here are reported with the reason)")
    p.add_argument("--precisions", nargs="+", default=None, choices=tuple(PRECISIONS),
                   help="precisions (default: fp32, and int8 for onnxruntime, on the CPU; fp32 fp16 bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--frames", action="append", default=[], metavar="DIR",
                   help="folder of camera frames (repeatable; default: the shipped CamVid dusk samples)")
    p.add_argument("--camera-size", type=_size, default=None, metavar="WxH",
                   help="resize frames to this camera resolution first (default: their own size)")
    p.add_argument("--encoding", default="rgb8", choices=PAYLOAD_ENCODINGS,
                   help="how the camera publishes: raw rgb8 / bgr8 Image, or jpeg CompressedImage (default: rgb8)")
    p.add_argument("--cameras", type=int, default=3, help="camera count of the multi-camera rows (default: 3; 1: batch 1 only)")
    p.add_argument("--iterations", type=int, default=20, help="timed rounds per configuration (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    p.add_argument("--e2e-frames", type=int, default=20, help="frames per camera in each end-to-end run (default: 20)")
    p.add_argument("--rate", type=float, default=None,
                   help="end-to-end publish rate in Hz (default: half the node's measured capacity)")
    p.add_argument("--batch-window", type=float, default=50.0, metavar="MS",
                   help="the node's batch_window_ms end to end: how long it waits for every camera's frame so that a "
                        "round goes through one network call, as the multi-camera rows assume (default: 50)")
    p.add_argument("--agreement-frames", type=int, default=None, help="frames for label agreement (default: all)")
    p.add_argument("--outputs", nargs="+", default=list(OUTPUT_KINDS), choices=OUTPUT_KINDS,
                   help="outputs subscribed to and computed (default: all)")
    p.add_argument("--skip-ros", action="store_true", help="stage timings only: no message conversion, publishing or node")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", default=None, metavar="PATH", help="write a Markdown report")
    p.add_argument("--chart", default=None, metavar="PATH", help="write a PNG bar chart of the stage times")
    p.add_argument("--append", action="store_true", help="add this run to the runs already in --json (and report all)")
    p.add_argument("--note", default="", help="a remark stored with the run (e.g. other load on the machine)")
    p.add_argument("--cache", default=None, help="engine cache folder (default: $UNCERTAIN_SEG_CACHE or ~/.cache/...)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: a random private one)")
    p.add_argument("--fastdds-profile", default="shipped",
                   help="Fast DDS XML profile for this process and the node, unless the environment already sets "
                        "FASTRTPS_DEFAULT_PROFILES_FILE, FASTDDS_DEFAULT_PROFILES_FILE or FASTDDS_BUILTIN_TRANSPORTS "
                        "(default: 'shipped', config/fastdds_large_images.xml: the default 512 KiB shared-memory "
                        "segment drops a frame's outputs, which reliable delivery resends only after 3 s; "
                        "'' leaves Fast DDS's defaults)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the node to start serving (default: 600)")
    p.add_argument("--work", default=None, help="keep the node logs in this folder (default: a temporary one)")
    p.set_defaults(func=_benchmark)

"""``uncertain-seg`` commands that need a ROS 2 graph: ``bag play``, ``record`` and ``demo``.

Registered through the ``uncertain_seg_ros.commands`` entry point, so the training package's CLI
offers them without importing the node. rclpy is imported only when one of them runs.
"""
import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from ..resources import sample_path
from .qos import QOS_PRESETS

ROS_HINT = ('this command needs the ROS 2 Python packages; without a ROS install: '
            'pip install "ros-jazzy-rclpy[fastrtps]" ros-sensor-msgs ros-std-msgs ros-diagnostic-msgs')


def require_rclpy() -> ModuleType:
    """rclpy, or an ImportError that says what to install."""
    try:
        import rclpy
    except ImportError as exc:
        raise ImportError(f"{ROS_HINT} ({exc})") from exc
    return rclpy


def init_ros() -> None:
    """``rclpy.init`` without this command's own arguments: rcl would read ``--remap FROM:=TO`` as an old-style
    ROS remap rule and print "This syntax is deprecated" (and apply it)."""
    require_rclpy().init(args=[])


@contextmanager
def _spinning_node(name: str) -> Iterator:
    """A node spun in the background (:class:`.background_spin.BackgroundSpin`); on exit the spinning thread
    ends before the node and rclpy are shut down."""
    from .background_spin import BackgroundSpin

    rclpy = require_rclpy()
    init_ros()
    node = rclpy.create_node(name)
    spin = BackgroundSpin(node)
    try:
        yield node
    finally:
        spin.stop()
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
    legend = _record_legend(args)
    with _spinning_node("uncertain_seg_recorder") as node:
        from .camera_stream import output_namespace
        from .demo import ServingMonitor
        from .output_recorder import OutputRecorder

        recorder = OutputRecorder(node, args.camera_topic, output_namespace(args.camera_topic, args.output_namespace),
                                  Path(args.out), qos=args.qos, legend=legend)
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


def _record_legend(args: argparse.Namespace):
    """The montage's legend from what the command line says about the node: its bundle (classes, palette,
    mask threshold), colour map and threshold override."""
    from ..bundle import read_config
    from ..colormap import lut
    from ..legend import Legend
    from ..resources import resolve_bundle

    lut(args.colormap)  # an unknown name fails here, before recording, naming the choices
    if args.model:
        kwargs = {} if args.mask_threshold is None else {"threshold": args.mask_threshold}
        return Legend.for_bundle(read_config(resolve_bundle(args.model)), colormap=args.colormap, overlay_key=True,
                                 **kwargs)
    return Legend(colormap=args.colormap, threshold=args.mask_threshold, overlay_key=True)


def _demo(args: argparse.Namespace) -> int:
    require_rclpy()
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


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``bag play`` to the ``bag`` group and ``record`` and ``demo`` to the top level."""
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
    p.add_argument("--model", default=None,
                   help="the node's model bundle (folder or shipped name): its class names and colours go into the "
                        "montage's legend and README.txt, its mask threshold onto the colour bar (default: none, no "
                        "class legend)")
    p.add_argument("--colormap", default="inferno",
                   help="the node's colormap parameter (inferno, turbo), for the montage's colour bar (default: "
                        "inferno, the node's)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="the node's mask_threshold parameter where it overrides the bundle's (default: the bundle's)")
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

"""How long a frame's images take between two processes, per Fast DDS transport setting.

A probe process publishes one camera frame (480x360 rgb8, 518 kB) to an echo process,
which answers with six images of the same size, as perception_node does with all outputs
subscribed. The probe measures the time from publishing to the arrival of the sixth answer, one
frame at a time, for each setting: Fast DDS's defaults (UDPv4 + 512 KiB shared memory), shared
memory only, LARGE_DATA (TCP + shared memory), and the shipped profile
``config/fastdds_large_images.xml`` (64 MiB shared-memory segment); with reliable QoS (what the
node publishes) and best effort (what camera drivers publish). Prints a table and writes JSON and
Markdown.

    python benchmarks/dds_transport.py --reliability reliable best_effort --timeout 5 \
        --json benchmarks/results/dds_transport.json --markdown benchmarks/results/dds_transport.md
"""
import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from uncertain_seg_ros.atomic_io import atomic_write_text
from uncertain_seg_ros.ros.dds_transport import PROFILE_VARIABLES, USER_TRANSPORT_VARIABLES, large_image_profile
from uncertain_seg_ros.ros.qos import qos_profile

SETTINGS = {
    "default": {},
    "SHM": {"FASTDDS_BUILTIN_TRANSPORTS": "SHM"},
    "LARGE_DATA": {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"},
    "shipped profile": "profile",
}
ANSWERS = 6


def _image(width: int, height: int):
    from sensor_msgs.msg import Image

    msg = Image(height=height, width=width, encoding="rgb8", step=3 * width)
    msg.data = np.random.default_rng(0).integers(0, 256, height * width * 3, dtype=np.uint8).tobytes()
    return msg


def echo(width: int, height: int, reliability: str) -> None:
    """Answer every frame on /frame with ANSWERS images on /answer{k} carrying its header."""
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("dds_transport_echo")
    qos = qos_profile(reliability, 10)
    answers = [node.create_publisher(Image, f"/answer{k}", qos) for k in range(ANSWERS)]
    payload = _image(width, height)

    def on_frame(msg) -> None:
        for publisher in answers:
            payload.header = msg.header
            publisher.publish(payload)

    node.create_subscription(Image, "/frame", on_frame, qos)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def probe(rounds: int, width: int, height: int, timeout_s: float, reliability: str) -> dict:
    """Round trips of one frame and its ANSWERS answers, one at a time, after discovery."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("dds_transport_probe")
    arrived: dict[int, set[int]] = {}
    lock = threading.Lock()

    def on_answer(k: int):
        def callback(msg) -> None:
            with lock:
                arrived.setdefault(msg.header.stamp.nanosec, set()).add(k)
        return callback

    frame = _image(width, height)
    qos = qos_profile(reliability, 10)
    subs = [node.create_subscription(Image, f"/answer{k}", on_answer(k), qos) for k in range(ANSWERS)]
    publisher = node.create_publisher(Image, "/frame", qos)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    deadline = time.monotonic() + 60
    while publisher.get_subscription_count() == 0 or any(s.get_publisher_count() == 0 for s in subs):
        if time.monotonic() > deadline:
            raise TimeoutError("the echo process was not discovered within 60 s")
        time.sleep(0.05)
    time.sleep(2.0)  # discovery completes on each side separately: let the echo side match too
    latencies, lost = [], 0
    for i in range(1, rounds + 1):
        frame.header.stamp.nanosec = i
        start = time.perf_counter()
        publisher.publish(frame)
        while True:
            with lock:
                done = len(arrived.get(i, ())) == ANSWERS
            if done or time.perf_counter() - start > timeout_s:
                break
            time.sleep(0.0005)
        if done:
            latencies.append(time.perf_counter() - start)
        else:
            lost += 1
    executor.shutdown()
    spinner.join(timeout=5)
    node.destroy_node()
    rclpy.try_shutdown()
    return {"latencies_ms": [round(v * 1e3, 2) for v in latencies], "lost": lost}


def measure(setting: str, rounds: int, width: int, height: int, timeout_s: float, reliability: str = "reliable") -> dict:
    """Run echo and probe as two processes on a private localhost domain with ``setting``; both
    sides use ``reliability`` (reliable or best_effort)."""
    env = {k: v for k, v in os.environ.items() if k not in USER_TRANSPORT_VARIABLES}
    extra = SETTINGS[setting]
    if extra == "profile":
        extra = {var: str(large_image_profile()) for var in PROFILE_VARIABLES}
    env.update(extra, ROS_DOMAIN_ID=str(random.randint(1, 101)), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    size = ["--width", str(width), "--height", str(height), "--reliability", reliability]
    echo_proc = subprocess.Popen([sys.executable, __file__, "--role", "echo", *size], env=env)
    try:
        out = subprocess.run([sys.executable, __file__, "--role", "probe", "--rounds", str(rounds),
                              "--timeout", str(timeout_s), *size],
                             env=env, capture_output=True, text=True, timeout=120 + rounds * (timeout_s + 1))
    finally:
        echo_proc.terminate()
        echo_proc.wait(timeout=10)
    if out.returncode != 0:
        raise RuntimeError(f"probe failed for {setting}: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    lat = np.array(result["latencies_ms"]) if result["latencies_ms"] else np.array([np.nan])
    return {"setting": setting, "reliability": reliability, "environment": extra, "rounds": rounds, "answered": len(result["latencies_ms"]),
            "lost": result["lost"], "median_ms": float(np.median(lat)), "p95_ms": float(np.percentile(lat, 95)),
            "max_ms": float(np.max(lat)), "latencies_ms": result["latencies_ms"]}


def markdown(results: list[dict], width: int, height: int, timeout_s: float, command: str) -> str:
    lines = [
        "# Fast DDS transports for camera images on one host",
        "",
        f"`{command}`",
        "",
        f"One {width}x{height} rgb8 frame ({width * height * 3 / 1e3:.0f} kB) to a second process, which "
        f"answers with {ANSWERS} images of the same size (perception_node with every output subscribed); time "
        "from publishing the frame to the last answer, one frame at a time. Both sides use the QoS reliability "
        f"in the table; a frame not answered completely within {timeout_s:g} s counts as lost (with best effort "
        "nothing is resent).",
        "",
        "| setting | environment | reliability | answered | median ms | p95 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        env = ", ".join(f"`{k}={Path(v).name}`" for k, v in r["environment"].items()) or "(none)"
        lines.append(f"| {r['setting']} | {env} | {r['reliability']} | {r['answered']}/{r['rounds']} | "
                     f"{r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['max_ms']:.1f} |")
    lines += ["", "Fast DDS's shared-memory segment is 512 KiB per participant by default; a burst of 518 kB "
              "images does not fit, samples are dropped and a reliable reader gets them again only after the "
              "writer's next heartbeat (3 s). The shipped profile gives the segment 64 MiB.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("run", "echo", "probe"), default="run", help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--reliability", nargs="+", choices=("reliable", "best_effort"), default=["reliable"])
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a frame counts as lost")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    if args.role == "echo":
        echo(args.width, args.height, args.reliability[0])
        return 0
    if args.role == "probe":
        print(json.dumps(probe(args.rounds, args.width, args.height, args.timeout, args.reliability[0])))
        return 0
    command = " ".join(["python", "benchmarks/dds_transport.py", *sys.argv[1:]])
    results = []
    for reliability in args.reliability:
        for setting in args.settings:
            results.append(measure(setting, args.rounds, args.width, args.height, args.timeout, reliability))
            r = results[-1]
            print(f"{setting:16s} {reliability:11s} answered {r['answered']}/{r['rounds']}  median {r['median_ms']:8.1f} ms  "
                  f"p95 {r['p95_ms']:8.1f} ms  max {r['max_ms']:8.1f} ms", flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({"command": command, "width": args.width, "height": args.height,
                                                 "answers": ANSWERS, "timeout_s": args.timeout, "results": results},
                                                indent=1))
    if args.markdown:
        atomic_write_text(args.markdown, markdown(results, args.width, args.height, args.timeout, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

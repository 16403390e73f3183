"""Hostile camera messages against perception_node on a real ROS 2 graph: does it stay up, keep
answering, stay small and keep its log readable?

The node runs in its own process (as on a robot) on a private domain over loopback, with a raw and
a compressed camera. This process publishes a seeded stream of malformed messages (unknown
encodings, wrong steps, truncated and empty data, declared sizes far beyond any camera, random
bytes, truncated and bit-flipped PNG/JPEG, PNG "bombs", JPEGs declaring 30000x30000,
compressedDepth payloads), with a good frame every ``--good-every`` messages whose answer is
awaited, and a few valid 4000x3000 frames. It samples the node's resident memory throughout and
reads its log afterwards. Bounded in time by ``--seconds``; prints a table and writes JSON and
Markdown.

    python benchmarks/fuzz_node.py --messages 3000 --json benchmarks/results/fuzz_node.json \\
        --markdown benchmarks/results/fuzz_node.md

Latest frame wins in the node: a good frame followed at once by a malformed one on the same camera
is replaced (counted as dropped), so "good answered" is below 100% by design at high rates; the
final frame of each camera, sent alone, must be answered.
"""
import argparse
import json
import resource
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RAW_CAMERA = "/fuzz_raw/image_raw"
COMPRESSED_CAMERA = "/fuzz_c/image_raw"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels: 12 KB for 10000x10000,
    300 MB once decoded to RGB (what had the node OOM-killed)."""
    rows = (b"\x00" * (1 + (width + 7) // 8)) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9)) + _png_chunk(b"IEND", b"")


def jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the size fields of its frame header (SOF) rewritten to ``width`` x ``height``."""
    data = bytearray(jpeg)
    i = 2
    while data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no frame header in the JPEG")


def scene(rng: np.random.Generator, height: int = 72, width: int = 96) -> np.ndarray:
    """A small sky-over-road RGB frame with noise."""
    img = np.zeros((height, width, 3), np.int16)
    img[: height // 2] = (140, 170, 220)
    img[height // 2 :] = (90, 90, 90)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _encoded(rgb: np.ndarray, ext: str) -> bytes:
    import cv2

    return cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


# Each mutation: (rng, good rgb frame) -> the fields of a malformed message.
RAW_MUTATIONS = {
    "unknown_encoding": lambda rng, rgb: dict(encoding=rng.choice(["64FC1", "8UC3", "nv12", "RGB8", "", "rgb8 "]) +
                                              ("" if rng.random() < 0.5 else str(rng.integers(1000)))),
    "step_too_small": lambda rng, rgb: dict(step=int(rng.integers(0, rgb.shape[1] * 3))),
    "step_misaligned_16bit": lambda rng, rgb: dict(encoding="mono16", step=rgb.shape[1] * 2 + 1),
    "truncated_data": lambda rng, rgb: dict(data=rgb.tobytes()[: int(rng.integers(0, rgb.nbytes))]),
    "empty_image": lambda rng, rgb: dict(height=0, width=0, step=0, data=b""),
    "declares_50000x50000": lambda rng, rgb: dict(height=50_000, width=50_000, step=150_000, data=rgb.tobytes()),
    "odd_width_yuv422": lambda rng, rgb: dict(encoding="yuv422", width=rgb.shape[1] - 1, step=(rgb.shape[1] - 1) * 2),
    "huge_step": lambda rng, rgb: dict(step=2**31),
}
COMPRESSED_MUTATIONS = {
    "random_bytes": lambda rng, rgb: dict(data=rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes()),
    "empty": lambda rng, rgb: dict(data=b""),
    "png_truncated": lambda rng, rgb: dict(format="png", data=(d := _encoded(rgb, ".png"))[: int(rng.integers(8, len(d)))]),
    "jpeg_truncated": lambda rng, rgb: dict(format="jpeg", data=(d := _encoded(rgb, ".jpg"))[: int(rng.integers(2, len(d)))]),
    "png_bit_flips": lambda rng, rgb: dict(format="png", data=_flip(rng, _encoded(rgb, ".png"))),
    "jpeg_bit_flips": lambda rng, rgb: dict(format="jpeg", data=_flip(rng, _encoded(rgb, ".jpg"))),
    "png_bomb_10000x10000": lambda rng, rgb: dict(format="png", data=BOMB),
    "jpeg_declares_30000x30000": lambda rng, rgb: dict(format="jpeg", data=jpeg_declaring(_encoded(rgb, ".jpg"), 30_000, 30_000)),
    "compressed_depth": lambda rng, rgb: dict(format="16UC1; compressedDepth png", data=_encoded(rgb, ".png")),
    "gif_header": lambda rng, rgb: dict(format="gif", data=b"GIF89a" + bytes(64)),
}
BOMB = png_bomb()
LARGE_VALID = "valid_4000x3000_png"


def _flip(rng: np.random.Generator, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 8))):
        out[int(rng.integers(8, len(out)))] ^= 1 << int(rng.integers(8))
    return bytes(out)


class NodeMemory:
    """Resident memory of a process from /proc (Linux), sampled by a background thread."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid, self.period_s = pid, period_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def field_mb(self, name: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def start(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # peak (VmHWM) from here on
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(self.field_mb("VmRSS"))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Probe:
    """The publishing and listening side: one rclpy node spun in the background."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CompressedImage, Image

        from uncertain_seg_ros.ros.background_spin import BackgroundSpin
        from uncertain_seg_ros.ros.qos import qos_profile

        rclpy.init()
        self.node = rclpy.create_node("fuzz_probe")
        self.raw = self.node.create_publisher(Image, RAW_CAMERA, qos_profile("reliable", 10))
        self.compressed = self.node.create_publisher(CompressedImage, COMPRESSED_CAMERA + "/compressed",
                                                     qos_profile("reliable", 10))
        self.lock = threading.Lock()
        self.answered: set[int] = set()
        self.status: dict[str, dict[str, str]] = {}
        for camera in (RAW_CAMERA, COMPRESSED_CAMERA):
            self.node.create_subscription(Image, camera.rsplit("/", 1)[0] + "/segmentation/labels", self._on_labels,
                                          qos_profile("reliable", 50))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.spin = BackgroundSpin(self.node)

    def _on_labels(self, msg) -> None:
        with self.lock:
            self.answered.add(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)

    def _on_diagnostics(self, msg) -> None:
        with self.lock:
            for s in msg.status:
                self.status[s.hardware_id] = {**{kv.key: kv.value for kv in s.values}, "_message": s.message}

    def serving(self) -> bool:
        with self.lock:
            return all(self.status.get(c, {}).get("outputs_subscribed") == "labels" for c in (RAW_CAMERA, COMPRESSED_CAMERA))

    def is_answered(self, stamp: int) -> bool:
        with self.lock:
            return stamp in self.answered

    def publish(self, camera: str, fields: dict, stamp: int) -> None:
        from sensor_msgs.msg import CompressedImage, Image

        msg = Image() if camera == RAW_CAMERA else CompressedImage()
        for name, value in fields.items():
            setattr(msg, name, value)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        msg.header.frame_id = "fuzz"
        (self.raw if camera == RAW_CAMERA else self.compressed).publish(msg)

    def close(self) -> None:
        import rclpy

        self.spin.stop()
        self.node.destroy_node()
        rclpy.try_shutdown()


def good_fields(camera: str, rgb: np.ndarray, rng: np.random.Generator) -> dict:
    if camera == RAW_CAMERA:
        return dict(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3, data=rgb.tobytes())
    ext, fmt = (".png", "rgb8; png compressed bgr8") if rng.random() < 0.5 else (".jpg", "rgb8; jpeg compressed bgr8")
    return dict(format=fmt, data=_encoded(rgb, ext))


def plan(messages: int, good_every: int, large_every: int, kinds: list[str] | None, seed: int) -> list[tuple[str, str]]:
    """(camera, kind) of each message; kind 'good', LARGE_VALID or a mutation name."""
    rng = np.random.default_rng(seed)
    raw = [k for k in RAW_MUTATIONS if kinds is None or k in kinds]
    compressed = [k for k in COMPRESSED_MUTATIONS if kinds is None or k in kinds]
    out = []
    for i in range(messages):
        camera = RAW_CAMERA if (i // 2) % 2 == 0 else COMPRESSED_CAMERA
        if i % good_every == good_every - 1:
            out.append((camera, "good"))
        elif large_every and i % large_every == large_every // 2:
            out.append((COMPRESSED_CAMERA, LARGE_VALID))
        else:
            pool = raw if camera == RAW_CAMERA else compressed
            if not pool:
                camera, pool = (COMPRESSED_CAMERA, compressed) if compressed else (RAW_CAMERA, raw)
            out.append((camera, str(rng.choice(pool))))
    return out


def run(args: argparse.Namespace) -> dict:
    import cv2

    from uncertain_seg_ros.ros.demo import isolate_graph, start_node, stop_node

    isolate_graph(None)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fuzz_node_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "node.log"
    params = {"model": args.model, "device": "cpu", "backend": "torch", "input_qos": "reliable", "input_depth": "10",
              "diagnostics_period": "0.5", "camera_topics": f"[{RAW_CAMERA},{COMPRESSED_CAMERA}/compressed]"}
    proc = start_node(params, log_path, env={"OMP_NUM_THREADS": str(args.threads)})
    if args.address_space_cap_gb:
        cap = int(args.address_space_cap_gb * 2**30)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (cap, cap))
    probe = Probe()
    rng = np.random.default_rng(args.seed)
    stamp = [1_000_000_000]

    def next_stamp() -> int:
        stamp[0] += 1_000_003
        return stamp[0]

    try:
        deadline = time.monotonic() + 120
        while not probe.serving():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perception_node did not come up; see {log_path}")
            time.sleep(0.1)
        memory = NodeMemory(proc.pid)
        rss_start = memory.field_mb("VmRSS")
        memory.start()
        large = cv2.resize(scene(rng), (4000, 3000), interpolation=cv2.INTER_NEAREST)
        sent, good = Counter(), {}
        t0 = time.monotonic()
        schedule = plan(args.messages, args.good_every, args.large_every, args.kinds, args.seed)
        for i, (camera, kind) in enumerate(schedule):
            if time.monotonic() - t0 > args.seconds:
                break
            rgb = scene(rng)
            s = next_stamp()
            if kind == "good":
                fields = good_fields(camera, rgb, rng)
                good[s] = camera
            elif kind == LARGE_VALID:
                fields = dict(format="png", data=_encoded(large, ".png"))
            else:
                mutation = (RAW_MUTATIONS if camera == RAW_CAMERA else COMPRESSED_MUTATIONS)[kind]
                fields = {**good_fields(camera, rgb, rng), **mutation(rng, rgb)}
            probe.publish(camera, fields, s)
            sent[kind] += 1
            time.sleep(max(0.0, t0 + (i + 1) / args.rate - time.monotonic()))
        sending_s = time.monotonic() - t0
        settle = time.monotonic() + args.settle
        while time.monotonic() < settle and not all(probe.is_answered(s) for s in good):
            time.sleep(0.1)
        finals = {}
        for camera in (RAW_CAMERA, COMPRESSED_CAMERA):
            finals[camera] = next_stamp()
            probe.publish(camera, good_fields(camera, scene(rng), rng), finals[camera])
        final_deadline = time.monotonic() + 30
        while time.monotonic() < final_deadline and not all(probe.is_answered(s) for s in finals.values()):
            time.sleep(0.1)
        time.sleep(1.0)  # one more diagnostics report
        alive = proc.poll() is None
        peak = memory.field_mb("VmHWM") if alive else float("nan")
        rss_end = memory.field_mb("VmRSS") if alive else float("nan")
        memory.stop()
        with probe.lock:
            status = {c: dict(probe.status.get(c, {})) for c in (RAW_CAMERA, COMPRESSED_CAMERA)}
        good_answered = sum(probe.is_answered(s) for s in good)
        finals_answered = all(probe.is_answered(s) for s in finals.values())
    finally:
        probe.close()
        code = stop_node(proc)
    log_lines = log_path.read_text(errors="replace").splitlines()
    keys = ("frames_received", "frames_processed", "frames_bad", "frames_dropped", "frames_failed")
    return {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "node_log": str(log_path), "model": args.model, "seed": args.seed, "rate_hz": args.rate, "seconds_sending": round(sending_s, 1),
        "messages_sent": sum(sent.values()), "sent_by_kind": dict(sorted(sent.items())),
        "good_sent": len(good), "good_answered": good_answered,
        "good_answered_fraction": round(good_answered / len(good), 4) if good else None,
        "final_frames_answered": finals_answered, "node_alive_at_end": alive, "node_exit_code": code,
        "node_counters": {c: {k: int(status[c][k]) for k in keys if k in status[c]} for c in status},
        "node_last_status": {c: status[c].get("_message", "") for c in status},
        "memory_mb": {"rss_before": round(rss_start, 1), "peak_rss_during": round(peak, 1), "rss_after": round(rss_end, 1),
                      "samples": len(memory.samples)},
        "log": {"lines": len(log_lines),
                "not_from_the_ros_logger": sum(1 for ln in log_lines if ln.strip() and not ln.startswith("[")),
                "decoder_messages": sum(1 for ln in log_lines if "libpng" in ln or "JPEG data" in ln),
                "unsupported_encoding_errors": sum(1 for ln in log_lines if "unsupported image encoding" in ln)},
    }


def markdown(r: dict) -> str:
    m, lg = r["memory_mb"], r["log"]
    rows = [
        ("messages sent (malformed + good)", f"{r['messages_sent']} in {r['seconds_sending']} s at {r['rate_hz']:g}/s"),
        ("good frames answered", f"{r['good_answered']}/{r['good_sent']} ({r['good_answered_fraction']:.1%})"),
        ("final frame of each camera answered", str(r["final_frames_answered"])),
        ("node alive at the end / exit code after SIGINT", f"{r['node_alive_at_end']} / {r['node_exit_code']}"),
        ("resident memory before / peak during / after (MB)", f"{m['rss_before']} / {m['peak_rss_during']} / {m['rss_after']}"),
        ("log lines / not from the ROS logger", f"{lg['lines']} / {lg['not_from_the_ros_logger']}"),
        ("decoder messages (inside throttled warnings)", str(lg["decoder_messages"])),
        ("unsupported-encoding errors logged", str(lg["unsupported_encoding_errors"])),
    ]
    counters = "\n".join(f"| `{c}` | " + " | ".join(str(v.get(k, "")) for k in ("frames_received", "frames_processed",
                         "frames_bad", "frames_dropped", "frames_failed")) + " |" for c, v in r["node_counters"].items())
    kinds = ", ".join(f"{k} {n}" for k, n in r["sent_by_kind"].items())
    return (f"# perception_node under hostile camera messages\n\n`{r['command']}`\n\n"
            f"Model `{r['model']}` on the CPU, a raw and a compressed camera, reliable QoS, seed {r['seed']}.\n\n"
            "| what | result |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) +
            "\n\nThe node's own counters at the end:\n\n| camera | received | processed | bad | dropped | failed |\n"
            "|---|---|---|---|---|---|\n" + counters + f"\n\nSent by kind: {kinds}.\n\n"
            "A good frame that a malformed one replaces before inference takes it is dropped (latest frame wins), "
            "so good frames answered stay below 100% at this rate by design.\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages to send (default 3000)")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop sending after this long (default 120)")
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second (default 50)")
    parser.add_argument("--good-every", type=int, default=10, help="every N-th message is a good frame (default 10)")
    parser.add_argument("--large-every", type=int, default=500, help="a valid 4000x3000 PNG every N messages (0: none)")
    parser.add_argument("--kinds", nargs="+", default=None, help="only these mutations (default: all)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait for the last answers")
    parser.add_argument("--model", default="camvid_demo", help="bundle folder or shipped name (default camvid_demo)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the node (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address-space-cap-gb", type=float, default=0.0,
                        help="cap the node's address space (RLIMIT_AS), to run old code that allocates without bound")
    parser.add_argument("--workdir", default=None, help="where the node's log goes (default: a new temporary folder)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    result = run(args)
    text = markdown(result)
    print(text)
    from uncertain_seg_ros.atomic_io import atomic_write_text

    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        atomic_write_text(args.markdown, text)
    return 0 if result["final_frames_answered"] and result["node_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

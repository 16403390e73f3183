"""``uncertain-seg benchmark``: the inference benchmark's command.

Registered through the ``uncertain_seg_ros.commands`` entry point, as the node's commands are, so
the training package's CLI offers it without importing the benchmarks. rclpy is imported only when
it runs, and not at all with ``--skip-ros``.
"""
import argparse
import signal
import sys
from pathlib import Path

from uncertain_seg_ros.resources import sample_path
from uncertain_seg_ros.ros.commands import require_rclpy


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from exc
    return width, height


def _benchmark(args: argparse.Namespace) -> int:
    if not args.skip_ros:
        require_rclpy()
    from .inference import BenchmarkConfig, run_benchmark
    from .inference_report import table, write_results

    frames = tuple(Path(f) for f in args.frames) or (sample_path("camvid_dusk") / "images",)
    cfg = BenchmarkConfig(
        model=args.model, backends=tuple(args.backends), precisions=tuple(args.precisions or ()), device=args.device,
        frames=frames, camera_size=args.camera_size, encoding=args.encoding, cameras=args.cameras,
        iterations=args.iterations, warmup=args.warmup, e2e_frames=args.e2e_frames, rate_hz=args.rate,
        batch_window_ms=args.batch_window,
        agreement_frames=args.agreement_frames, outputs=tuple(args.outputs), skip_ros=args.skip_ros,
        cache_dir=args.cache, domain_id=args.domain_id, fastdds_profile=args.fastdds_profile or None,
        timeout_s=args.timeout, threads=tuple(args.threads or ()), load_cores=tuple(args.load_cores),
        load_max_s=args.load_max_seconds, work_dir=Path(args.work) if args.work else None, note=args.note)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the node process is stopped too
    run = run_benchmark(cfg)
    print(table(run))
    write_results(run, args.json, args.markdown, args.chart, args.append)
    for what, path in (("json", args.json), ("markdown", args.markdown), ("chart", args.chart)):
        if path:
            print(f"{what}: {path}")
    return 0


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``benchmark`` to the top level."""
    groups[""].add_parser(
        "benchmark", help="latency per stage and end to end through the node, per backend and precision",
        options=_benchmark_options)


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _benchmark_options(p: argparse.ArgumentParser) -> None:
    """Added only when ``benchmark`` runs: its choices come from the inference package, which imports torch."""
    from uncertain_seg_ros.inference import BACKENDS, OUTPUT_KINDS, PRECISIONS

    from .cpu_load import DEFAULT_MAX_SECONDS
    from .profiling import PAYLOAD_ENCODINGS

    p.description = ("Measures, on real camera frames, the node's path per stage (decode, preprocess, inference, "
                     "postprocess, message conversion, publish: median and p95) and end to end through a real ROS 2 "
                     "graph (perception_node in its own process, latency at a fixed rate and back-to-back throughput), "
                     "for each backend and precision, at batch 1 and with --cameras cameras, for each --threads count and "
                     "--load-cores competing load; label agreement with "
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
    p.add_argument("--threads", nargs="+", type=_count(1), default=None, metavar="N",
                   help="CPU thread counts to measure, each for every backend (PyTorch's, ONNX Runtime's and OpenVINO's "
                        "threads; the node gets -p threads:=N and OMP_NUM_THREADS=N); default: this process's PyTorch "
                        "setting, the node its own")
    p.add_argument("--load-cores", nargs="+", type=_count(0), default=[0], metavar="N",
                   help="competing loads to measure under: N other processes busy-looping, one core each, started before "
                        "each measurement (stage timing, each end-to-end run) and stopped after it, e.g. --load-cores 0 1 "
                        "(default: 0, no competing load)")
    p.add_argument("--load-max-seconds", type=float, default=DEFAULT_MAX_SECONDS, metavar="S",
                   help="each competing process stops itself after this long even if the benchmark is killed; a "
                        f"measurement that outlasts it is marked (default: {DEFAULT_MAX_SECONDS:g})")
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

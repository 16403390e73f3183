"""``uncertain-seg build-engine``: build a bundle's compiled inference artefact ahead of time.

The node builds a missing artefact at start-up (minutes for TensorRT); building it here first, with
the node's model, backend, precision, device, number of cameras and cache folder, means the robot
only loads it. The cache key makes sure the node never loads an artefact built for anything else.
"""
import argparse

import torch

from uncertain_seg_ros.bundle import load_bundle
from uncertain_seg_ros.inference import BACKENDS, PRECISIONS, ArtifactCache, choose_backend, create_backend
from uncertain_seg_ros.resources import resolve_bundle


def build_engine(model: str, backend: str, device: str, precision: str, cameras: int, cache_dir: str | None,
                 openvino_device: str = "CPU") -> str:
    """Build (or find) the artefact; returns a one-line description of what is cached where."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    name = choose_backend(backend, device, precision)
    bundle = load_bundle(resolve_bundle(model), device)
    built = create_backend(name, bundle, device, precision, cameras, ArtifactCache(cache_dir),
                           openvino_device=openvino_device)
    key = getattr(built, "key", None)
    if key is None:
        return f"{built.describe()}: nothing to build ahead of time (it compiles in the node's process at start-up)"
    return f"{built.describe()}: artefact ready in {ArtifactCache(cache_dir).entry(key)}"


def _run(args: argparse.Namespace) -> int:
    print(build_engine(args.model, args.backend, args.device, args.precision, args.cameras, args.cache,
                       args.openvino_device))
    return 0


def add_options(p: argparse.ArgumentParser) -> None:
    """The ``uncertain-seg build-engine`` command's description and options."""
    p.description = (
        "Builds the compiled inference artefact the node would build at start-up and stores it in the engine "
        "cache, keyed by model checksum, backend and library versions, GPU, precision and input shape. Use the "
        "same values as the node's parameters. Example: uncertain-seg build-engine --model camvid_demo "
        "--backend tensorrt --device cuda --precision fp16 --cameras 2")
    p.add_argument("--model", default="camvid_demo", help="bundle folder or shipped bundle name (default: camvid_demo)")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="as the node's 'backend' parameter")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="as the node's 'precision' parameter")
    p.add_argument("--cameras", type=int, default=1, help="number of camera topics of the node (its largest batch)")
    p.add_argument("--openvino-device", default="CPU",
                   help="where the openvino backend runs the network: CPU, or GPU for an Intel GPU (default: CPU)")
    p.add_argument("--cache", default=None, help="engine cache folder (the node's 'engine_cache'; default: "
                   "$UNCERTAIN_SEG_CACHE or ~/.cache/uncertain_seg_ros/engines)")
    p.set_defaults(func=_run)

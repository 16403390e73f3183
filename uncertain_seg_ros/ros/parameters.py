"""The node's parameters: declared with descriptions, validated at start-up and on every change.

Parameters in :data:`LIVE` take effect while the node runs (``ros2 param set``), validated by the
same rules as at start-up; the others are declared read-only, so that a change is refused rather
than accepted and ignored. Overrides that name no parameter (a typo such as ``mask_treshold``) are
reported with the closest name.
"""
import difflib
from dataclasses import dataclass

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.node import Node
from rclpy.parameter import Parameter

from . import OPENCV_PIXEL_CAP
from ..colormap import COLORMAPS
from ..inference import BACKENDS as INFERENCE_BACKENDS
from ..inference import OUTPUT_KINDS, PRECISIONS
from .qos import QOS_PRESETS

BACKENDS = ("auto", *INFERENCE_BACKENDS)
TRANSPORTS = ("raw", "compressed")

# name -> (default, description). Every entry is documented in config/perception.yaml too.
PARAMETERS: dict[str, tuple[object, str]] = {
    "model": ("camvid_demo", "model bundle: a folder path, or the name of a bundle shipped with the package"),
    "backend": ("auto", f"inference backend, one of {BACKENDS}; auto picks the fastest available"),
    "device": ("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N"),
    "precision": ("fp32", f"network precision, one of {tuple(PRECISIONS)} (fp16 needs CUDA or an Intel GPU; bf16 a CPU or GPU "
                          "that has it; int8: onnxruntime or openvino on the CPU)"),
    "threads": (1, "CPU threads of the network and of the pre- and post-processing; 0 keeps PyTorch's default (one per "
                   "core). 1 by default: on a CPU other nodes share, more threads wait on each other (benchmarks)"),
    "openvino_device": ("CPU", "where the openvino backend runs the network: CPU, or GPU (an Intel GPU), as OpenVINO names it"),
    "engine_cache": ("", "folder of compiled artefacts (ONNX, TensorRT); empty: $UNCERTAIN_SEG_CACHE or ~/.cache/uncertain_seg_ros/engines"),
    "camera_topics": (["/camera/image_raw"], "image topics to segment; outputs go under <topic's namespace>/<output_namespace>/"),
    "transport": ("raw", "raw: sensor_msgs/Image on each topic; compressed: sensor_msgs/CompressedImage on <topic>/compressed "
                         "(a topic listed as .../compressed is compressed whatever this says)"),
    "input_qos": ("sensor_data", f"QoS of the camera subscriptions, one of {tuple(QOS_PRESETS)}"),
    "input_depth": (2, "history depth of the camera subscriptions (latest frame wins anyway)"),
    "output_qos": ("reliable", f"QoS of the output publishers, one of {tuple(QOS_PRESETS)}"),
    "output_depth": (10, "history depth of the output publishers; reliable delivery can only repair a lost sample still in it"),
    "outputs": (list(OUTPUT_KINDS), f"outputs to publish, any of {OUTPUT_KINDS}; each is computed only while it has subscribers"),
    "output_namespace": ("segmentation", "sub-namespace of each camera's outputs"),
    "overlay_alpha": (0.5, "weight of the class colours in the overlay, 0..1"),
    "colormap": ("inferno", f"colour map of the uncertainty image, one of {COLORMAPS}"),
    "mask_threshold": (-1.0, "misclassification-mask threshold in [0, 1]; negative: use the bundle's calibrated threshold"),
    "max_rate_hz": (0.0, "per-camera processing rate limit in Hz; 0 = as fast as frames come"),
    "batch_window_ms": (0.0, "with several cameras: after a new frame, wait up to this long for the other cameras' "
                             "new frames so that they share one network call; 0 = take only the frames already waiting"),
    "max_input_pixels": (4096 * 3072, "frames with more pixels (width x height, read from the message fields or the "
                                      "PNG/JPEG header, before decoding) are refused and counted as bad"),
    "max_output_pixels": (1920 * 1080, "frames with more pixels are shrunk to this many (same aspect ratio) before "
                                       "inference, and their outputs published at that size; bounds memory per frame"),
    "stall_timeout": (10.0, "diagnostics turn ERROR when a frame has waited this many seconds for inference "
                            "without an outcome (a hung or failing pipeline); 0 = not checked"),
    "uncertainty_alarm": (0.3, "diagnostics turn WARN when the fraction of uncertain pixels exceeds this, 0..1"),
    "diagnostics_period": (1.0, "seconds between /diagnostics messages"),
}


# Parameters that may change while the node runs; the rest configure subscriptions, the model and the
# backend, which are set up once.
LIVE = frozenset({"mask_threshold", "overlay_alpha", "colormap", "outputs", "max_rate_hz", "uncertainty_alarm",
                  "batch_window_ms"})
# Declared by rclpy itself on every node.
RCLPY_PARAMETERS = frozenset({"use_sim_time", "start_type_description_service"})


class ParameterError(ValueError):
    """A parameter has a value the node cannot run with."""


@dataclass(frozen=True)
class NodeSettings:
    model: str
    backend: str
    device: str
    precision: str
    threads: int
    openvino_device: str
    engine_cache: str
    camera_topics: tuple[str, ...]
    transport: str
    input_qos: str
    input_depth: int
    output_qos: str
    output_depth: int
    outputs: tuple[str, ...]
    output_namespace: str
    overlay_alpha: float
    colormap: str
    mask_threshold: float | None
    max_rate_hz: float
    batch_window_ms: float
    max_input_pixels: int
    max_output_pixels: int
    stall_timeout: float
    uncertainty_alarm: float
    diagnostics_period: float


def _one_of(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ParameterError(f"parameter '{name}' is {value!r}; allowed: {', '.join(allowed)}")
    return value


def _non_empty(name: str, value: str) -> str:
    if not value.strip():
        raise ParameterError(f"parameter '{name}' must not be empty")
    return value.strip()


def _in_range(name: str, value: float, low: float, high: float | None = None) -> float:
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ParameterError(f"parameter '{name}' is {value}; it must be {bound}")
    return value


def declare(node: Node) -> NodeSettings:
    """Declare every parameter (with its description; :data:`LIVE` ones writable, the rest read-only)
    and return the validated settings.

    Numeric parameters take integers too (``batch_window_ms:=10``), which ROS would otherwise
    refuse for a parameter declared with a float default. A value of the wrong type (a string for
    a string array, say) is a :class:`ParameterError` that says what was expected.
    """
    for name, (default, description) in PARAMETERS.items():
        descriptor = ParameterDescriptor(description=description, dynamic_typing=isinstance(default, float),
                                         read_only=name not in LIVE)
        try:
            node.declare_parameter(name, default, descriptor)
        except InvalidParameterTypeException as exc:
            raise ParameterError(_type_message(name, node, default)) from exc
    return validate({name: node.get_parameter(name).value for name in PARAMETERS})


def _type_message(name: str, node: Node, default) -> str:
    given = getattr(node, "_parameter_overrides", {}).get(name)
    shown = f" {given.value!r} ({given.type_.name.lower()})" if given is not None else ""
    expected = Parameter.Type.from_parameter_value(default).name.lower().replace("_", " ")
    article = "an" if expected[0] in "aeiou" else "a"
    example = f"; e.g. {name}:=\"[{default[0]}]\"" if isinstance(default, list) else ""
    return f"parameter '{name}' is{shown}; it must be {article} {expected}{example}"


def unknown_overrides(node: Node) -> list[str]:
    """One warning per parameter override that names no parameter of the node, with the closest name.

    rclpy keeps the overrides given to the node (``-p``, ``--params-file``) as ``_parameter_overrides``;
    there is no public accessor for them, and an override that matches no declared parameter is
    otherwise dropped without a word.
    """
    overrides = getattr(node, "_parameter_overrides", {})
    warnings = []
    for name in sorted(set(overrides) - set(PARAMETERS) - RCLPY_PARAMETERS):
        close = difflib.get_close_matches(name, PARAMETERS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the parameters are: {', '.join(PARAMETERS)}"
        warnings.append(f"parameter '{name}' is not a parameter of this node and is ignored{hint}")
    return warnings


def validate(p: dict[str, object]) -> NodeSettings:
    """Validated settings from every parameter's value (start-up and live changes share these rules)."""
    p = dict(p)
    numeric = {name for name, (default, _) in PARAMETERS.items() if isinstance(default, float)}
    for name in numeric:
        if isinstance(p[name], bool) or not isinstance(p[name], (int, float)):
            raise ParameterError(f"parameter '{name}' is {p[name]!r}; it must be a number")
        p[name] = float(p[name])
    topics = tuple(p["camera_topics"])
    if not topics or any(not t for t in topics):
        raise ParameterError("parameter 'camera_topics' must list at least one non-empty topic name")
    if len(set(topics)) != len(topics):
        raise ParameterError(f"parameter 'camera_topics' lists a topic twice: {list(topics)}")
    outputs = tuple(p["outputs"])
    for o in outputs:
        _one_of("outputs", o, OUTPUT_KINDS)
    device = p["device"]
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ParameterError(f"parameter 'device' is {device!r}; allowed: auto, cpu, cuda, cuda:N")
    if not p["output_namespace"] or "/" in p["output_namespace"].strip("/"):
        raise ParameterError("parameter 'output_namespace' must be one non-empty name without '/'")
    threshold = p["mask_threshold"]
    return NodeSettings(
        model=p["model"],
        backend=_one_of("backend", p["backend"], BACKENDS),
        device=device,
        precision=_one_of("precision", p["precision"], tuple(PRECISIONS)),
        threads=int(_in_range("threads", p["threads"], 0)),
        openvino_device=_non_empty("openvino_device", p["openvino_device"]),
        engine_cache=p["engine_cache"],
        camera_topics=topics,
        transport=_one_of("transport", p["transport"], TRANSPORTS),
        input_qos=_one_of("input_qos", p["input_qos"], tuple(QOS_PRESETS)),
        input_depth=int(_in_range("input_depth", p["input_depth"], 1)),
        output_qos=_one_of("output_qos", p["output_qos"], tuple(QOS_PRESETS)),
        output_depth=int(_in_range("output_depth", p["output_depth"], 1)),
        outputs=outputs,
        output_namespace=p["output_namespace"].strip("/"),
        overlay_alpha=_in_range("overlay_alpha", p["overlay_alpha"], 0.0, 1.0),
        colormap=_one_of("colormap", p["colormap"], COLORMAPS),
        mask_threshold=None if threshold < 0 else _in_range("mask_threshold", threshold, 0.0, 1.0),
        max_rate_hz=_in_range("max_rate_hz", p["max_rate_hz"], 0.0),
        batch_window_ms=_in_range("batch_window_ms", p["batch_window_ms"], 0.0),
        max_input_pixels=_in_range("max_input_pixels", p["max_input_pixels"], 1, OPENCV_PIXEL_CAP),
        max_output_pixels=_in_range("max_output_pixels", p["max_output_pixels"], 1),
        stall_timeout=_in_range("stall_timeout", p["stall_timeout"], 0.0),
        uncertainty_alarm=_in_range("uncertainty_alarm", p["uncertainty_alarm"], 0.0, 1.0),
        diagnostics_period=_in_range("diagnostics_period", p["diagnostics_period"], 0.05),
    )


def changed(node: Node, parameters: list[Parameter]) -> NodeSettings:
    """The settings ``parameters`` would give (a :class:`ParameterError` says why not); nothing is applied."""
    values = {name: node.get_parameter(name).value for name in PARAMETERS}
    values.update({p.name: p.value for p in parameters if p.name in PARAMETERS})
    return validate(values)

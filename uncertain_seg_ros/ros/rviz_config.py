"""The RViz layout for the node's first camera: ``config/perception.rviz`` pointed at that camera's outputs.

The shipped file shows the default camera's outputs (``/camera/segmentation/*``); a node started with
``camera_topics:="['/front/image_raw']"`` publishes under ``/front/segmentation/``, so the launch file
renders the layout for the first camera into a temporary file and gives that to RViz. Imports neither
rclpy nor the model, so that ``ros2 launch`` stays quick.
"""
import os
import tempfile
from pathlib import Path

import yaml

from ..resources import config_path
from .topics import output_namespace

IMAGE_DISPLAY = "rviz_default_plugins/Image"
DEFAULT_OUTPUT_NAMESPACE = "segmentation"  # the node's default output_namespace
RVIZ_MISSING = ("rviz:=true, but rviz2 is not installed (sudo apt install ros-$ROS_DISTRO-rviz2); "
                "perception_node runs without RViz")


def first_camera(camera_topics: str) -> str:
    """The first topic of the launch argument ``camera_topics`` (a YAML list, or one topic), as the node resolves it."""
    topics = yaml.safe_load(camera_topics)
    topics = [topics] if isinstance(topics, str) else topics
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise ValueError(f"camera_topics must be a list of topic names, got {camera_topics!r}")
    topic = topics[0].removesuffix("/compressed")
    return topic if topic.startswith("/") else f"/{topic}"


def params_file_output_namespace(params_file: str, node_name: str = "perception_node") -> str:
    """``output_namespace`` as a ROS 2 params file sets it for the node (``/**`` entries, then the node's own), else
    the node's default."""
    entries = yaml.safe_load(Path(params_file).read_text()) or {}
    value = DEFAULT_OUTPUT_NAMESPACE
    for key in sorted(entries, key=lambda k: str(k).strip("/") != "**"):
        name = str(key).strip("/")
        if name == "**" or name.rsplit("/", 1)[-1] == node_name:
            value = (entries[key] or {}).get("ros__parameters", {}).get("output_namespace", value)
    return value


def render_rviz_config(camera_topic: str, sub_namespace: str = DEFAULT_OUTPUT_NAMESPACE, template: Path | None = None) -> str:
    """The layout (YAML text) with every image display showing the same output of ``camera_topic`` instead."""
    layout = yaml.safe_load((template or config_path("perception.rviz")).read_text())
    namespace = output_namespace(camera_topic, sub_namespace.strip("/"))
    for display in layout["Visualization Manager"]["Displays"]:
        if display["Class"] == IMAGE_DISPLAY:
            kind = display["Topic"]["Value"].rsplit("/", 1)[1]
            display["Topic"]["Value"] = f"{namespace}/{kind}"
    return yaml.safe_dump(layout, sort_keys=False)


def write_rviz_config(camera_topic: str, sub_namespace: str = DEFAULT_OUTPUT_NAMESPACE, template: Path | None = None) -> Path:
    """:func:`render_rviz_config` into a new temporary ``.rviz`` file (RViz reads it at start-up); returns its path."""
    fd, name = tempfile.mkstemp(prefix="uncertain_seg_ros_", suffix=".rviz")
    with os.fdopen(fd, "w") as f:
        f.write(render_rviz_config(camera_topic, sub_namespace, template))
    return Path(name)


def rviz_installed() -> bool:
    """Whether ``rviz2`` is installed where ``ros2 launch`` looks for it (the ament index)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        get_package_prefix("rviz2")
    except (PackageNotFoundError, OSError):  # OSError: no AMENT_PREFIX_PATH (no sourced ROS install)
        return False
    return True

"""Launch file, params file and RViz config: what can be checked without launch_ros (not installable here).

They parse; every file they name exists; every launch argument and params-file entry is a node
parameter with the same default; RViz shows the topics the node publishes for the default camera.
"""
import ast

import pytest
import yaml

from uncertain_seg_ros.inference import OUTPUT_KINDS
from uncertain_seg_ros.ros.camera_stream import output_namespace
from uncertain_seg_ros.ros.dds_transport import PROFILE_VARIABLES
from uncertain_seg_ros.ros.parameters import PARAMETERS
from uncertain_seg_ros.ros.rviz_config import (
    DEFAULT_OUTPUT_NAMESPACE, RVIZ_MISSING, first_camera, params_file_output_namespace, render_rviz_config,
    rviz_installed, write_rviz_config)

from conftest import REPO

LAUNCH = REPO / "launch" / "perception.launch.py"


def _launch_calls(name: str) -> list[ast.Call]:
    tree = ast.parse(LAUNCH.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == name]


def _launch_arguments() -> dict[str, str | None]:
    """Argument name -> default (None where the default is computed, e.g. a share-directory path)."""
    args = {}
    for call in _launch_calls("DeclareLaunchArgument"):
        default = next(k.value for k in call.keywords if k.arg == "default_value")
        args[call.args[0].value] = default.value if isinstance(default, ast.Constant) else None
    return args


def test_launch_file_parses_and_defines_generate_launch_description():
    tree = ast.parse(LAUNCH.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)


def test_launch_arguments_mirror_node_parameters():
    args = _launch_arguments()
    assert {"params_file", "rviz", "dds_profile"} <= set(args)
    for name, default in args.items():
        if name in ("params_file", "rviz", "dds_profile"):
            continue
        assert name in PARAMETERS, f"launch argument {name} is not a node parameter"
        expected = PARAMETERS[name][0]
        assert (yaml.safe_load(default) if isinstance(expected, list) else default) == expected, name


def test_launch_starts_the_installed_executable_and_names_existing_files():
    node = next(c for c in _launch_calls("Node") if any(k.arg == "executable" and k.value.value == "perception_node" for k in c.keywords))
    assert next(k.value.id for k in node.keywords if k.arg == "package") == "PACKAGE"
    source = LAUNCH.read_text()
    assert 'PACKAGE = "uncertain_seg_ros"' in source
    for relative in ("config/perception.yaml", "config/fastdds_large_images.xml"):
        folder, name = relative.split("/")
        assert f'"{folder}", "{name}"' in source
        assert (REPO / relative).is_file()
    assert (REPO / "config" / "perception.rviz").is_file()  # rendered by rviz_config.write_rviz_config
    assert "perception_node = uncertain_seg_ros.ros.perception_node:main" in (REPO / "setup.py").read_text()


def test_node_and_rviz_get_the_fast_dds_profile():
    """Both Fast DDS generations' variables, for the node and RViz (Fast DDS reads them at start-up)."""
    for call in _launch_calls("Node"):
        env = next(k.value for k in call.keywords if k.arg == "additional_env")
        assert env.id == "dds"
    source = LAUNCH.read_text()
    for var in PROFILE_VARIABLES:
        assert f'"{var}": LaunchConfiguration("dds_profile")' in source
    assert 'EnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE"' in source


def test_params_file_lists_every_parameter_with_its_default():
    params = yaml.safe_load((REPO / "config" / "perception.yaml").read_text())["perception_node"]["ros__parameters"]
    assert set(params) == set(PARAMETERS)
    for name, (default, _) in PARAMETERS.items():
        assert params[name] == default, name


def test_rviz_config_shows_the_node_outputs():
    rviz = yaml.safe_load((REPO / "config" / "perception.rviz").read_text())
    displays = rviz["Visualization Manager"]["Displays"]
    topics = {d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}
    namespace = output_namespace(PARAMETERS["camera_topics"][0][0], PARAMETERS["output_namespace"][0])
    assert {f"{namespace}/{k}" for k in ("overlay", "uncertainty_color", "mask")} <= topics
    assert topics <= {f"{namespace}/{k}" for k in OUTPUT_KINDS}
    assert all(d["Topic"]["Reliability Policy"] == "Reliable" for d in displays)


def _image_topics(text: str) -> dict[str, str]:
    displays = yaml.safe_load(text)["Visualization Manager"]["Displays"]
    return {d["Name"]: d["Topic"]["Value"] for d in displays if d["Class"] == "rviz_default_plugins/Image"}


def test_rviz_config_follows_the_first_camera():
    """The README's camera_topics:="['/front/image_raw']" rviz:=true shows /front/segmentation/*, not the
    shipped /camera/... (empty panels); everything but the topics is the shipped layout."""
    camera = first_camera("['/front/image_raw', '/rear/image_raw']")
    assert camera == "/front/image_raw"
    shipped = (REPO / "config" / "perception.rviz").read_text()
    rendered = render_rviz_config(camera)
    topics = _image_topics(rendered)
    assert set(topics.values()) == {f"/front/segmentation/{k}" for k in ("overlay", "uncertainty_color", "mask", "labels_color")}
    assert topics.keys() == _image_topics(shipped).keys()
    layouts = [yaml.safe_load(rendered), yaml.safe_load(shipped)]
    for layout in layouts:
        for d in layout["Visualization Manager"]["Displays"]:
            d["Topic"]["Value"] = None
    assert layouts[0] == layouts[1]
    assert set(_image_topics(render_rviz_config("/robot/left/image_raw", "seg")).values()) >= {"/robot/left/seg/overlay"}


def test_first_camera_is_read_as_the_node_reads_it():
    assert first_camera("/front/image_raw") == "/front/image_raw"
    assert first_camera("[front/image_raw/compressed]") == "/front/image_raw"  # relative, compressed transport
    for bad in ("[]", "[1]", "''"):
        with pytest.raises(ValueError, match="camera_topics"):
            first_camera(bad)


def test_rviz_config_uses_the_params_files_output_namespace(tmp_path):
    assert DEFAULT_OUTPUT_NAMESPACE == PARAMETERS["output_namespace"][0]
    assert params_file_output_namespace(str(REPO / "config" / "perception.yaml")) == DEFAULT_OUTPUT_NAMESPACE
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters: {output_namespace: everyone}\n"
                      "/perception_node:\n  ros__parameters: {output_namespace: seg}\n")
    assert params_file_output_namespace(str(params)) == "seg"
    params.write_text("/**:\n  ros__parameters: {output_namespace: everyone}\nother_node:\n  ros__parameters: {}\n")
    assert params_file_output_namespace(str(params)) == "everyone"
    path = write_rviz_config("/front/image_raw", "seg")
    try:
        assert "/front/seg/overlay" in _image_topics(path.read_text()).values()
    finally:
        path.unlink()


def test_launch_starts_rviz_only_where_it_is_installed():
    """rviz:=true without rviz2 used to fail the launch and orphan the node: the launch checks first and says so.
    In this environment (pip wheels, no ROS install) rviz2 is missing."""
    assert not rviz_installed()
    assert "rviz2 is not installed" in RVIZ_MISSING and "\n" not in RVIZ_MISSING
    tree = ast.parse(LAUNCH.read_text())
    rviz = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_rviz")
    calls = [ast.unparse(n.func) for n in ast.walk(rviz) if isinstance(n, ast.Call)]
    assert calls.index("rviz_installed") < calls.index("Node") and "LogInfo" in calls
    assert any(ast.unparse(c.func) == "OpaqueFunction" for c in _launch_calls_any())


def _launch_calls_any() -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(LAUNCH.read_text())) if isinstance(n, ast.Call)]

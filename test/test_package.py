"""Packaging and architecture rules: package.xml / setup.py agree, files exist, imports flow one way."""
import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import uncertain_seg_ros

from conftest import REPO

ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "builtin_interfaces", "launch", "launch_ros", "rosidl_runtime_py")


def _setup_namespace() -> dict:
    """setup.py's helpers without running setup()."""
    source = (REPO / "setup.py").read_text().split("\nsetup(")[0]
    namespace: dict = {"__file__": str(REPO / "setup.py")}
    exec(compile(source, "setup.py", "exec"), namespace)
    return namespace


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_package_xml_is_format3_ament_python_with_runtime_dependencies():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "uncertain_seg_ros"
    assert root.findtext("version") == uncertain_seg_ros.__version__
    assert root.find("export/build_type").text == "ament_python"
    exec_deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "python3-numpy", "python3-opencv"} <= exec_deps


# Import names that differ from the name of the requirement that installs them.
REQUIREMENT_OF_MODULE = {"cv2": "opencv-python-headless", "yaml": "pyyaml", "tensorrt": "torch-tensorrt",
                         "backports": "backports.zstd", "compression": "backports.zstd"}  # compression.zstd: Python >= 3.14


def _code_imports() -> set[str]:
    """Top-level modules the package's code imports (node, core, training, launch file), stdlib and own excluded."""
    files = [*(REPO / "uncertain_seg_ros").rglob("*.py"), *(REPO / "training").rglob("*.py"), *(REPO / "launch").glob("*.py")]
    tops = {name.split(".")[0] for path in files for name in _imports(path)}
    return {t for t in tops if t not in sys.stdlib_module_names and t not in ("uncertain_seg_ros", "uncertain_seg_training")}


def _setup_requirements() -> set[str]:
    """Names of every requirement in setup.py (install_requires and every extra), normalised."""
    tree = ast.parse((REPO / "setup.py").read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    names = {re.match(r"[A-Za-z0-9_.-]+", s).group(0) for s in strings if re.fullmatch(r"[A-Za-z0-9_.-]+(\[\w,]+\])?([<>=!~].*)?", s)}
    return {n.lower().replace("_", "-") for n in names}


def test_package_xml_declares_every_ros_package_the_code_imports():
    """rosdep installs what package.xml names: an imported module that is no pip requirement of setup.py is a ROS
    package and must be an exec_depend (ament_index_python and rcl_interfaces were missing once)."""
    root = ET.parse(REPO / "package.xml").getroot()
    exec_deps = {e.text for e in root.findall("exec_depend")}
    requirements = _setup_requirements()
    undeclared = sorted(m for m in _code_imports()
                        if m not in exec_deps and REQUIREMENT_OF_MODULE.get(m, m).replace("_", "-") not in requirements)
    assert not undeclared, f"imported but declared neither in package.xml nor in setup.py: {undeclared}"
    assert {"ament_index_python", "rcl_interfaces", "launch", "launch_ros"} <= exec_deps


def test_package_xml_names_no_key_that_rosdep_lacks():
    """ament_python is a build type, not a rosdep key, and the *-pip keys below have no rule in ros/rosdistro
    (checked against its rosdep/base.yaml and python.yaml): rosdep install fails on any of them."""
    keys = {e.text for e in ET.parse(REPO / "package.xml").getroot() if e.tag.endswith("depend")}
    assert not keys & {"ament_python", "python3-torch-pip", "python3-safetensors-pip", "python3-safetensors"}


def test_setup_py_reads_its_readme_beside_itself(tmp_path):
    """colcon build --symlink-install runs a symlink to setup.py from its build folder, where README.md is not."""
    (tmp_path / "setup.py").symlink_to(REPO / "setup.py")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "uncertain_seg_ros"


def test_setup_version_and_ament_marker():
    assert f'version="{uncertain_seg_ros.__version__}"' in (REPO / "setup.py").read_text()
    assert (REPO / "resource" / "uncertain_seg_ros").is_file()
    assert "script_dir=$base/lib/uncertain_seg_ros" in (REPO / "setup.cfg").read_text()


def test_every_data_file_exists():
    files = _setup_namespace()["_data_files"]()
    destinations = {dest for dest, _ in files}
    assert "share/ament_index/resource_index/packages" in destinations
    assert {"share/uncertain_seg_ros/models/camvid_demo", "share/uncertain_seg_ros/models/camvid_day"} <= destinations
    for _, sources in files:
        for src in sources:
            assert (REPO / src).is_file(), src


def test_console_script_is_installed():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("uncertain-seg") == "uncertain_seg_training.cli:main"


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "uncertain_seg_ros").rglob("*.py") if "ros" not in p.relative_to(REPO / "uncertain_seg_ros").parts[:-1]), ids=lambda p: str(p.relative_to(REPO)))
def test_core_imports_no_ros_and_no_training(path):
    """The core is usable without ROS and never reaches up into training or the node."""
    for name in _imports(path):
        assert name.split(".")[0] not in ROS_MODULES, f"{path.name} imports {name}"
        assert not name.startswith(("uncertain_seg_training", "uncertain_seg_ros.ros")), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((REPO / "training").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_training_never_imports_the_node(path):
    for name in _imports(path):
        assert not name.startswith("uncertain_seg_ros.ros"), f"{path.name} imports {name}"
        assert name.split(".")[0] not in ROS_MODULES, f"{path.name} imports {name}"

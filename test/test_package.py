"""Packaging and architecture rules: package.xml / setup.py agree, files exist, imports flow one way.

The floors, each importing only those below it: core (``uncertain_seg_ros`` minus ``ros/``, no ROS)
<- node (``uncertain_seg_ros.ros``) and training (``uncertain_seg_training``) <- benchmarks
(``uncertain_seg_benchmarks``). Imports are read from the source (every ``import``, relative ones
resolved, those inside functions too), so a lazy import cannot slip past."""
import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
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


def _project_modules() -> dict[str, Path]:
    """Dotted name -> source file of every module the project installs (setup.py's package folders)."""
    folders = {"uncertain_seg_ros": "uncertain_seg_ros", **_setup_namespace()["PACKAGE_DIRS"]}
    modules = {}
    for package, folder in folders.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _project_modules()


def _imports(path: Path, package: Sequence[str] = ()) -> set[str]:
    """Every module the file imports, as absolute names, relative imports resolved against ``package``:
    ``from pkg import name`` is ``pkg.name`` where that is a project module, else ``pkg``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])])
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return names


def _resolved_imports(module: str) -> set[str]:
    """What a project module imports (see :func:`_imports`)."""
    path = MODULES[module]
    return _imports(path, module.split(".") if path.name == "__init__.py" else module.split(".")[:-1])


def _floor(module: str) -> str | None:
    """Which floor a module belongs to; None outside the project."""
    if module == "uncertain_seg_ros.ros" or module.startswith("uncertain_seg_ros.ros."):
        return "node"
    for floor, package in (("core", "uncertain_seg_ros"), ("training", "uncertain_seg_training"),
                           ("benchmarks", "uncertain_seg_benchmarks")):
        if module == package or module.startswith(package + "."):
            return floor
    return None


# What each floor may import. The node and training stand side by side on the core; neither imports
# the other (the CLI reaches the node's and the benchmarks' commands through an entry point).
ALLOWED = {"core": {"core"}, "node": {"core", "node"}, "training": {"core", "training"},
           "benchmarks": {"core", "node", "training", "benchmarks"}}
NO_ROS = ("core", "training")


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
    """Top-level modules the installed code (every floor) and the launch file import, stdlib and own excluded."""
    names = {n for m in MODULES for n in _resolved_imports(m)} | {n for p in (REPO / "launch").glob("*.py") for n in _imports(p)}
    tops = {name.split(".")[0] for name in names}
    return {t for t in tops if t not in sys.stdlib_module_names and _floor(t) is None}


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


def test_every_floor_is_installed():
    """setup.py installs each floor from its folder: the import rules below cover what users get."""
    packages = _setup_namespace()["_packages"]()
    assert {"uncertain_seg_ros", "uncertain_seg_ros.ros", "uncertain_seg_training", "uncertain_seg_benchmarks"} <= set(packages)
    assert {_floor(m) for m in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: str(MODULES[m].relative_to(REPO)))
def test_imports_run_down_the_floors(module):
    """Core imports only core (and no ROS); node and training only themselves and the core (training
    no ROS); benchmarks anything."""
    floor = _floor(module)
    for name in _resolved_imports(module):
        target = _floor(name)
        if target is None:
            assert not (floor in NO_ROS and name.split(".")[0] in ROS_MODULES), f"{module} ({floor}) imports {name}"
        else:
            assert target in ALLOWED[floor], f"{module} ({floor}) imports {name} ({target})"


def test_no_import_cycle():
    """No module reaches itself through the project's imports (e.g. a backend base that imports the
    backends built on it). A package's ``__init__`` counts as a module of its own."""
    graph = {m: sorted(n for n in _resolved_imports(m) if n in MODULES and n != m) for m in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)


def test_inference_backends_import_the_interface_not_the_factory():
    """One way through inference/: the factory builds the concrete backends, which see only the interface."""
    backends = [m for m in MODULES if m.startswith("uncertain_seg_ros.inference.") and m.endswith("_backend")]
    assert len(backends) >= 3
    for module in backends:
        imports = _resolved_imports(module)
        assert "uncertain_seg_ros.inference.backend" in imports, module
        assert not imports & {"uncertain_seg_ros.inference.factory", "uncertain_seg_ros.inference"}, module
    assert not any(n.endswith("_backend") for n in _resolved_imports("uncertain_seg_ros.inference.backend"))

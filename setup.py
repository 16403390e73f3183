"""uncertain_seg_ros: installable with pip (``pip install -e .``) and buildable with colcon (ament_python)."""
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "uncertain_seg_ros"
# Beside this file, not in the working directory: colcon runs setup.py from its build folder.
README = Path(__file__).resolve().parent / "README.md"
# ROS 2 Jazzy's Python packages as wheels, for machines without a ROS install (a sourced ROS 2
# workspace provides them otherwise). The message packages are pinned to Jazzy's 5.3.x.
ROS_WHEELS = ["ros-jazzy-rclpy[fastrtps]", "ros-sensor-msgs==5.3.6", "ros-std-msgs==5.3.6", "ros-diagnostic-msgs==5.3.6"]
ONNX = ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.3"]  # onnxscript: the TorchDynamo ONNX exporter
# nncf: the openvino backend's int8 weights. Floors: the versions the backend was tested with.
OPENVINO = ["openvino>=2026.4", "nncf>=3.4"]
# The floors installed from folders of their own: training imports the core; benchmarks import all.
PACKAGE_DIRS = {"uncertain_seg_training": "training", "uncertain_seg_benchmarks": "benchmarks"}


def _packages() -> list[str]:
    """The core's packages, and those of each floor installed from a folder of its own."""
    packages = find_packages(include=[PACKAGE, f"{PACKAGE}.*"])
    for name, folder in PACKAGE_DIRS.items():
        packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return packages


def _data_files() -> list[tuple[str, list[str]]]:
    """Files colcon installs into share/: the ament marker, package.xml, launch, config and bundles."""
    files = [
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", sorted(glob("config/*"))),
    ]
    for checksums in sorted(glob("models/*/checksums.sha256")):
        name = checksums.split("/")[1]
        files.append((f"share/{PACKAGE}/models/{name}", sorted(glob(f"models/{name}/*"))))
    files.append((f"share/{PACKAGE}/samples/camvid_dusk", sorted(glob("samples/camvid_dusk/*.*"))))
    files.append((f"share/{PACKAGE}/samples/camvid_dusk_bag", sorted(glob("samples/camvid_dusk_bag/*"))))
    for sub in ("images", "labels"):
        files.append((f"share/{PACKAGE}/samples/camvid_dusk/{sub}", sorted(glob(f"samples/camvid_dusk/{sub}/*"))))
    return [(dest, srcs) for dest, srcs in files if srcs]


setup(
    name=PACKAGE,
    version="0.1.0",
    description="DINOv2 semantic segmentation with per-pixel uncertainty for ROS 2, plus offline adaptation and calibration",
    long_description=README.read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    data_files=_data_files(),
    install_requires=[
        "numpy>=1.23",
        "torch>=2.1",
        "safetensors>=0.4",
        "pyyaml>=6",
        "opencv-python-headless>=4.7",
        "tqdm>=4.60",
        "rosbags>=0.10",
        # MCAP salvage (uncertain_seg_ros.mcap_records) decompresses chunks itself; rosbags needs both too.
        "lz4>=4",
        "backports.zstd>=1.0; python_version<'3.14'",
    ],
    extras_require={
        "ros": ROS_WHEELS,
        "train": ["matplotlib>=3.6"],
        "onnx": ONNX,
        "openvino": OPENVINO,
        "tensorrt": ["torch-tensorrt>=2.9"],
        "test": ["pytest>=7", "scikit-learn>=1.2", "matplotlib>=3.6", *ROS_WHEELS, *ONNX, *OPENVINO],
    },
    entry_points={
        "console_scripts": [
            "uncertain-seg = uncertain_seg_training.cli:main",
            "perception_node = uncertain_seg_ros.ros.perception_node:main",
        ],
        "uncertain_seg_ros.commands": [
            "ros = uncertain_seg_ros.ros.commands:register",
            "benchmark = uncertain_seg_benchmarks.commands:register",
        ],
    },
    zip_safe=True,
)

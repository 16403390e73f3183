"""Where the package's shipped files (model bundles, sample data) live once installed.

Three installs are supported: a source checkout / ``pip install -e .`` (files beside the code),
``pip install .`` (setup.py data_files under ``<prefix>/share/uncertain_seg_ros``) and a colcon
build (the ament index's share directory).
"""
import os
import sys
from pathlib import Path

PACKAGE = "uncertain_seg_ros"


def share_directories() -> list[Path]:
    """Candidate share folders, most specific first."""
    candidates = [Path(__file__).resolve().parents[1]]
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, OSError):  # not built with colcon, or no sourced workspace
            pass
    except ImportError:
        pass
    candidates += [Path(sys.prefix) / "share" / PACKAGE, Path(sys.base_prefix) / "share" / PACKAGE]
    return [c for c in candidates if any((c / d).is_dir() for d in ("models", "samples", "config"))]


def shipped_bundles() -> dict[str, Path]:
    """Name -> folder of every model bundle shipped with the package."""
    found: dict[str, Path] = {}
    for share in share_directories():
        for sums in sorted((share / "models").glob("*/checksums.sha256")):
            found.setdefault(sums.parent.name, sums.parent)
    return found


def resolve_bundle(spec: str | os.PathLike) -> Path:
    """A bundle given as a folder path, or by the name of a bundle shipped with the package."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    bundles = shipped_bundles()
    if str(spec) in bundles:
        return bundles[str(spec)]
    raise FileNotFoundError(
        f"model bundle {spec!r} is neither a folder nor a shipped bundle (shipped: {', '.join(bundles) or 'none'})"
    )


def sample_path(name: str) -> Path:
    """A shipped sample (e.g. ``camvid_dusk``) by name."""
    for share in share_directories():
        if (share / "samples" / name).exists():
            return share / "samples" / name
    raise FileNotFoundError(f"sample {name!r} is not installed with {PACKAGE}")


def config_path(name: str) -> Path:
    """A shipped configuration file (e.g. ``perception.yaml``) by name."""
    for share in share_directories():
        if (share / "config" / name).is_file():
            return share / "config" / name
    raise FileNotFoundError(f"configuration {name!r} is not installed with {PACKAGE}")

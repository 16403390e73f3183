"""Fast DDS transport settings for camera-sized images between processes on one host.

Fast DDS's default shared-memory segment (512 KiB per participant) is smaller than one 480x360 rgb8
image; a frame's burst of outputs overflows it, samples are dropped, and reliable readers wait for
the writer's next heartbeat (3 s) to get them resent. The shipped participant profile
``config/fastdds_large_images.xml`` gives the shared-memory transport a 64 MiB segment. Fast DDS
reads it from ``FASTRTPS_DEFAULT_PROFILES_FILE`` (2.x, ROS Jazzy) or ``FASTDDS_DEFAULT_PROFILES_FILE``
(3.x, ROS Kilted) when a participant is created, so it must be in the environment of every process
before rclpy starts.
"""
import os
from collections.abc import Mapping
from pathlib import Path

from ..resources import config_path

PROFILE_NAME = "fastdds_large_images.xml"
PROFILE_VARIABLES = ("FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE")
USER_TRANSPORT_VARIABLES = (*PROFILE_VARIABLES, "FASTDDS_BUILTIN_TRANSPORTS")


def large_image_profile() -> Path:
    """The shipped Fast DDS profile for large images."""
    return config_path(PROFILE_NAME)


def transport_environment(profile: str | os.PathLike | None, env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables that make Fast DDS load ``profile``; empty when ``profile`` is None or the
    environment already chooses Fast DDS transports (a profile file or builtin transports)."""
    if profile is None or any(env.get(v) for v in USER_TRANSPORT_VARIABLES):
        return {}
    path = Path(profile).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"Fast DDS profile {path} does not exist")
    return {var: str(path) for var in PROFILE_VARIABLES}


def use_transport_profile(profile: str | os.PathLike | None) -> dict[str, str]:
    """Apply :func:`transport_environment` to this process (and so its children); returns what was set.
    Call before rclpy creates a context."""
    added = transport_environment(profile)
    os.environ.update(added)
    return added


def transport_settings(env: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """The transport variables in effect, for recording next to measurements."""
    return {var: env.get(var) for var in USER_TRANSPORT_VARIABLES}

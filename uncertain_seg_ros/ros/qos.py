"""QoS presets by name, as parameters and launch arguments spell them.

rclpy is imported inside :func:`qos_profile` so that the preset names can be offered by command-line
tools on machines without ROS.
"""
QOS_PRESETS = ("sensor_data", "reliable", "best_effort", "transient_local", "system_default")


def qos_profile(preset: str, depth: int):
    """A ``rclpy.qos.QoSProfile`` by name.

    ``sensor_data`` (best effort, the camera-driver default), ``reliable``, ``best_effort``,
    ``transient_local`` (reliable, and a subscriber that matches late still receives the last
    ``depth`` samples: deterministic bag playback) or ``system_default``.
    """
    from rclpy.qos import (
        DurabilityPolicy,
        HistoryPolicy,
        QoSProfile,
        ReliabilityPolicy,
        qos_profile_sensor_data,
        qos_profile_system_default,
    )

    if preset == "sensor_data":
        base = qos_profile_sensor_data
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=base.reliability, durability=base.durability)
    if preset == "system_default":
        return qos_profile_system_default
    if preset not in ("reliable", "best_effort", "transient_local"):
        raise ValueError(f"unknown QoS preset {preset!r}; choose one of {QOS_PRESETS}")
    reliability = ReliabilityPolicy.BEST_EFFORT if preset == "best_effort" else ReliabilityPolicy.RELIABLE
    durability = DurabilityPolicy.TRANSIENT_LOCAL if preset == "transient_local" else DurabilityPolicy.VOLATILE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=durability)

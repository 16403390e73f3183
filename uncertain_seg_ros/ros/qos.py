"""QoS presets by name, as parameters and launch arguments spell them."""
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
    qos_profile_system_default,
)

QOS_PRESETS = ("sensor_data", "reliable", "best_effort", "system_default")


def qos_profile(preset: str, depth: int) -> QoSProfile:
    """``sensor_data`` (best effort, the camera-driver default), ``reliable``, ``best_effort`` or ``system_default``."""
    if preset == "sensor_data":
        base = qos_profile_sensor_data
        return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=base.reliability, durability=base.durability)
    if preset == "system_default":
        return qos_profile_system_default
    reliability = ReliabilityPolicy.RELIABLE if preset == "reliable" else ReliabilityPolicy.BEST_EFFORT
    if preset not in ("reliable", "best_effort"):
        raise ValueError(f"unknown QoS preset {preset!r}; choose one of {QOS_PRESETS}")
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=reliability, durability=DurabilityPolicy.VOLATILE)

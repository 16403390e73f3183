"""One diagnostic_msgs/DiagnosticStatus per camera from its stream statistics."""
import math

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from .stream_stats import StatsSnapshot


def camera_status(
    topic: str, snap: StatsSnapshot, bad_in_period: int, alarm: float, info: dict[str, str]
) -> DiagnosticStatus:
    """OK, or WARN when the uncertain-pixel fraction exceeds ``alarm``, frames were bad, or nothing arrives."""
    level, message = DiagnosticStatus.OK, "ok"
    if snap.received == 0:
        level, message = DiagnosticStatus.WARN, "no frames received yet (check topic name, QoS and transport)"
    elif not math.isnan(snap.uncertain_fraction) and snap.uncertain_fraction > alarm:
        level, message = DiagnosticStatus.WARN, f"uncertain pixels {snap.uncertain_fraction:.1%} > alarm {alarm:.1%}"
    elif bad_in_period:
        level, message = DiagnosticStatus.WARN, f"{bad_in_period} bad frames skipped"
    values = {
        "input_rate_hz": f"{snap.input_rate_hz:.2f}",
        "output_rate_hz": f"{snap.output_rate_hz:.2f}",
        "latency_p50_ms": f"{snap.latency_p50_ms:.1f}",
        "latency_p95_ms": f"{snap.latency_p95_ms:.1f}",
        "frames_received": str(snap.received),
        "frames_processed": str(snap.processed),
        "frames_dropped": str(snap.dropped),
        "frames_rate_limited": str(snap.rate_limited),
        "frames_bad": str(snap.bad),
        "uncertain_fraction": f"{snap.uncertain_fraction:.4f}",
        "batch_size_mean": f"{snap.batch_size_mean:.2f}",
        "uncertainty_alarm": f"{alarm:.4f}",
        **info,
    }
    return DiagnosticStatus(
        level=level,
        name=f"uncertain_seg_ros: {topic}",
        message=message,
        hardware_id=topic,
        values=[KeyValue(key=k, value=v) for k, v in values.items()],
    )

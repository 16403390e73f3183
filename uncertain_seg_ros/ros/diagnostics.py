"""One diagnostic_msgs/DiagnosticStatus per camera from its stream statistics."""
import math
from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from .stream_stats import StatsSnapshot


@dataclass(frozen=True)
class PeriodCounts:
    """What happened since the previous report: the conditions that clear once they stop happening."""

    bad: int = 0
    failed: int = 0
    nonfinite: int = 0


def conditions(snap: StatsSnapshot, period: PeriodCounts, alarm: float, stall_timeout_s: float) -> list[tuple[int, str]]:
    """Every active condition as (level, text), errors first; empty when all is well.

    ERROR: frames wait for an outcome longer than ``stall_timeout_s`` (0: not checked), inference
    failed, or the network gave non-finite outputs (those pixels are published as uncertain).
    WARN: nothing received yet, uncertain pixels above ``alarm``, bad frames skipped.
    """
    found = []
    if stall_timeout_s > 0 and snap.waiting_s > stall_timeout_s:
        found.append((DiagnosticStatus.ERROR, f"stalled: a frame has waited {snap.waiting_s:.1f} s for inference "
                                              f"(stall_timeout {stall_timeout_s:g} s)"))
    if period.failed:
        found.append((DiagnosticStatus.ERROR, f"inference failed on {period.failed} frames: {snap.last_error}"))
    if period.nonfinite:
        found.append((DiagnosticStatus.ERROR, f"network outputs not finite on {period.nonfinite} frames "
                                              "(those pixels published as uncertain)"))
    if snap.received == 0:
        found.append((DiagnosticStatus.WARN, "no frames received yet (check topic name, QoS and transport)"))
    if not math.isnan(snap.uncertain_fraction) and snap.uncertain_fraction > alarm:
        found.append((DiagnosticStatus.WARN, f"uncertain pixels {snap.uncertain_fraction:.1%} > alarm {alarm:.1%}"))
    if period.bad:
        found.append((DiagnosticStatus.WARN, f"{period.bad} bad frames skipped"))
    return found


def camera_status(
    topic: str, snap: StatsSnapshot, period: PeriodCounts, alarm: float, stall_timeout_s: float, info: dict[str, str]
) -> DiagnosticStatus:
    """The highest level among the active :func:`conditions`, and all of them in the message ("ok" if none)."""
    found = conditions(snap, period, alarm, stall_timeout_s)
    level = max((lv for lv, _ in found), default=DiagnosticStatus.OK)
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
        "frames_failed": str(snap.failed),
        "frames_nonfinite": str(snap.nonfinite),
        "nonfinite_pixels": str(snap.nonfinite_pixels),
        "waiting_s": f"{snap.waiting_s:.1f}",
        "uncertain_fraction": f"{snap.uncertain_fraction:.4f}",
        "batch_size_mean": f"{snap.batch_size_mean:.2f}",
        "uncertainty_alarm": f"{alarm:.4f}",
        **info,
    }
    return DiagnosticStatus(
        level=level,
        name=f"uncertain_seg_ros: {topic}",
        message="; ".join(text for _, text in found) or "ok",
        hardware_id=topic,
        values=[KeyValue(key=k, value=v) for k, v in values.items()],
    )

"""The diagnostics' conditions from stream statistics: every active one reported, at its level.

Times are passed explicitly (``now``), so the stall logic is checked without waiting."""
from diagnostic_msgs.msg import DiagnosticStatus

from uncertain_seg_ros.ros.diagnostics import PeriodCounts, camera_status
from uncertain_seg_ros.ros.stream_stats import StreamStats


def _status(stats: StreamStats, now: float, period: PeriodCounts = PeriodCounts(), alarm: float = 0.3, stall: float = 10.0):
    return camera_status("/cam", stats.snapshot(now), period, alarm, stall, {})


def test_stall_is_a_frame_waiting_without_outcome():
    """A frame accepted at t=0 and never settled is a stall after stall_timeout; a settled one is not,
    and a frame queued while the previous one was in flight waits from that one's outcome on."""
    stats = StreamStats()
    stats.arrived(0.0)
    stats.accepted(0.0)
    assert _status(stats, 9.0).level == DiagnosticStatus.OK
    stalled = _status(stats, 10.5)
    assert stalled.level == DiagnosticStatus.ERROR and stalled.message.startswith("stalled: a frame has waited 10.5 s")
    stats.accepted(5.0)  # the next frame, queued while the first is in flight
    stats.settled(11.0, still_pending=True)
    assert _status(stats, 20.0).level == DiagnosticStatus.OK
    assert _status(stats, 21.5).level == DiagnosticStatus.ERROR
    stats.settled(22.0, still_pending=False)
    assert _status(stats, 100.0).level == DiagnosticStatus.OK
    assert _status(stats, 100.0, stall=0.0).level == DiagnosticStatus.OK


def test_every_active_condition_is_in_the_message():
    """Failure, non-finite outputs, the alarm and bad frames together: ERROR, all four named."""
    stats = StreamStats()
    stats.arrived(0.0)
    stats.inference_failed("RuntimeError: out of memory")
    stats.published(1.0, 0.1, 0.9, nonfinite_pixels=12)
    status = _status(stats, 1.0, PeriodCounts(bad=2, failed=1, nonfinite=1))
    assert status.level == DiagnosticStatus.ERROR
    assert status.message == ("inference failed on 1 frames: RuntimeError: out of memory; network outputs not finite "
                              "on 1 frames (those pixels published as uncertain); uncertain pixels 90.0% > alarm 30.0%; "
                              "2 bad frames skipped")
    values = {kv.key: kv.value for kv in status.values}
    assert values["frames_failed"] == "1" and values["frames_nonfinite"] == "1" and values["nonfinite_pixels"] == "12"
    warn = _status(stats, 1.0, PeriodCounts(bad=3))
    assert warn.level == DiagnosticStatus.WARN and warn.message == "uncertain pixels 90.0% > alarm 30.0%; 3 bad frames skipped"

"""Per-camera counters, rates and latency percentiles over a sliding window, for /diagnostics."""
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class StatsSnapshot:
    input_rate_hz: float
    output_rate_hz: float
    latency_p50_ms: float
    latency_p95_ms: float
    received: int
    processed: int
    dropped: int
    rate_limited: int
    bad: int
    uncertain_fraction: float
    batch_size_mean: float
    failed: int = 0
    """Frames whose inference raised."""
    nonfinite: int = 0
    """Frames published with pixels whose network outputs were not finite (marked uncertain)."""
    nonfinite_pixels: int = 0
    last_error: str = ""
    waiting_s: float = 0.0
    """How long a frame accepted for inference has gone without an outcome (0: none waiting)."""


class StreamStats:
    """Thread-safe: callbacks record arrivals, the inference worker records results.

    Every frame accepted for inference ends in one outcome (published, bad, failed, or skipped for
    want of subscribers), reported with :meth:`settled`; ``waiting_s`` of a snapshot is how long
    the oldest accepted frame has waited for one, which is how a stalled pipeline shows.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._arrivals: deque[float] = deque()
        self._outputs: deque[tuple[float, float, int]] = deque()
        self.received = self.processed = self.dropped = self.rate_limited = self.bad = 0
        self.failed = self.nonfinite = self.nonfinite_pixels = 0
        self.last_error = ""
        self.uncertain_fraction = float("nan")
        self._waiting_since: float | None = None

    def _trim(self, now: float) -> None:
        while self._arrivals and now - self._arrivals[0] > self.window_s:
            self._arrivals.popleft()
        while self._outputs and now - self._outputs[0][0] > self.window_s:
            self._outputs.popleft()

    def arrived(self, now: float) -> None:
        with self._lock:
            self.received += 1
            self._arrivals.append(now)
            self._trim(now)

    def accepted(self, now: float) -> None:
        """A frame was queued for inference; it waits until the next :meth:`settled`."""
        with self._lock:
            if self._waiting_since is None:
                self._waiting_since = now

    def settled(self, now: float, still_pending: bool) -> None:
        """A taken frame reached its outcome; ``still_pending``: another frame is already queued (it waits from now)."""
        with self._lock:
            self._waiting_since = now if still_pending else None

    def count(self, what: str) -> None:
        """Increment ``dropped``, ``rate_limited`` or ``bad``."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def inference_failed(self, error: str) -> None:
        with self._lock:
            self.failed += 1
            self.last_error = error

    def published(self, now: float, latency_s: float, uncertain_fraction: float, batch_size: int = 1,
                  nonfinite_pixels: int = 0) -> None:
        """A frame's outputs went out ``latency_s`` after it arrived; ``batch_size``: frames processed with it
        (one network call when they share a size); ``nonfinite_pixels``: pixels published as uncertain because
        the network's outputs there were not finite."""
        with self._lock:
            self.processed += 1
            self.uncertain_fraction = uncertain_fraction
            if nonfinite_pixels:
                self.nonfinite += 1
                self.nonfinite_pixels += nonfinite_pixels
            self._outputs.append((now, latency_s, batch_size))
            self._trim(now)

    def snapshot(self, now: float | None = None) -> StatsSnapshot:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            span = self.window_s
            lat = np.array([o[1] for o in self._outputs]) * 1000.0
            batch = [o[2] for o in self._outputs]
            return StatsSnapshot(
                input_rate_hz=len(self._arrivals) / span,
                output_rate_hz=len(self._outputs) / span,
                latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else float("nan"),
                latency_p95_ms=float(np.percentile(lat, 95)) if lat.size else float("nan"),
                received=self.received,
                processed=self.processed,
                dropped=self.dropped,
                rate_limited=self.rate_limited,
                bad=self.bad,
                uncertain_fraction=self.uncertain_fraction,
                batch_size_mean=float(np.mean(batch)) if batch else float("nan"),
                failed=self.failed,
                nonfinite=self.nonfinite,
                nonfinite_pixels=self.nonfinite_pixels,
                last_error=self.last_error,
                waiting_s=0.0 if self._waiting_since is None else now - self._waiting_since,
            )

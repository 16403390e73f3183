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


class StreamStats:
    """Thread-safe: callbacks record arrivals, the inference worker records results."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._arrivals: deque[float] = deque()
        self._outputs: deque[tuple[float, float, int]] = deque()
        self.received = self.processed = self.dropped = self.rate_limited = self.bad = 0
        self.uncertain_fraction = float("nan")

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

    def count(self, what: str) -> None:
        """Increment ``dropped``, ``rate_limited`` or ``bad``."""
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def published(self, now: float, latency_s: float, uncertain_fraction: float, batch_size: int = 1) -> None:
        """A frame's outputs went out ``latency_s`` after it arrived; ``batch_size``: frames processed with it
        (one network call when they share a size)."""
        with self._lock:
            self.processed += 1
            self.uncertain_fraction = uncertain_fraction
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
            )

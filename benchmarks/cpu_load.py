"""A competing CPU load for the benchmark: other processes that keep a chosen number of cores busy.

On a robot the perception node shares the CPU with other nodes, and a thread pool that spins or
waits at barriers can collapse when a core it counts on is taken (eager PyTorch with 2 threads: 288
ms per demo frame while another process kept about one core busy, 73 ms with one thread).
:class:`CompetingLoad` starts ``cores`` processes, each a pure-Python busy loop (one core each,
ordinary priority, no shared state with the benchmark), before a measurement and stops them after
it. Each process also stops itself after ``max_seconds``, so a benchmark that is killed leaves no
load behind for longer than that. What the processes really got (CPU seconds over wall seconds) is
recorded, since on a small machine they compete with the node as much as it competes with them.

``python -m uncertain_seg_benchmarks.cpu_load SECONDS`` is one such process.
"""
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger(__name__)
DEFAULT_MAX_SECONDS = 1800.0


def spin(seconds: float) -> None:
    """Keep one core busy for ``seconds`` (wall clock), then return."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(10_000):
            pass


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CompetingLoad:
    """``cores`` busy-looping processes while the ``with`` block runs, each stopping itself after ``max_seconds``.

    After the block: ``busy_cores`` is the CPU the processes used divided by the block's wall time
    (None where it cannot be read), ``held`` whether every process was still running at the end
    (False: ``max_seconds`` ran out during the measurement), ``pids`` the processes it started.
    """

    def __init__(self, cores: int, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        if cores < 0:
            raise ValueError(f"cores must be >= 0, got {cores}")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        self.cores, self.max_seconds = cores, max_seconds
        self.procs: list[subprocess.Popen] = []
        self.busy_cores: float | None = None
        self.held = True

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __enter__(self) -> "CompetingLoad":
        cmd = [sys.executable, "-m", "uncertain_seg_benchmarks.cpu_load", str(self.max_seconds)]
        self.procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL) for _ in range(self.cores)]
        if self.procs:
            log.info("competing load: %d busy process(es) %s, at most %g s", self.cores, self.pids, self.max_seconds)
            time.sleep(0.2)  # past the interpreter's start-up, so the measurement begins under load
        self._start = time.monotonic()
        self._start_cpu = [_cpu_seconds(p.pid) for p in self.procs]
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._start
        self.held = all(p.poll() is None for p in self.procs)
        used = [_cpu_seconds(p.pid) for p in self.procs]
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.procs and self.held and None not in used + self._start_cpu and wall > 0:
            self.busy_cores = (sum(used) - sum(self._start_cpu)) / wall
        if not self.held:
            log.warning("competing load: a process reached its %g s limit before the measurement ended", self.max_seconds)


if __name__ == "__main__":
    spin(float(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MAX_SECONDS)

"""Nodes spun in a background thread by an executor that leaves the CPU to the other processes.

rclpy's (Jazzy) ``MultiThreadedExecutor`` re-submits the pending callbacks of a callback group that
is busy in a tight loop, so its spinning thread takes a core and the GIL while any callback runs.
In ``uncertain-seg demo`` the recorder's process held both cores of a 2-core machine that way while
the node it recorded waited for one: the demo's latency rose from about 120 ms to 4-8 s, and a
frame was lost in some runs (4 runs each way, AMD EPYC); 60 callbacks of 20 ms of Python work took
11.6 s instead of 1.2 s (test_background_spin). The tools' callbacks are short (a message stored, a
PNG written), so a ``SingleThreadedExecutor`` serves them and sleeps in between.
"""
import threading


class BackgroundSpin:
    """A ``SingleThreadedExecutor`` spinning ``nodes`` in a daemon thread until :meth:`stop`."""

    def __init__(self, *nodes, context=None) -> None:
        from rclpy.executors import SingleThreadedExecutor

        self.executor = SingleThreadedExecutor(context=context)
        for node in nodes:
            self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, name="ros-spin", daemon=True)
        self.thread.start()

    def add_node(self, node) -> None:
        self.executor.add_node(node)

    def remove_node(self, node) -> None:
        self.executor.remove_node(node)

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the spinning thread. Call before destroying the nodes and shutting rclpy down: rclpy shut
        down under a thread still in the executor's wait aborted the process now and then
        ("terminate called without an active exception", exit code 134)."""
        self.executor.shutdown()
        self.thread.join(timeout=timeout_s)

"""What native decoders print on the process's stderr during a call, caught so that the caller can log it.

libpng ("libpng error: IDAT: CRC error") and libjpeg ("Corrupt JPEG data: premature end of data
segment") write straight to file descriptor 2 from C, past Python's and ROS's loggers: a stream of
damaged frames becomes a stream of unthrottled stderr lines. :func:`captured_stderr` points fd 2
at a scratch file for the duration of a ``with`` block and hands the lines back.

Descriptor 2 belongs to the whole process, so another thread may write to it meanwhile. Lines that
start with ``[`` are written back to stderr unchanged: that is how ROS 2's console output
(``[WARN] [...]``) and OpenCV's own log lines begin, and neither decoder starts a line that way.
Captures are serialised by a lock; where fd 2 cannot be redirected (closed), the block runs as is.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

__all__ = ["captured_stderr"]

_lock = threading.Lock()
_sink = None


def _scratch():
    global _sink
    if _sink is None:
        _sink = tempfile.TemporaryFile()
    return _sink


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what is written to fd 2 inside the block; the yielded list is filled when it ends."""
    lines: list[str] = []
    with _lock:
        if sys.stderr is not None:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:
            yield lines
            return
        sink = _scratch()
        sink.seek(0)
        sink.truncate()
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
            passed_back = []
            for line in text.splitlines():
                if line.startswith("["):
                    passed_back.append(line)
                elif line.strip():
                    lines.append(line.strip())
            if passed_back:
                os.write(2, ("\n".join(passed_back) + "\n").encode())

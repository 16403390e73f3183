"""The readable rows of a damaged rosbag2 sqlite3 file, one row at a time.

A corrupt page makes every query that touches it fail with "database disk image is malformed",
and rosbags' reader touches them all (it counts the messages when it opens the bag). Asking for
each message by its id walks the table's B-tree to that row alone, so a broken page costs the
rows stored on it and nothing else. Nothing is written: the file is opened read-only.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SqliteSalvage", "SqliteSalvageReport"]


@dataclass
class SqliteSalvageReport:
    rows: int = 0
    unreadable: int = 0
    """Message ids whose row could not be read (on a damaged page)."""
    missing: int = 0
    """Ids in the table's id range without a row (deleted, or lost with a damaged interior page)."""
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"read {self.rows} messages row by row"
        if self.unreadable:
            text += f"; {self.unreadable} rows unreadable (damaged pages)"
        if self.missing:
            text += f"; {self.missing} ids without a row"
        return text


class SqliteSalvage:
    """Messages of a rosbag2 ``.db3`` file that can still be read, in id (= write) order.

    Raises sqlite3.DatabaseError at construction when even the topics table or the id range of
    the messages cannot be read: then nothing can be salvaged row by row.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        self.topics: dict[int, tuple[str, str]] = {
            int(tid): (str(name), str(msgtype)) for tid, name, msgtype in self._conn.execute("SELECT id, name, type FROM topics")}
        low, high = self._conn.execute("SELECT MIN(id), MAX(id) FROM messages").fetchone()
        self.id_range = (0, -1) if low is None else (int(low), int(high))
        self.report = SqliteSalvageReport()

    def messages(self) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, message type, timestamp ns, serialised message) of each readable row."""
        self.report = SqliteSalvageReport()
        low, high = self.id_range
        for message_id in range(low, high + 1):
            try:
                row = self._conn.execute("SELECT topic_id, timestamp, data FROM messages WHERE id = ?",
                                         (message_id,)).fetchone()
            except sqlite3.DatabaseError as err:
                self.report.unreadable += 1
                if len(self.report.problems) < 10:
                    self.report.problems.append(f"message id {message_id}: {err}")
                continue
            if row is None:
                self.report.missing += 1
                continue
            topic_id, timestamp, data = row
            if topic_id not in self.topics:
                self.report.unreadable += 1
                continue
            self.report.rows += 1
            yield (*self.topics[topic_id], int(timestamp), bytes(data))

    def close(self) -> None:
        self._conn.close()

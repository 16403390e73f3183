"""One bag as a stream of raw messages: read whole by rosbags, or salvaged where rosbags cannot.

rosbags reads intact bags (rosbag2 sqlite3 and mcap, ROS 1). A bag a recorder did not close
(truncated MCAP, no footer), or one damaged on disk (a corrupt record length, a chunk failing its
CRC, a corrupt sqlite3 page), makes it refuse the bag at open or raise halfway. Then the bag's
storage files are read by the salvage readers (:mod:`.mcap_records`, :mod:`.sqlite_salvage`),
which skip what is broken and say what was lost; messages already read before a failure are not
read twice. ROS 1 bags have no salvage reader: reading stops at the damage, with the reason.

:func:`bag_messages` is the one entry point; :func:`open_source` gives a bag's topics without
reading its messages.
"""
from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from .mcap_records import McapFormatError, McapSalvage
from .sqlite_salvage import SqliteSalvage

log = logging.getLogger(__name__)

RawMessage = tuple[str, str, int, bytes]
"""(topic, message type, receive time ns, serialised message)."""


class BagError(Exception):
    """Base class of the errors raised for bags that cannot be used as asked."""


class BagOpenError(BagError, OSError):
    """A bag path is missing or cannot be opened; the message names the path."""


@functools.cache
def typestore(ros1: bool) -> Typestore:
    """Message definitions used to write, and to read bags that carry none (old rosbag2 sqlite3)."""
    return get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_JAZZY)


def storage_files(path: Path) -> list[Path]:
    """The rosbag2 storage files a salvage reader can read: the file itself, or a folder's ``*.mcap`` /
    ``*.db3`` files in split order (``name_0``, ``name_1``, ... ``name_10``). ROS 1 bags: none."""
    if path.is_file():
        return [path] if path.suffix in (".mcap", ".db3") else []
    if not path.is_dir():
        return []
    files = [p for p in path.iterdir() if p.suffix in (".mcap", ".db3") and p.is_file()]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


class RosbagsSource:
    """An intact bag through rosbags' AnyReader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = AnyReader([path], default_typestore=typestore(path.suffix == ".bag"))
        self._reader.open()
        self.topics = {c.topic: c.msgtype for c in self._reader.connections}
        self.counts = Counter()
        for c in self._reader.connections:
            self.counts[c.topic] += max(int(c.msgcount), 0)
        self.damage = ""

    def messages(self, topics: set[str] | None) -> Iterator[RawMessage]:
        connections = [c for c in self._reader.connections if topics is None or c.topic in topics]
        for conn, receive_ns, raw in self._reader.messages(connections=connections):
            yield conn.topic, conn.msgtype, int(receive_ns), raw

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return self._reader.deserialize(raw, msgtype)

    def close(self) -> None:
        self._reader.close()


class SalvagedSource:
    """A damaged rosbag2 bag read record by record from its storage files.

    ``counts`` are the messages metadata.yaml records, where it exists and can be read, else those
    the salvage readers can see; ``damage`` says what each file lost, once :meth:`messages` ran.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        self.files = storage_files(path)
        self._readers: list[McapSalvage | SqliteSalvage] = []
        self.topics: dict[str, str] = {}
        seen = Counter()
        for f in self.files:
            if f.suffix == ".mcap":
                reader = McapSalvage(f)
                for topic, (msgtype, n) in reader.scan().items():
                    self.topics.setdefault(topic, msgtype)
                    seen[topic] += n
            else:
                reader = SqliteSalvage(f)
                for name, msgtype in reader.topics.values():
                    self.topics.setdefault(name, msgtype)
            self._readers.append(reader)
        self.recorded = _recorded_counts(path)
        self.counts = Counter(self.recorded) if self.recorded else seen
        self.damage = ""

    def messages(self, topics: set[str] | None) -> Iterator[RawMessage]:
        read = Counter()
        for reader in self._readers:
            if isinstance(reader, McapSalvage):
                items = ((c.topic, c.msgtype, t, raw) for c, t, raw in reader.messages())
            else:
                items = reader.messages()
            for topic, msgtype, receive_ns, raw in items:
                if topics is None or topic in topics:
                    read[topic] += 1
                    yield topic, msgtype, receive_ns, raw
        self.damage = self._damage(read, topics)

    def _damage(self, read: Counter, topics: set[str] | None) -> str:
        parts = [f"{f.name}: {r.report.summary()}" for f, r in zip(self.files, self._readers)]
        if self.recorded:
            wanted = [t for t in self.recorded if topics is None or t in topics]
            expected, got = sum(self.recorded[t] for t in wanted), sum(read[t] for t in wanted)
            parts.append(f"metadata.yaml counts {expected} messages, {got} read, {max(expected - got, 0)} lost")
        return f"salvaged ({self.reason}): " + "; ".join(parts)

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        return typestore(False).deserialize_cdr(raw, msgtype)

    def close(self) -> None:
        for reader in self._readers:
            if isinstance(reader, SqliteSalvage):
                reader.close()


def _recorded_counts(path: Path) -> dict[str, int]:
    """topic -> message count from a rosbag2 folder's metadata.yaml; empty when there is none to read."""
    meta = path / "metadata.yaml" if path.is_dir() else path.parent / "metadata.yaml"
    try:
        info = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]
        return {t["topic_metadata"]["name"]: int(t["message_count"]) for t in info["topics_with_message_count"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return {}


def open_source(path: Path) -> RosbagsSource | SalvagedSource:
    """The bag through rosbags, or salvaged when rosbags cannot open it; BagOpenError when neither can."""
    if not path.exists():
        raise BagOpenError(f"bag not found: {path}")
    try:
        return RosbagsSource(path)
    except Exception as err:  # rosbags raises several unrelated types for unreadable bags
        reason = f"{type(err).__name__}: {err}"
        if not storage_files(path):
            raise BagOpenError(f"cannot open bag {path}: {err}") from err
    try:
        source = SalvagedSource(path, reason)
    except (McapFormatError, sqlite3.DatabaseError, OSError) as err:
        raise BagOpenError(f"cannot open bag {path}: {reason}; nor salvage it: {err}") from err
    log.warning("bag %s cannot be read whole (%s); reading what is intact record by record", path, reason)
    return source


def bag_messages(path: Path, topics: set[str] | None, on_damage: Callable[[str], None]) -> Iterator[tuple[Any, RawMessage]]:
    """(source, message) for every readable message of ``path`` on ``topics`` (None: all).

    ``source.deserialize`` decodes a message. When rosbags raises halfway, the rest comes from the
    salvage reader, skipping the messages already given. ``on_damage`` receives one line saying what
    was lost, for a bag that had damage.
    """
    source = open_source(path)
    given: Counter = Counter()
    skip: Counter = Counter()
    items = source.messages(topics)
    try:
        while True:
            try:
                item = next(items)
            except StopIteration:
                break
            except Exception as err:  # damaged data surfaces as many error types inside rosbags
                reason = f"{type(err).__name__}: {err}"
                if isinstance(source, SalvagedSource) or not storage_files(path):
                    on_damage(f"{path}: reading stopped after {sum(given.values())} messages: {reason}")
                    return
                log.warning("bag %s: rosbags stopped after %d messages (%s); salvaging the rest",
                            path, sum(given.values()), reason)
                source.close()
                try:
                    source = SalvagedSource(path, reason)
                except (McapFormatError, sqlite3.DatabaseError, OSError) as salvage_err:
                    on_damage(f"{path}: reading stopped after {sum(given.values())} messages: {reason}; "
                              f"salvage failed: {salvage_err}")
                    return
                items, skip = source.messages(topics), Counter(given)
                continue
            key = (item[0], item[2])
            if skip[key]:
                skip[key] -= 1
                continue
            given[key] += 1
            yield source, item
        if source.damage:
            on_damage(f"{path}: {source.damage}")
    finally:
        source.close()

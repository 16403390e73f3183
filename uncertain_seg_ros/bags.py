"""Camera images in and out of ROS bags, without ROS: the offline trainer and the ROS tools share it.

Built on the pure-Python ``rosbags`` library (never rclpy), so it runs on a laptop without a ROS
install. Reads rosbag2 folders (sqlite3 or mcap storage), bare ``.mcap``/``.db3`` files and ROS 1
``.bag`` files; writes rosbag2 folders.

- :class:`BagImageReader` streams :class:`BagFrame` s (RGB ``uint8`` arrays) from one or more bags,
  one message at a time, with per-topic sampling (stride, minimum interval, near-duplicate removal)
  and corrupt messages counted and skipped rather than fatal. Damaged bags (a recording cut off,
  corrupt records or pages) are read as far as they are intact (:mod:`.bag_sources`).
- :func:`bag_info` lists the topics of each bag with counts and rates.
- :func:`write_image_bag` turns a folder of images into a rosbag2 bag (raw or JPEG-compressed), with
  real MCAP chunk CRCs.
- :func:`extract_frames` / :func:`write_frames` write the kept frames as image files.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from tqdm import tqdm

from .bag_sources import BagError, BagOpenError, bag_messages, open_source, typestore
from .image_files import list_images, read_rgb
from .image_encoding import array_to_raw, compressed_to_rgb8, image_to_rgb8
from .mcap_records import write_crcs

log = logging.getLogger(__name__)

RAW_IMAGE_TYPES = frozenset({"sensor_msgs/msg/Image", "sensor_msgs/Image"})
COMPRESSED_IMAGE_TYPES = frozenset({"sensor_msgs/msg/CompressedImage", "sensor_msgs/CompressedImage"})
IMAGE_TYPES = RAW_IMAGE_TYPES | COMPRESSED_IMAGE_TYPES

DEFAULT_DEDUPE_THRESHOLD = 0.01
"""A sensible ``dedupe_threshold``: mean absolute difference of 32x24 grey thumbnails in [0, 1].

0.01 (about 2.5 grey levels on average) drops frames of a robot standing still, sensor noise and
JPEG noise included, while keeping frames where anything in view moved noticeably."""

THUMBNAIL_SIZE = (32, 24)
"""(width, height) of the grey thumbnails compared for near-duplicate removal."""

WRITE_ENCODINGS = ("rgb8", "bgr8", "mono8", "mono16")
COMPRESSED_WRITE_ENCODINGS = ("rgb8", "bgr8", "mono8")
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
ROSBAG2_VERSION = 8
"""rosbag2 metadata version written: the oldest rosbags writes, for the widest reader compatibility."""


__all__ = ["BagError", "BagOpenError", "BagTopicError", "BagFrame", "BagImageReader", "ReaderStats", "TopicInfo",
           "bag_info", "extract_frames", "thumbnail", "topic_folder_name", "write_frames", "write_image_bag"]


class BagTopicError(BagError, ValueError):
    """A requested topic does not exist or is not an image topic; the message lists the topics there are."""


@dataclass
class BagFrame:
    """One decoded camera frame from a bag."""

    topic: str
    stamp_ns: int
    """Header stamp in ns; the bag's receive time when the header stamp is zero."""
    frame_id: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB, writable (a copy where the decoder returned a view of the message)."""
    bag: Path
    index: int
    """Index of the message within its topic in its bag (counting every message, kept or not)."""


@dataclass
class TopicInfo:
    """One topic of one bag, as :func:`bag_info` reports it."""

    name: str
    msgtype: str
    count: int
    rate_hz: float | None
    """From the first and last receive times; None with fewer than 2 messages."""
    is_image: bool
    bag: Path | None = None
    metadata_count: int | None = None
    """What the bag's own index (rosbag2 metadata.yaml, MCAP statistics, ROS 1 index) says; None if it says nothing."""

    @property
    def count_disagrees(self) -> bool:
        """The reader yielded another number of messages than the bag's index lists (e.g. rosbags matches a
        rosbag2 topic to its MCAP channel by topic, type *and* offered QoS, and yields nothing where those differ)."""
        return self.metadata_count is not None and self.metadata_count != self.count


@dataclass
class ReaderStats:
    """What a :class:`BagImageReader` did with the messages of its topics.

    Every message read lands in exactly one of the other counters, in the order the checks run:
    stride (before deserialising), corrupt (deserialisation), interval, corrupt (decoding),
    duplicate, kept. Messages a damaged bag lost are not among them: ``damaged`` says, per bag,
    what was lost and how much.
    """

    read: int = 0
    kept: int = 0
    skipped_stride: int = 0
    skipped_interval: int = 0
    skipped_duplicate: int = 0
    corrupt: int = 0
    damaged: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and the command line (plus one per damaged bag)."""
        line = (f"read {self.read}, kept {self.kept}, skipped: stride {self.skipped_stride}, "
                f"interval {self.skipped_interval}, duplicate {self.skipped_duplicate}, corrupt {self.corrupt}")
        return "\n".join([line, *(f"damaged bag {d}" for d in self.damaged)])


@dataclass
class _TopicState:
    """Sampling state of one topic, carried across the bags so that split recordings read as one."""

    seen: int = 0
    last_stamp_ns: int | None = None
    last_thumbnail: np.ndarray | None = field(default=None, repr=False)


def _topic_table(topics: dict[str, str]) -> str:
    return ", ".join(f"{name} [{msgtype}]" for name, msgtype in sorted(topics.items())) or "(none)"


def _stamp_ns(header: Any, receive_ns: int) -> int:
    stamp = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return stamp if stamp != 0 else int(receive_ns)


def _decode_message(msgtype: str, msg: Any) -> np.ndarray:
    """Decode a deserialised Image or CompressedImage to (H, W, 3) uint8 RGB."""
    if msgtype in COMPRESSED_IMAGE_TYPES:
        return compressed_to_rgb8(msg.format, msg.data)
    return image_to_rgb8(msg.encoding, int(msg.height), int(msg.width), int(msg.step), int(msg.is_bigendian), msg.data)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A small grey float32 thumbnail in [0, 1], the signature compared for near-duplicate removal."""
    small = cv2.resize(image, THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0


class BagImageReader:
    """Stream camera frames from one or more bags, one message at a time.

    Bags are read in the given order, each in receive-time order. Topics are chosen by name; with
    none given every ``sensor_msgs/(msg/)Image`` and ``CompressedImage`` topic is read. Sampling is
    per topic and carries across bags (so split recordings read as one):

    - ``stride``: keep every N-th message (the others are not even deserialised);
    - ``min_interval_s``: skip a frame whose stamp is closer than this to the last kept one;
    - ``dedupe_threshold``: skip a frame whose 32x24 grey thumbnail differs from the last kept one's
      by a mean absolute difference below this (in [0, 1]; :data:`DEFAULT_DEDUPE_THRESHOLD` = 0.01
      is a sensible value), i.e. the robot stood still.

    Corrupt messages (undeserialisable, truncated, wrong size, bad JPEG, unsupported encoding) are
    logged as one warning each and counted in ``stats.corrupt``; iteration goes on. ``stats`` holds
    the counters of the current (or last) iteration and is updated while iterating.

    Raises :class:`BagOpenError` for a missing or unreadable bag and :class:`BagTopicError` for a
    requested topic that is in none of the bags or is not an image topic, both at construction.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], topics: Sequence[str] | None = None, stride: int = 1,
                 min_interval_s: float = 0.0, dedupe_threshold: float | None = None) -> None:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("BagImageReader needs at least one bag")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        if dedupe_threshold is not None and dedupe_threshold < 0:
            raise ValueError(f"dedupe_threshold must be >= 0, got {dedupe_threshold}")
        self.stride = int(stride)
        self.min_interval_ns = int(round(min_interval_s * 1e9))
        self.dedupe_threshold = dedupe_threshold
        self.stats = ReaderStats()
        self.topics, self.message_count = self._select_topics(topics)

    def _select_topics(self, requested: Sequence[str] | None) -> tuple[list[str], int]:
        """Check the requested topics against the bags; return the topics to read and their message count."""
        available: dict[str, str] = {}
        counts: dict[str, int] = {}
        non_image: set[str] = set()
        for path in self.paths:
            source = open_source(path)
            try:
                for topic, msgtype in source.topics.items():
                    available.setdefault(topic, msgtype)
                    if msgtype not in IMAGE_TYPES:
                        non_image.add(topic)
                    counts[topic] = counts.get(topic, 0) + source.counts[topic]
            finally:
                source.close()
        if requested is None:
            topics = sorted(t for t in available if t not in non_image)
            if not topics:
                raise BagTopicError(f"no image topics in {', '.join(map(str, self.paths))}; "
                                    f"topics there: {_topic_table(available)}")
        else:
            topics = list(dict.fromkeys(requested))
            if missing := [t for t in topics if t not in available]:
                raise BagTopicError(f"topic(s) {', '.join(missing)} not in {', '.join(map(str, self.paths))}; "
                                    f"topics there: {_topic_table(available)}")
            if wrong := [t for t in topics if t in non_image]:
                raise BagTopicError(f"topic(s) {', '.join(f'{t} [{available[t]}]' for t in wrong)} are not image "
                                    f"topics (sensor_msgs/msg/Image or CompressedImage); topics there: "
                                    f"{_topic_table(available)}")
        return topics, sum(counts[t] for t in topics)

    def __iter__(self) -> Iterator[BagFrame]:
        self.stats = ReaderStats()
        state: dict[str, _TopicState] = {}
        for path in self.paths:
            yield from self._read_bag(path, state)

    def _corrupt(self, path: Path, topic: str, index: int, reason: str) -> None:
        self.stats.corrupt += 1
        log.warning("corrupt message skipped: bag %s, topic %s, index %d: %s", path, topic, index, reason)

    def _read_bag(self, path: Path, state: dict[str, _TopicState]) -> Iterator[BagFrame]:
        indices: dict[str, int] = {}
        for source, (topic, msgtype, receive_ns, raw) in bag_messages(path, set(self.topics), self.stats.damaged.append):
            index = indices.get(topic, 0)
            indices[topic] = index + 1
            topic_state = state.setdefault(topic, _TopicState())
            self.stats.read += 1
            seen, topic_state.seen = topic_state.seen, topic_state.seen + 1
            if seen % self.stride:
                self.stats.skipped_stride += 1
                continue
            try:
                msg = source.deserialize(raw, msgtype)
                stamp_ns = _stamp_ns(msg.header, receive_ns)
                frame_id = str(msg.header.frame_id)
            except Exception as err:  # garbage bytes surface as many error types in the deserialiser
                self._corrupt(path, topic, index, f"cannot deserialise {msgtype}: {type(err).__name__}: {err}")
                continue
            last = topic_state.last_stamp_ns
            if self.min_interval_ns and last is not None and abs(stamp_ns - last) < self.min_interval_ns:
                self.stats.skipped_interval += 1
                continue
            try:
                image = _decode_message(msgtype, msg)
                if not image.flags.writeable:
                    image = image.copy()
            except (ValueError, cv2.error) as err:
                self._corrupt(path, topic, index, f"{type(err).__name__}: {err}")
                continue
            if self.dedupe_threshold is not None:
                thumb = thumbnail(image)
                previous = topic_state.last_thumbnail
                if previous is not None and float(np.mean(np.abs(thumb - previous))) < self.dedupe_threshold:
                    self.stats.skipped_duplicate += 1
                    continue
                topic_state.last_thumbnail = thumb
            topic_state.last_stamp_ns = stamp_ns
            self.stats.kept += 1
            yield BagFrame(topic, stamp_ns, frame_id, image, path, index)
        if not indices:
            log.info("bag %s has none of the topics %s", path, ", ".join(self.topics))


def bag_info(paths: Sequence[str | os.PathLike[str]]) -> list[TopicInfo]:
    """Topics of each bag, one :class:`TopicInfo` per (bag, topic), bags in the given order, topics by name.

    Per bag rather than merged, because bags of one session can differ in topics and rates. Counts
    and rates come from one pass over the raw messages (receive times, nothing deserialised); the
    bag's own count is kept beside them (``metadata_count``), since the two can disagree.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    infos: list[TopicInfo] = []
    for path in map(Path, paths):
        source = open_source(path)
        types = dict(source.topics)
        listed = dict(source.counts)
        source.close()
        counts = dict.fromkeys(types, 0)
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for _, (topic, _, receive_ns, _) in bag_messages(path, None, lambda line: log.warning("damaged bag %s", line)):
            counts[topic] += 1
            first[topic] = min(first.get(topic, receive_ns), receive_ns)
            last[topic] = max(last.get(topic, receive_ns), receive_ns)
        for topic in sorted(types):
            n, span = counts[topic], last.get(topic, 0) - first.get(topic, 0)
            rate = (n - 1) / (span * 1e-9) if n >= 2 and span > 0 else None
            infos.append(TopicInfo(topic, types[topic], n, rate, types[topic] in IMAGE_TYPES, path, listed[topic]))
    return infos


def _list_images(images: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    files = [Path(p) for p in images]
    if not files:
        raise ValueError("no images to write")
    return files


def _as_uint8(data: Any) -> np.ndarray:
    """A flat uint8 array over raw image bytes, as rosbags message fields want them."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)


def _raw_fields(rgb: np.ndarray, encoding: str) -> tuple[int, int, int, np.ndarray]:
    """(height, width, step, data) of an RGB image converted to ``encoding``."""
    if encoding == "bgr8":
        height, width, step, data = array_to_raw(np.ascontiguousarray(rgb[..., ::-1]), "rgb8")
    elif encoding == "mono8":
        height, width, step, data = array_to_raw(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), "mono8")
    elif encoding == "mono16":
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257
        height, width, step, data = array_to_raw(grey, "mono16")
    else:
        height, width, step, data = array_to_raw(np.ascontiguousarray(rgb), "rgb8")
    return int(height), int(width), int(step), _as_uint8(data)


def _jpeg(rgb: np.ndarray, encoding: str, quality: int) -> tuple[str, np.ndarray]:
    """(format, data) of a CompressedImage as image_transport's compressed plugin writes it."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if encoding == "mono8":
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), params)
        fmt = "mono8; jpeg compressed mono8"
    else:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        fmt = f"{encoding}; jpeg compressed bgr8"
    if not ok:
        raise ValueError("JPEG encoding failed")
    return fmt, buf.reshape(-1)


def write_image_bag(images: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], out: str | os.PathLike[str],
                    topic: str = "/camera/image_raw", fps: float = 10.0, compressed: bool = False,
                    storage: str = "mcap", frame_id: str = "camera", encoding: str = "rgb8",
                    start_ns: int | None = None, jpeg_quality: int = 95) -> Path:
    """Write images as a rosbag2 folder, one message per image, for tests, demos and replaying datasets.

    ``images`` is a folder (its image files sorted by name) or a list of files (kept in the given
    order). Raw mode writes ``sensor_msgs/msg/Image`` on ``topic`` in ``encoding`` (rgb8, bgr8,
    mono8, mono16); ``compressed=True`` writes ``sensor_msgs/msg/CompressedImage`` JPEGs on
    ``<topic>/compressed`` with image_transport's format string (``"rgb8; jpeg compressed bgr8"``).
    Stamps start at ``start_ns`` (default: now) and are 1/fps apart; header stamp = bag time.
    Storage is ``"mcap"`` or ``"sqlite3"``; MCAP files get real chunk, data-section and summary
    CRCs (rosbags leaves them 0, "not computed"), so that later corruption is detected. Refuses to
    overwrite ``out``; the bag is built in a temporary sibling folder and renamed into place, so
    ``out`` never holds a half-written bag.
    """
    out = Path(out)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    allowed = COMPRESSED_WRITE_ENCODINGS if compressed else WRITE_ENCODINGS
    if encoding not in allowed:
        raise ValueError(f"encoding must be one of {', '.join(allowed)}{' when compressed' if compressed else ''}, "
                         f"got {encoding!r}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists already; not overwriting it")
    files = _list_images(images)
    start_ns = time.time_ns() if start_ns is None else int(start_ns)
    store = typestore(False)
    msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    out_topic = f"{topic.rstrip('/')}/compressed" if compressed else topic
    Header, Time = store.types["std_msgs/msg/Header"], store.types["builtin_interfaces/msg/Time"]
    Msg = store.types[msgtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        staging = staging_root / out.name
        with Writer(staging, version=ROSBAG2_VERSION, storage_plugin=STORAGES[storage]) as writer:
            connection = writer.add_connection(out_topic, msgtype, typestore=store)
            for i, path in enumerate(tqdm(files, desc=f"write {out.name}", unit="image", disable=None)):
                stamp = start_ns + int(round(i * 1e9 / fps))
                header = Header(stamp=Time(sec=stamp // 1_000_000_000, nanosec=stamp % 1_000_000_000), frame_id=frame_id)
                rgb = read_rgb(path)
                if compressed:
                    fmt, data = _jpeg(rgb, encoding, jpeg_quality)
                    msg = Msg(header=header, format=fmt, data=data)
                else:
                    height, width, step, data = _raw_fields(rgb, encoding)
                    msg = Msg(header=header, height=height, width=width, encoding=encoding, is_bigendian=0,
                              step=step, data=data)
                writer.write(connection, stamp, store.serialize_cdr(msg, msgtype))
        for mcap in staging.glob("*.mcap"):
            write_crcs(mcap)
        if out.exists():
            raise FileExistsError(f"{out} appeared while writing; not overwriting it")
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    log.info("wrote %d images to %s (%s, %s)", len(files), out, out_topic, storage)
    return out


def topic_folder_name(topic: str) -> str:
    """Folder name for a topic's extracted frames: ``/camera/image_raw`` -> ``camera_image_raw``."""
    return topic.strip("/").replace("/", "_") or "_"


def write_frames(reader: BagImageReader, out_dir: str | os.PathLike[str], fmt: str = "png",
                 progress: bool = True, jpeg_quality: int = 95) -> int:
    """Write each frame ``reader`` keeps as ``<out_dir>/<topic folder>/<stamp_ns>.<fmt>``; return the count.

    ``reader.stats`` holds the counters afterwards. Frames sharing a stamp on one topic get a
    ``_<n>`` suffix instead of overwriting each other. Each file appears whole (written beside, then renamed).
    """
    fmt = fmt.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format must be png or jpg, got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if fmt == "jpg" else []
    out_dir = Path(out_dir)
    written: set[Path] = set()
    count = 0
    with tqdm(total=reader.message_count or None, desc="extract", unit="msg", disable=None if progress else True) as bar:
        for frame in reader:
            folder = out_dir / topic_folder_name(frame.topic)
            folder.mkdir(parents=True, exist_ok=True)
            path, n = folder / f"{frame.stamp_ns}.{fmt}", 0
            while path in written:
                n += 1
                path = folder / f"{frame.stamp_ns}_{n}.{fmt}"
            ok, buf = cv2.imencode(f".{fmt}", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), params)
            if not ok:
                raise ValueError(f"cannot encode frame {frame.topic} {frame.stamp_ns} as {fmt}")
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, path)
            written.add(path)
            count += 1
            bar.update(reader.stats.read - bar.n)
        bar.update(reader.stats.read - bar.n)
    log.info("extracted %d frames to %s (%s)", count, out_dir, reader.stats.summary())
    return count


def extract_frames(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                   topics: Sequence[str] | None = None, stride: int = 1, min_interval_s: float = 0.0,
                   dedupe_threshold: float | None = None, fmt: str = "png", progress: bool = True) -> int:
    """Extract the kept frames of image topics from bags as image files (see :func:`write_frames`); return the count."""
    reader = BagImageReader(paths, topics, stride=stride, min_interval_s=min_interval_s,
                            dedupe_threshold=dedupe_threshold)
    return write_frames(reader, out_dir, fmt=fmt, progress=progress)

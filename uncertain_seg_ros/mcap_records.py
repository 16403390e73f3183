"""MCAP at the level of its records, for two things rosbags does not do.

- **Salvage** (:class:`McapSalvage`): read every intact chunk of a file that lost its end (a recorder
  killed mid-run leaves no summary and no footer, and rosbags refuses it: "File end magic is
  invalid") or that is damaged inside (a corrupt record length, a chunk whose CRC fails). Records
  are walked from the start; what cannot be read is counted and skipped, never fatal.
- **CRCs** (:func:`write_crcs`): rosbags writes 0 (= "not computed") in every chunk's
  ``uncompressed_crc``, in Data End's ``data_section_crc`` and in the Footer's ``summary_crc``;
  this fills them in place, so that later corruption is detected by any reader.

The layout (https://mcap.dev/spec): magic ``\\x89MCAP0\\r\\n``; then records, each an opcode byte,
a little-endian uint64 content length and the content; strings and byte arrays are prefixed by a
uint32 length, the Chunk's records by a uint64. Chunk (0x06): message_start_time, message_end_time,
uncompressed_size (uint64 each), uncompressed_crc (uint32: CRC-32 of the uncompressed records),
compression (string: "", "lz4" or "zstd"), records. Inside: Schema (0x03: id uint16, name, encoding,
data), Channel (0x04: id uint16, schema_id uint16, topic, message_encoding, metadata) and Message
(0x05: channel_id uint16, sequence uint32, log_time uint64, publish_time uint64, data to the end).
Data End (0x0F): data_section_crc over every byte before it. Footer (0x02, last before the closing
magic): summary_start, summary_offset_start (uint64), summary_crc over the bytes from summary_start
through the footer's summary_offset_start field.
"""
from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lz4.frame import decompress as lz4_decompress

try:  # rosbags' own zstd dependency: the standard library's from Python 3.14, its backport before
    from compression import zstd
except ImportError:
    from backports import zstd

__all__ = ["MAGIC", "McapChannel", "McapSalvage", "SalvageReport", "write_crcs"]

MAGIC = b"\x89MCAP0\r\n"
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F
_RECORD = struct.Struct("<BQ")
_CHUNK_TIMES = struct.Struct("<QQQI")  # start, end, uncompressed_size, uncompressed_crc
_MESSAGE = struct.Struct("<HIQQ")
_MAX_CHUNK_HEADER = _RECORD.size + _CHUNK_TIMES.size + 4 + 8 + 8  # compression names are at most 8 bytes
_FOOTER_SIZE = _RECORD.size + 20
DECOMPRESSORS = {"": bytes, "lz4": lz4_decompress, "zstd": zstd.decompress}


class McapFormatError(ValueError):
    """Not an MCAP file at all (no leading magic)."""


@dataclass(frozen=True)
class McapChannel:
    id: int
    topic: str
    msgtype: str
    """The schema's name (``sensor_msgs/msg/Image`` in ROS 2 bags)."""


@dataclass
class SalvageReport:
    """What a walk over the file found: intact chunks, and what was lost and why."""

    chunks: int = 0
    damaged_chunks: int = 0
    messages: int = 0
    truncated_at: int | None = None
    """Offset of the record the file ends inside (a recording cut off), if it does."""
    truncated_bytes: int = 0
    skipped_bytes: int = 0
    """Bytes between records that did not parse and the next record that does (resynchronised)."""
    problems: list[str] = field(default_factory=list)

    @property
    def lost_chunks(self) -> int:
        return self.damaged_chunks + (self.truncated_at is not None)

    def summary(self) -> str:
        parts = [f"read {self.chunks} intact chunks ({self.messages} messages)"]
        if self.damaged_chunks:
            parts.append(f"skipped {self.damaged_chunks} damaged chunks")
        if self.truncated_at is not None:
            parts.append(f"lost the last chunk: the file ends {self.truncated_bytes} bytes into the record at offset "
                         f"{self.truncated_at} (cut off while recording)")
        if self.skipped_bytes:
            parts.append(f"skipped {self.skipped_bytes} unreadable bytes between records")
        return "; ".join(parts)


class McapSalvage:
    """Stream the messages of every intact chunk of an MCAP file, in file order, whatever its end.

    ``channels`` and ``report`` describe the last walk (:meth:`scan` or :meth:`messages`). A chunk
    is intact when its record fits in the file, its header agrees with its length, it decompresses
    to its declared size, its CRC (when not 0) matches and every record inside parses; a chunk
    whose inner records break off yields the messages before the break and counts as damaged.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise McapFormatError(f"{self.path} is not an MCAP file (no leading magic)")
        self.channels: dict[int, McapChannel] = {}
        self.report = SalvageReport()

    def scan(self) -> dict[str, tuple[str, int]]:
        """topic -> (message type, readable messages), from one walk over the file."""
        counts: dict[int, int] = {}
        for channel, _, _ in self._walk(keep_data=False):
            counts[channel.id] = counts.get(channel.id, 0) + 1
        return {c.topic: (c.msgtype, counts.get(c.id, 0)) for c in self.channels.values()}

    def messages(self) -> Iterator[tuple[McapChannel, int, bytes]]:
        """(channel, log_time ns, serialised message) of every readable message."""
        yield from self._walk(keep_data=True)

    def _walk(self, keep_data: bool) -> Iterator[tuple[McapChannel, int, bytes]]:
        self.channels, self.report = {}, SalvageReport()
        schemas: dict[int, str] = {}
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size, pos = len(mm), len(MAGIC)
            while pos < size:
                if size - pos < _RECORD.size:
                    self._truncated(pos, size)
                    break
                op, length = _RECORD.unpack_from(mm, pos)
                end = pos + _RECORD.size + length
                if op in (OP_FOOTER, OP_DATA_END):
                    break
                if op == OP_CHUNK:
                    header = _chunk_header(mm, pos, size)
                    if header is None and size - pos < _MAX_CHUNK_HEADER:
                        self._truncated(pos, size)
                        break
                    if header is None:  # the length (or the header) is corrupt: find the next chunk
                        pos = self._resync(mm, pos + 1, size)
                        continue
                    if header.end > size:
                        self._truncated(pos, size)
                        break
                    records = self._chunk_records(mm, header)
                    if records is not None:
                        yield from self._records(records, 0, len(records), schemas, keep_data, in_chunk=True)
                elif end > size:
                    self._truncated(pos, size)
                    break
                elif op in (OP_SCHEMA, OP_CHANNEL, OP_MESSAGE):
                    yield from self._records(mm, pos, end, schemas, keep_data, in_chunk=False)
                pos = end

    def _truncated(self, pos: int, size: int) -> None:
        self.report.truncated_at, self.report.truncated_bytes = pos, size - pos

    def _resync(self, mm: mmap.mmap, start: int, size: int) -> int:
        """Offset of the next plausible chunk record at or after ``start`` (or the end of the file)."""
        q = mm.find(bytes([OP_CHUNK]), start)
        while q != -1:
            header = _chunk_header(mm, q, size)
            if header is not None and header.end <= size:
                break
            q = mm.find(bytes([OP_CHUNK]), q + 1)
        stop = size if q == -1 else q
        self.report.skipped_bytes += stop - (start - 1)
        self.report.problems.append(f"unreadable bytes at offset {start - 1}..{stop}")
        return stop

    def _chunk_records(self, mm: mmap.mmap, header: "_ChunkHeader") -> bytes | None:
        """The chunk's uncompressed records, or None (counted) when it does not decompress or check."""
        try:
            records = DECOMPRESSORS[header.compression](mm[header.records_start : header.end])
        except Exception as err:  # the decompressors raise their own error types for garbage
            return self._damaged(header, f"does not decompress ({header.compression}): {err}")
        if len(records) != header.uncompressed_size:
            return self._damaged(header, f"decompresses to {len(records)} bytes, not {header.uncompressed_size}")
        if header.crc and zlib.crc32(records) != header.crc:
            return self._damaged(header, "fails its CRC")
        self.report.chunks += 1
        return records

    def _damaged(self, header: "_ChunkHeader", why: str) -> None:
        self.report.damaged_chunks += 1
        self.report.problems.append(f"chunk at offset {header.offset} {why}")
        return None

    def _records(self, buf, pos: int, end: int, schemas: dict[int, str], keep_data: bool,
                 in_chunk: bool) -> Iterator[tuple[McapChannel, int, bytes]]:
        """Schema, Channel and Message records in ``buf[pos:end]``; stops at the first that does not parse."""
        while pos < end:
            if end - pos < _RECORD.size:
                break
            op, length = _RECORD.unpack_from(buf, pos)
            body, nxt = pos + _RECORD.size, pos + _RECORD.size + length
            if nxt > end:
                break
            try:
                if op == OP_SCHEMA:
                    (schema_id,) = struct.unpack_from("<H", buf, body)
                    name, _ = _string(buf, body + 2, nxt)
                    schemas[schema_id] = name
                elif op == OP_CHANNEL:
                    channel_id, schema_id = struct.unpack_from("<HH", buf, body)
                    topic, _ = _string(buf, body + 4, nxt)
                    self.channels[channel_id] = McapChannel(channel_id, topic, schemas.get(schema_id, ""))
                elif op == OP_MESSAGE:
                    channel_id, _, log_time, _ = _MESSAGE.unpack_from(buf, body)
                    channel = self.channels.get(channel_id)
                    if channel is not None and length >= _MESSAGE.size:
                        self.report.messages += 1
                        yield channel, log_time, bytes(buf[body + _MESSAGE.size : nxt]) if keep_data else b""
            except (struct.error, UnicodeDecodeError, ValueError):
                break
            pos = nxt
        if pos < end:
            where = "a chunk" if in_chunk else "the data section"
            self.report.problems.append(f"a record in {where} does not parse; the {end - pos} bytes after it are skipped")
            if in_chunk:
                self.report.chunks -= 1
                self.report.damaged_chunks += 1


@dataclass(frozen=True)
class _ChunkHeader:
    offset: int
    end: int
    uncompressed_size: int
    crc: int
    compression: str
    records_start: int


def _chunk_header(mm, pos: int, size: int) -> _ChunkHeader | None:
    """The Chunk record at ``pos`` if its fields are consistent with its length, else None."""
    head = pos + _RECORD.size
    if head + _CHUNK_TIMES.size + 4 > size:
        return None
    _, length = _RECORD.unpack_from(mm, pos)
    start, stop, uncompressed, crc = _CHUNK_TIMES.unpack_from(mm, head)
    (name_len,) = struct.unpack_from("<I", mm, head + _CHUNK_TIMES.size)
    name_at = head + _CHUNK_TIMES.size + 4
    if name_len > 8 or name_at + name_len + 8 > size or start > stop:
        return None
    compression = bytes(mm[name_at : name_at + name_len]).decode("ascii", errors="replace")
    (records_len,) = struct.unpack_from("<Q", mm, name_at + name_len)
    records_start = name_at + name_len + 8
    if compression not in DECOMPRESSORS or records_start + records_len != head + length:
        return None
    return _ChunkHeader(pos, records_start + records_len, uncompressed, crc, compression, records_start)


def _string(buf, pos: int, end: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", buf, pos)
    if pos + 4 + n > end:
        raise ValueError("string runs past its record")
    return bytes(buf[pos + 4 : pos + 4 + n]).decode("utf-8"), pos + 4 + n


def write_crcs(path: str | Path) -> int:
    """Fill in the CRCs of a complete MCAP file in place: every chunk's ``uncompressed_crc``, Data
    End's ``data_section_crc`` and the Footer's ``summary_crc``. Returns the number of chunks.

    Record lengths and offsets do not change, so indexes stay valid; the data-section CRC is
    computed after the chunk CRCs, which lie inside it.
    """
    path = Path(path)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        size = len(mm)
        if mm[: len(MAGIC)] != MAGIC or mm[size - len(MAGIC) :] != MAGIC:
            raise McapFormatError(f"{path} is not a complete MCAP file (magic missing at its start or end)")
        pos, chunks, data_end = len(MAGIC), 0, None
        while pos < size - len(MAGIC):
            op, length = _RECORD.unpack_from(mm, pos)
            if op == OP_CHUNK:
                header = _chunk_header(mm, pos, size)
                if header is None:
                    raise McapFormatError(f"{path}: malformed chunk at offset {pos}")
                records = DECOMPRESSORS[header.compression](mm[header.records_start : header.end])
                struct.pack_into("<I", mm, pos + _RECORD.size + 24, zlib.crc32(records))
                chunks += 1
            elif op == OP_DATA_END:
                data_end = pos
                break
            pos += _RECORD.size + length
        if data_end is not None:
            struct.pack_into("<I", mm, data_end + _RECORD.size, _crc(mm, 0, data_end))
        footer = size - len(MAGIC) - _FOOTER_SIZE
        op, _ = _RECORD.unpack_from(mm, footer)
        summary_start, _ = struct.unpack_from("<QQ", mm, footer + _RECORD.size)
        if op != OP_FOOTER:
            raise McapFormatError(f"{path}: no footer record before the closing magic")
        if summary_start:
            struct.pack_into("<I", mm, footer + _RECORD.size + 16, _crc(mm, summary_start, footer + _RECORD.size + 16))
        mm.flush()
    return chunks


def _crc(mm: mmap.mmap, start: int, stop: int, block: int = 1 << 24) -> int:
    """CRC-32 of ``mm[start:stop]``, 16 MiB at a time."""
    crc = 0
    for at in range(start, stop, block):
        crc = zlib.crc32(mm[at : min(at + block, stop)], crc)
    return crc

"""Damaged bags, made here: written with ``bag write`` (rosbags), then cut or corrupted on disk.

What a robot's disk leaves: an MCAP file whose recorder was killed (no summary, no footer), a
corrupt record length inside a chunk, a flipped byte in a chunk, a corrupt sqlite3 page. Extract
must read every intact part, count and skip the rest, and say what was lost; never a traceback.
"""
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from uncertain_seg_ros.bags import BagImageReader, bag_info, write_image_bag
from uncertain_seg_ros.mcap_records import McapSalvage
from uncertain_seg_training.cli import main as cli_main

FRAMES = 9  # 480x360 rgb8 (518 kB each): rosbags closes a chunk after 1 MiB, so 3 frames per chunk


@pytest.fixture(scope="module")
def mcap_bag(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage")
    images = root / "images"
    images.mkdir()
    for i in range(FRAMES):
        noise = np.random.default_rng(i).integers(0, 256, (360, 480, 3), dtype=np.uint8)
        cv2.imwrite(str(images / f"{i:02d}.png"), noise)
    return write_image_bag(images, root / "bag", fps=2, start_ns=1_700_000_000_000_000_000)


def _records(data: bytes) -> list[tuple[int, int, int]]:
    """(opcode, offset, content length) of the top-level records of a complete MCAP file."""
    out, pos = [], 8
    while pos < len(data) - 8:
        op, length = struct.unpack_from("<BQ", data, pos)
        out.append((op, pos, length))
        pos += 9 + length
    return out


def _damaged_copy(bag: Path, dest: Path, damage) -> Path:
    copy = shutil.copytree(bag, dest)
    mcap = next(copy.glob("*.mcap"))
    mcap.write_bytes(damage(bytearray(mcap.read_bytes())))
    return copy


def _chunks(data) -> list[int]:
    return [pos for op, pos, _ in _records(bytes(data)) if op == 0x06]


def _first_record_in_chunk(data, chunk: int) -> int:
    """Offset of the first record inside an uncompressed chunk (after its 40-byte header)."""
    return chunk + 9 + 8 + 8 + 8 + 4 + 4 + 0 + 8


def _extract(bag: Path, out: Path, capsys) -> str:
    capsys.readouterr()
    assert cli_main(["bag", "extract", str(bag), "--out", str(out)]) == 0
    return capsys.readouterr().out


def test_truncated_mcap_gives_every_complete_chunk(mcap_bag, tmp_path, capsys):
    """Cut inside the last chunk (a recorder killed mid-write): rosbags said "File end magic is
    invalid" and extract gave 0 frames; now the 6 frames of the 2 complete chunks, and the summary
    says the last chunk and 3 messages were lost."""
    cut = _damaged_copy(mcap_bag, tmp_path / "cut", lambda d: d[: _chunks(d)[2] + 700_000])
    with pytest.raises(Exception, match="File end magic is invalid"):
        AnyReader([cut]).open()
    out = _extract(cut, tmp_path / "frames", capsys)
    assert "extracted 6 frames" in out
    assert "read 2 intact chunks (6 messages); lost the last chunk: the file ends" in out
    assert "metadata.yaml counts 9 messages, 6 read, 3 lost" in out
    files = sorted((tmp_path / "frames" / "camera_image_raw").iterdir())
    assert len(files) == 6
    first = cv2.imread(str(files[0]))
    assert np.array_equal(first, np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8))


def test_truncated_mcap_without_metadata(mcap_bag, tmp_path):
    """A recorder killed before it wrote metadata.yaml: the folder's .mcap file is salvaged all the same."""
    cut = _damaged_copy(mcap_bag, tmp_path / "cut", lambda d: d[: _chunks(d)[1] + 20])
    (cut / "metadata.yaml").unlink()
    reader = BagImageReader([cut])
    assert len(list(reader)) == 3
    assert "read 1 intact chunks (3 messages); lost the last chunk" in reader.stats.damaged[0]
    infos = bag_info([cut])
    assert [(i.name, i.count) for i in infos] == [("/camera/image_raw", 3)]


def test_corrupt_record_length_is_counted_and_skipped(mcap_bag, tmp_path, capsys):
    """The first message of the second chunk claims 10^12 bytes: rosbags raised ReaderError halfway
    and extract died with a traceback; now the other chunks' 6 frames, the damage in the summary."""
    def damage(d):
        struct.pack_into("<Q", d, _first_record_in_chunk(d, _chunks(d)[1]) + 1, 10**12)
        return d
    bad = _damaged_copy(mcap_bag, tmp_path / "bad", damage)
    out = _extract(bad, tmp_path / "frames", capsys)
    assert "extracted 6 frames" in out and "skipped 1 damaged chunks" in out
    assert len(list((tmp_path / "frames" / "camera_image_raw").iterdir())) == 6


def test_bag_write_writes_real_crcs_and_corruption_is_detected(mcap_bag, tmp_path):
    """Every chunk's uncompressed_crc, Data End's and the Footer's CRCs are real (rosbags writes 0);
    one flipped pixel byte inside a chunk then fails its CRC: that chunk is skipped, the rest read."""
    data = (next(mcap_bag.glob("*.mcap"))).read_bytes()
    records = _records(data)
    for pos in _chunks(data):
        (crc,) = struct.unpack_from("<I", data, pos + 9 + 24)
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        start = _first_record_in_chunk(data, pos)
        assert crc != 0 and crc == zlib.crc32(data[start : pos + 9 + length])
    data_end = next(pos for op, pos, _ in records if op == 0x0F)
    assert struct.unpack_from("<I", data, data_end + 9)[0] == zlib.crc32(data[:data_end])
    footer = len(data) - 8 - 29
    summary_start = struct.unpack_from("<Q", data, footer + 9)[0]
    assert struct.unpack_from("<I", data, footer + 9 + 16)[0] == zlib.crc32(data[summary_start : footer + 9 + 16])
    with AnyReader([mcap_bag]) as reader:
        assert sum(1 for _ in reader.messages()) == FRAMES

    def flip(d):
        d[_chunks(d)[1] + 200_000] ^= 0x01
        return d
    flipped = _damaged_copy(mcap_bag, tmp_path / "flipped", flip)
    reader = BagImageReader([flipped])
    assert len(list(reader)) == 6 and reader.stats.corrupt == 0
    assert "skipped 1 damaged chunks" in reader.stats.damaged[0]
    salvage = McapSalvage(next(flipped.glob("*.mcap")))
    salvage.scan()
    assert salvage.report.problems == [f"chunk at offset {_chunks(flipped.joinpath('bag.mcap').read_bytes())[1]} fails its CRC"]


def _table_leaves(raw: bytes, page_size: int, page: int) -> list[int]:
    """Leaf pages of the sqlite3 table B-tree rooted at ``page`` (file format: sqlite.org/fileformat.html)."""
    base = (page - 1) * page_size
    header = base + (100 if page == 1 else 0)
    if raw[header] == 0x0D:
        return [page]
    cells = struct.unpack_from(">H", raw, header + 3)[0]
    children = [struct.unpack_from(">I", raw, base + struct.unpack_from(">H", raw, header + 12 + 2 * k)[0])[0]
                for k in range(cells)]
    children.append(struct.unpack_from(">I", raw, header + 8)[0])
    return [leaf for child in children for leaf in _table_leaves(raw, page_size, child)]


def test_corrupt_sqlite_page_is_counted_and_skipped(tmp_path, capsys):
    """One leaf page of the messages table overwritten: rosbags could not open the bag ("database disk
    image is malformed", 0 frames); now every other row, and the unreadable ones counted."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(60):
        cv2.imwrite(str(images / f"{i:03d}.png"), np.full((12, 16, 3), 4 * i, np.uint8))
    bag = write_image_bag(images, tmp_path / "bag", fps=10, storage="sqlite3", start_ns=1_700_000_000_000_000_000)
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    raw = bytearray(db.read_bytes())
    leaves = _table_leaves(bytes(raw), page_size, root)
    assert len(leaves) > 3
    victim = (leaves[len(leaves) // 2] - 1) * page_size
    raw[victim + 100 : victim + page_size] = b"\xa5" * (page_size - 100)
    db.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="malformed"):
        AnyReader([bag]).open()
    out = _extract(bag, tmp_path / "frames", capsys)
    kept = len(list((tmp_path / "frames" / "camera_image_raw").iterdir()))
    assert 40 <= kept < 60 and f"extracted {kept} frames" in out
    assert "rows unreadable (damaged pages)" in out and f"metadata.yaml counts 60 messages, {kept} read" in out

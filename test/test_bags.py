"""Bags in and out: real rosbag2 (mcap, sqlite3) and ROS 1 bags written with rosbags in tmp_path."""
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer as Writer2
from rosbags.typesys import Stores, get_typestore

from uncertain_seg_ros import bags
from uncertain_seg_ros.bags import (
    BagImageReader,
    BagOpenError,
    BagTopicError,
    bag_info,
    extract_frames,
    write_image_bag,
)
from uncertain_seg_training.cli import main as cli_main

TS2 = get_typestore(Stores.ROS2_JAZZY)
TS1 = get_typestore(Stores.ROS1_NOETIC)
START = 1_700_000_000_000_000_000
H, W = 12, 16


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth RGB images (smooth so that JPEG keeps them close)."""
    yy, xx = np.mgrid[0:H, 0:W]
    images = []
    for i in range(n):
        r = xx * 8 + i * 7
        g = yy * 10 + i * 5
        b = np.full_like(xx, 60 + 15 * i + seed)
        images.append(np.stack([r, g, b], axis=-1).astype(np.uint8))
    return images


def image_folder(root: Path, images: list[np.ndarray]) -> Path:
    root.mkdir(parents=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(root / f"img_{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def image_msg(ts, rgb: np.ndarray, encoding: str, stamp_ns: int, frame_id: str = "cam", ros1: bool = False):
    """A sensor_msgs Image of an RGB array converted to ``encoding`` (rgb8, bgr8, mono8, rgba8)."""
    if encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "mono8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], axis=-1)
    else:
        pixels = rgb
    pixels = np.ascontiguousarray(pixels)
    step = pixels.shape[1] * (pixels.shape[2] if pixels.ndim == 3 else 1)
    return ts.types["sensor_msgs/msg/Image"](
        header=header(ts, stamp_ns, frame_id, ros1), height=pixels.shape[0], width=pixels.shape[1],
        encoding=encoding, is_bigendian=0, step=step, data=pixels.reshape(-1))


def header(ts, stamp_ns: int, frame_id: str, ros1: bool = False):
    time = ts.types["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    extra = {"seq": 0} if ros1 else {}
    return ts.types["std_msgs/msg/Header"](stamp=time, frame_id=frame_id, **extra)


def compressed_msg(ts, rgb: np.ndarray, stamp_ns: int, ros1: bool = False, data: bytes | None = None):
    if data is None:
        data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    return ts.types["sensor_msgs/msg/CompressedImage"](
        header=header(ts, stamp_ns, "cam", ros1), format="jpeg", data=np.frombuffer(data, np.uint8))


def write_ros2(path: Path, messages: list[tuple[str, str, int, object]], storage: str = "mcap") -> Path:
    """A rosbag2 bag of (topic, msgtype, receive time, message object or raw bytes)."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer2(path, version=9, storage_plugin=plugin) as writer:
        conns = {}
        for topic, msgtype, t, msg in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=TS2)
            raw = msg if isinstance(msg, bytes) else TS2.serialize_cdr(msg, msgtype)
            writer.write(conns[topic], t, raw)
    return path


def test_write_and_read_raw(tmp_path: Path) -> None:
    """Raw bags (mcap and sqlite3) read back pixel-exact, with stamps 1/fps apart and the frame_id."""
    images = synthetic_images(4)
    folder = image_folder(tmp_path / "imgs", images)
    for storage in ("mcap", "sqlite3"):
        out = write_image_bag(folder, tmp_path / f"bag_{storage}", fps=20.0, storage=storage, frame_id="cam0",
                              start_ns=START)
        frames = list(BagImageReader([out]))
        assert [f.topic for f in frames] == ["/camera/image_raw"] * 4
        for i, (frame, image) in enumerate(zip(frames, images)):
            np.testing.assert_array_equal(frame.image, image)
            assert frame.image.dtype == np.uint8 and frame.image.shape == (H, W, 3)
            assert frame.stamp_ns == START + i * 50_000_000
            assert frame.frame_id == "cam0" and frame.index == i and frame.bag == out
        assert not list(tmp_path.glob(".bag_*"))


def test_write_and_read_compressed(tmp_path: Path) -> None:
    """A compressed mcap bag has image_transport's topic and format, and frames match within JPEG tolerance."""
    images = synthetic_images(3)
    out = write_image_bag(image_folder(tmp_path / "imgs", images), tmp_path / "bag", compressed=True, start_ns=START)
    reader = BagImageReader([out])
    assert reader.topics == ["/camera/image_raw/compressed"]
    frames = list(reader)
    assert len(frames) == 3
    for i, (frame, image) in enumerate(zip(frames, images)):
        assert np.abs(frame.image.astype(int) - image).mean() < 4
        assert frame.stamp_ns == START + i * 100_000_000 and frame.frame_id == "camera"
    from rosbags.highlevel import AnyReader
    with AnyReader([out]) as any_reader:
        conn, _, raw = next(any_reader.messages())
        assert any_reader.deserialize(raw, conn.msgtype).format == "rgb8; jpeg compressed bgr8"


def test_write_refuses_overwrite(tmp_path: Path) -> None:
    """write_image_bag never overwrites an existing output and names it in the error."""
    folder = image_folder(tmp_path / "imgs", synthetic_images(1))
    (tmp_path / "bag").mkdir()
    with pytest.raises(FileExistsError, match="bag"):
        write_image_bag(folder, tmp_path / "bag")


def test_ros1_bag(tmp_path: Path) -> None:
    """A ROS 1 .bag with rgb8, bgr8 and compressed topics reads back correctly."""
    images = synthetic_images(2)
    path = tmp_path / "old.bag"
    with Writer1(path) as writer:
        conns = {t: writer.add_connection(t, m, typestore=TS1) for t, m in [
            ("/rgb", "sensor_msgs/msg/Image"), ("/bgr", "sensor_msgs/msg/Image"),
            ("/jpeg", "sensor_msgs/msg/CompressedImage")]}
        for i, image in enumerate(images):
            t = START + i * 10**8
            writer.write(conns["/rgb"], t, TS1.serialize_ros1(image_msg(TS1, image, "rgb8", t, ros1=True),
                                                              "sensor_msgs/msg/Image"))
            writer.write(conns["/bgr"], t + 1, TS1.serialize_ros1(image_msg(TS1, image, "bgr8", t + 1, ros1=True),
                                                                  "sensor_msgs/msg/Image"))
            writer.write(conns["/jpeg"], t + 2, TS1.serialize_ros1(compressed_msg(TS1, image, t + 2, ros1=True),
                                                                   "sensor_msgs/msg/CompressedImage"))
    frames = list(BagImageReader([path]))
    by_topic = {topic: [f for f in frames if f.topic == topic] for topic in ("/rgb", "/bgr", "/jpeg")}
    for i, image in enumerate(images):
        np.testing.assert_array_equal(by_topic["/rgb"][i].image, image)
        np.testing.assert_array_equal(by_topic["/bgr"][i].image, image)
        assert np.abs(by_topic["/jpeg"][i].image.astype(int) - image).mean() < 4
        assert by_topic["/bgr"][i].stamp_ns == START + i * 10**8 + 1 and by_topic["/rgb"][i].frame_id == "cam"


def test_encodings(tmp_path: Path) -> None:
    """bgr8, mono8 and rgba8 Image messages decode to the right RGB."""
    image = synthetic_images(1)[0]
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    msgs = [(f"/{enc}", "sensor_msgs/msg/Image", START + i, image_msg(TS2, image, enc, START + i))
            for i, enc in enumerate(("bgr8", "mono8", "rgba8"))]
    frames = {f.topic: f.image for f in BagImageReader([write_ros2(tmp_path / "bag", msgs)])}
    np.testing.assert_array_equal(frames["/bgr8"], image)
    np.testing.assert_array_equal(frames["/mono8"], np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(frames["/rgba8"], image)


def test_corrupt_messages_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage bytes, truncated data and a garbage JPEG are counted, warned about and skipped."""
    images = synthetic_images(4)
    truncated = image_msg(TS2, images[0], "rgb8", START + 3)
    truncated.data = truncated.data[:-10]
    msgs = [
        ("/raw", "sensor_msgs/msg/Image", START, image_msg(TS2, images[0], "rgb8", START)),
        ("/raw", "sensor_msgs/msg/Image", START + 1, b"\x00\x01\x00\x00garbage"),
        ("/jpeg", "sensor_msgs/msg/CompressedImage", START + 2, compressed_msg(TS2, images[1], START + 2)),
        ("/raw", "sensor_msgs/msg/Image", START + 3, truncated),
        ("/jpeg", "sensor_msgs/msg/CompressedImage", START + 4, compressed_msg(TS2, None, START + 4, data=b"notajpeg")),
        ("/raw", "sensor_msgs/msg/Image", START + 5, image_msg(TS2, images[2], "rgb8", START + 5)),
        ("/jpeg", "sensor_msgs/msg/CompressedImage", START + 6, compressed_msg(TS2, images[3], START + 6)),
    ]
    reader = BagImageReader([write_ros2(tmp_path / "bag", msgs)])
    with caplog.at_level(logging.WARNING, logger="uncertain_seg_ros.bags"):
        frames = list(reader)
    assert [(f.topic, f.index) for f in frames] == [("/raw", 0), ("/jpeg", 0), ("/raw", 3), ("/jpeg", 2)]
    np.testing.assert_array_equal(frames[2].image, images[2])
    assert reader.stats.corrupt == 3 and reader.stats.kept == 4 and reader.stats.read == 7
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "/raw" in warnings[0] and "index 1" in warnings[0]
    assert "/raw" in warnings[1] and "index 2" in warnings[1]
    assert "/jpeg" in warnings[2] and "index 1" in warnings[2]


def test_topics_missing_and_non_image(tmp_path: Path) -> None:
    """A missing topic is an error listing the topics; a String topic is ignored by default, rejected on request."""
    image = synthetic_images(1)[0]
    path = write_ros2(tmp_path / "bag", [
        ("/cam", "sensor_msgs/msg/Image", START, image_msg(TS2, image, "rgb8", START)),
        ("/chatter", "std_msgs/msg/String", START + 1, TS2.types["std_msgs/msg/String"](data="hello")),
    ])
    with pytest.raises(BagTopicError) as err:
        BagImageReader([path], topics=["/nope"])
    assert "/nope" in str(err.value) and "/cam [sensor_msgs/msg/Image]" in str(err.value)
    assert "/chatter [std_msgs/msg/String]" in str(err.value)
    reader = BagImageReader([path])
    assert reader.topics == ["/cam"] and len(list(reader)) == 1
    with pytest.raises(BagTopicError, match="/chatter"):
        BagImageReader([path], topics=["/chatter"])


def test_missing_bag_path(tmp_path: Path) -> None:
    """A missing bag raises BagOpenError naming the path."""
    with pytest.raises(BagOpenError, match="missing_bag"):
        BagImageReader([tmp_path / "missing_bag"])
    with pytest.raises(BagOpenError, match="missing_bag"):
        bag_info([tmp_path / "missing_bag"])


def test_sampling_counters(tmp_path: Path) -> None:
    """stride, min_interval_s and dedupe skip what they should and count it."""
    images = synthetic_images(10)
    path = write_image_bag(image_folder(tmp_path / "imgs", images), tmp_path / "bag", fps=10.0, start_ns=START)
    reader = BagImageReader([path], stride=3)
    assert [f.index for f in reader] == [0, 3, 6, 9]
    assert (reader.stats.read, reader.stats.kept, reader.stats.skipped_stride) == (10, 4, 6)
    reader = BagImageReader([path], min_interval_s=0.25)
    assert [f.index for f in reader] == [0, 3, 6, 9]
    assert (reader.stats.kept, reader.stats.skipped_interval) == (4, 6)

    still = synthetic_images(1)[0]
    moved = synthetic_images(2)[1]
    dup = image_folder(tmp_path / "dup", [still] * 5 + [moved])
    reader = BagImageReader([write_image_bag(dup, tmp_path / "dupbag", start_ns=START)],
                            dedupe_threshold=bags.DEFAULT_DEDUPE_THRESHOLD)
    assert [f.index for f in reader] == [0, 5]
    s = reader.stats
    assert (s.read, s.kept, s.skipped_duplicate, s.skipped_stride, s.skipped_interval, s.corrupt) == (6, 2, 4, 0, 0, 0)


def test_several_bags_and_zero_stamp(tmp_path: Path) -> None:
    """Bags are read in the given order; a zero header stamp falls back to the receive time."""
    images = synthetic_images(2)
    later = write_image_bag(image_folder(tmp_path / "a", images[:1]), tmp_path / "later", start_ns=START + 10**9)
    zero = write_ros2(tmp_path / "zero", [("/camera/image_raw", "sensor_msgs/msg/Image", START,
                                           image_msg(TS2, images[1], "rgb8", 0))], storage="sqlite3")
    frames = list(BagImageReader([later, zero]))
    assert [(f.bag, f.stamp_ns) for f in frames] == [(later, START + 10**9), (zero, START)]


def test_streaming_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first frame comes out after one message was read and decoded, not the whole bag."""
    path = write_image_bag(image_folder(tmp_path / "imgs", synthetic_images(6)), tmp_path / "bag", start_ns=START)
    calls = []
    decode = bags._decode_message
    monkeypatch.setattr(bags, "_decode_message", lambda *a: calls.append(1) or decode(*a))
    reader = BagImageReader([path])
    frames = iter(reader)
    first = next(frames)
    assert first.index == 0 and len(calls) == 1 and reader.stats.read == 1
    next(frames)
    assert len(calls) == 2 and reader.stats.read == 2
    frames.close()


def test_bag_info(tmp_path: Path) -> None:
    """bag_info reports per bag: counts, types, rates and which topics are images."""
    image = synthetic_images(1)[0]
    msgs = [("/cam", "sensor_msgs/msg/Image", START + i * 50_000_000, image_msg(TS2, image, "rgb8", START))
            for i in range(5)]
    msgs.append(("/chatter", "std_msgs/msg/String", START, TS2.types["std_msgs/msg/String"](data="x")))
    path = write_ros2(tmp_path / "bag", msgs)
    infos = {i.name: i for i in bag_info([path])}
    assert infos["/cam"].msgtype == "sensor_msgs/msg/Image" and infos["/cam"].count == 5 and infos["/cam"].is_image
    assert infos["/cam"].rate_hz == pytest.approx(20.0) and infos["/cam"].bag == path
    assert infos["/chatter"].count == 1 and infos["/chatter"].rate_hz is None and not infos["/chatter"].is_image


# What rosbag2 writes into metadata.yaml for a publisher with the default QoS (reliable, volatile, depth 10).
OFFERED_QOS = [{"history": "keep_last", "depth": 10, "reliability": "reliable", "durability": "volatile",
                "deadline": {"sec": 9223372036, "nsec": 854775807}, "lifespan": {"sec": 9223372036, "nsec": 854775807},
                "liveliness": "automatic", "liveliness_lease_duration": {"sec": 9223372036, "nsec": 854775807},
                "avoid_ros_namespace_conventions": False}]


def test_bag_info_says_when_the_reader_disagrees_with_the_bags_index(tmp_path: Path, capsys) -> None:
    """A rosbag2 whose metadata.yaml lists offered QoS that its MCAP channel does not carry: rosbags matches the
    topic to the channel by name, type and QoS, yields none of the 5 messages the metadata lists, and
    ``bag info`` says so instead of printing 0 as fact (the case of real rosbag2 talker bags: 0 of 10)."""
    image = synthetic_images(1)[0]
    path = write_ros2(tmp_path / "bag", [("/chatter", "sensor_msgs/msg/Image", START + i * 10**8,
                                           image_msg(TS2, image, "rgb8", START)) for i in range(5)])
    meta_file = path / "metadata.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    meta["rosbag2_bagfile_information"]["topics_with_message_count"][0]["topic_metadata"]["offered_qos_profiles"] = OFFERED_QOS
    meta_file.write_text(yaml.safe_dump(meta))
    info = bag_info([path])[0]
    assert (info.count, info.metadata_count, info.count_disagrees) == (0, 5, True)
    assert cli_main(["bag", "info", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[3:6] == ["0", "(index:", "5)"]
    assert "the bag's index lists 5 messages but the reader (rosbags) yielded 0" in captured.err
    good = write_ros2(tmp_path / "good", [("/cam", "sensor_msgs/msg/Image", START, image_msg(TS2, image, "rgb8", START))])
    assert not bag_info([good])[0].count_disagrees and bag_info([good])[0].metadata_count == 1


def test_extract_frames(tmp_path: Path) -> None:
    """extract_frames writes <out>/<topic>/<stamp_ns>.png files equal to the images."""
    images = synthetic_images(3)
    path = write_image_bag(image_folder(tmp_path / "imgs", images), tmp_path / "bag", start_ns=START)
    assert extract_frames([path], tmp_path / "out", progress=False) == 3
    files = sorted((tmp_path / "out" / "camera_image_raw").iterdir())
    assert [f.name for f in files] == [f"{START + i * 100_000_000}.png" for i in range(3)]
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(files[1])), cv2.COLOR_BGR2RGB), images[1])


def test_cli_write_info_extract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bag write, info and extract through the command line produce a bag, a table and files."""
    folder = image_folder(tmp_path / "imgs", synthetic_images(4))
    bag = tmp_path / "bag"

    def run(*argv: str) -> str:
        assert cli_main(list(argv)) == 0
        return capsys.readouterr().out

    run("bag", "write", str(folder), "--out", str(bag), "--fps", "5", "--storage", "sqlite3", "--frame-id", "f")
    assert (bag / "metadata.yaml").exists() and list(bag.glob("*.db3"))
    table = run("bag", "info", str(bag)).splitlines()
    assert table[0].split() == ["bag", "topic", "type", "count", "rate"]
    assert table[1].split() == [str(bag), "/camera/image_raw", "sensor_msgs/msg/Image", "4", "5.00", "Hz"]
    out = run("bag", "extract", str(bag), "--out", str(tmp_path / "frames"), "--stride", "2", "--format", "jpg")
    assert "read 4" in out and "kept 2" in out and "stride 2" in out and "corrupt 0" in out
    assert len(list((tmp_path / "frames" / "camera_image_raw").glob("*.jpg"))) == 2
    assert cli_main(["bag", "write", str(folder), "--out", str(bag)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uncertain-seg bag write: error: ") and "exists" in err and len(err.splitlines()) == 1

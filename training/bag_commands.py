"""``uncertain-seg bag ...``: look into bags, extract camera frames for training, and turn images into bags.

Thin wrappers over :mod:`uncertain_seg_ros.bags` (pure Python ``rosbags``, no ROS install needed),
imported only when a bag command runs. :func:`register` returns the ``bag`` sub-command table so that
another package can add more (``bag play``) to it.
"""
from __future__ import annotations

import argparse
import sys

BAG_DESCRIPTION = """\
Camera images in and out of ROS bags (rosbag2 folders with sqlite3 or mcap storage, bare .mcap/.db3
files, ROS 1 .bag files), read with the pure-Python rosbags library: no ROS install needed.

A damaged bag (a recording cut off, a corrupt record or page) is read as far as it is intact,
with what was lost in the summary.

Errors (a missing bag, an unknown topic, an existing --out) are one line with exit code 2.
"""


def _info(args: argparse.Namespace) -> int:
    from uncertain_seg_ros.bags import bag_info

    infos = bag_info(args.bags)
    rows = [("bag", "topic", "type", "count", "rate")]
    rows += [(str(i.bag), i.name, i.msgtype, f"{i.count} (index: {i.metadata_count})" if i.count_disagrees else str(i.count),
              "-" if i.rate_hz is None else f"{i.rate_hz:.2f} Hz") for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        cells = [cell.rjust(w) if c >= 3 else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    for i in infos:
        if i.count_disagrees:
            print(f"warning: {i.bag} {i.name}: the bag's index lists {i.metadata_count} messages but the reader "
                  f"(rosbags) yielded {i.count}, so count and rate above are of what could be read. rosbags matches "
                  "a rosbag2 topic to its storage channel by name, type and offered QoS; another reader (e.g. "
                  "ros2 bag info, the mcap CLI) may read them", file=sys.stderr)
    return 0


def _extract(args: argparse.Namespace) -> int:
    from uncertain_seg_ros.bags import BagImageReader, write_frames

    reader = BagImageReader(args.bags, args.topic, stride=args.stride, min_interval_s=args.min_interval,
                            dedupe_threshold=args.dedupe)
    count = write_frames(reader, args.out, fmt=args.format)
    stats = reader.stats
    print(f"extracted {count} frames to {args.out}")
    print(f"read {stats.read}  kept {stats.kept}  skipped stride {stats.skipped_stride}  "
          f"interval {stats.skipped_interval}  duplicate {stats.skipped_duplicate}  corrupt {stats.corrupt}")
    for line in stats.damaged:
        print(f"damaged bag {line}")
    return 0


def _write(args: argparse.Namespace) -> int:
    from uncertain_seg_ros.bags import write_image_bag

    out = write_image_bag(args.images, args.out, topic=args.topic, fps=args.fps, compressed=args.compressed,
                          storage=args.storage, frame_id=args.frame_id, encoding=args.encoding)
    topic = f"{args.topic.rstrip('/')}/compressed" if args.compressed else args.topic
    print(f"wrote {out} ({args.storage}, topic {topic})")
    return 0


def _info_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folder, .mcap/.db3 file or ROS 1 .bag file")
    p.set_defaults(func=_info)


def _extract_options(p: argparse.ArgumentParser) -> None:
    from uncertain_seg_ros.bags import DEFAULT_DEDUPE_THRESHOLD

    p.description = (
        "Streams sensor_msgs Image/CompressedImage topics out of one or more bags (in the given order) and writes "
        "each kept frame as OUT/<topic folder>/<stamp_ns>.<format>, the topic folder being the topic without its "
        "leading / and with / as _ (/camera/image_raw -> camera_image_raw). Sampling is per topic: --stride first, "
        "then --min-interval on the header stamps, then --dedupe on 32x24 grey thumbnails. Corrupt messages "
        "are logged, counted and skipped; a damaged bag (an MCAP file cut off by a killed recorder, a corrupt record, "
        "a chunk failing its CRC, a corrupt sqlite3 page) is read as far as it is intact and the summary says what "
        "was lost. Example: uncertain-seg bag extract run1/ run2/ --out frames "
        f"--topic /camera/image_raw/compressed --min-interval 0.5 --dedupe {DEFAULT_DEDUPE_THRESHOLD}")
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folder, .mcap/.db3 file or ROS 1 .bag file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (one sub-folder per topic)")
    p.add_argument("--topic", action="append", metavar="T",
                   help="image topic to extract; repeat for several (default: every image topic)")
    p.add_argument("--stride", type=int, default=1, metavar="N", help="keep every N-th message per topic (default: 1)")
    p.add_argument("--min-interval", type=float, default=0.0, metavar="S",
                   help="skip a frame closer than S seconds to the last kept one of its topic (default: 0)")
    p.add_argument("--dedupe", type=float, default=None, metavar="T",
                   help="skip near-duplicate frames (robot standing still): mean absolute difference of grey "
                        f"thumbnails in [0, 1] below T; {DEFAULT_DEDUPE_THRESHOLD} is a good start (default: off)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format (default: png)")
    p.set_defaults(func=_extract)


def _write_options(p: argparse.ArgumentParser) -> None:
    from uncertain_seg_ros.bags import STORAGES, WRITE_ENCODINGS

    p.add_argument("images", metavar="IMAGES_DIR", help="folder of images (png, jpg, ...)")
    p.add_argument("--out", required=True, metavar="BAG", help="bag folder to create (must not exist)")
    p.add_argument("--topic", default="/camera/image_raw", metavar="T", help="topic (default: /camera/image_raw)")
    p.add_argument("--fps", type=float, default=10.0, metavar="F", help="frames per second (default: 10)")
    p.add_argument("--compressed", action="store_true", help="JPEG CompressedImage on <topic>/compressed")
    p.add_argument("--storage", choices=tuple(STORAGES), default="mcap", help="storage plugin (default: mcap)")
    p.add_argument("--frame-id", default="camera", metavar="F", help="header.frame_id (default: camera)")
    p.add_argument("--encoding", choices=WRITE_ENCODINGS, default="rgb8",
                   help="raw Image encoding; with --compressed rgb8/bgr8 give colour JPEGs, mono8 grey (default: rgb8)")
    p.set_defaults(func=_write)


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``bag`` command (info, extract, write) to ``subparsers``; return the bag-level sub-parsers."""
    bag = subparsers.add_parser("bag", help="inspect bags, extract camera frames, write images as a bag, play a bag",
                                description=BAG_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bag_sub = bag.add_subparsers(dest="bag_command", required=True, metavar="SUBCOMMAND")
    bag_sub.add_parser("info", help="list the topics of bags with type, count and rate", options=_info_options,
                       description=(
        "Prints one row per topic of each bag: bag, topic, message type, message count and rate (from the first "
        "and last receive times; '-' with fewer than two messages). Reads every message once, deserialises none. "
        "Where the count read differs from the bag's own index, the row shows both and a warning says so."))
    bag_sub.add_parser("extract", help="write the frames of image topics as image files", options=_extract_options)
    bag_sub.add_parser("write", help="write a folder of images as a rosbag2 bag", options=_write_options, description=(
        "Writes the images of IMAGES_DIR (sorted by name) as a rosbag2 bag, one message per image, stamps 1/fps "
        "apart with header.stamp = bag time: sensor_msgs/msg/Image on --topic, or with --compressed a JPEG "
        "sensor_msgs/msg/CompressedImage on <topic>/compressed (image_transport's format string). Never "
        "overwrites --out. Handy for testing the node on a dataset: ros2 bag play OUT."))
    return bag_sub

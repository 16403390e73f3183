"""``uncertain-seg bag play``: a real process publishing a real bag into a real ROS 2 graph."""
import os
import subprocess

import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from uncertain_seg_ros.bags import write_image_bag
from uncertain_seg_ros.image_encoding import compressed_to_rgb8, image_to_rgb8
from uncertain_seg_ros.image_files import read_rgb

from conftest import installed_script
from ros_graph import Tester, isolate


@pytest.mark.parametrize("compressed", [False, True])
def test_bag_play_publishes_every_frame_as_recorded(labelled_folder, tmp_path, compressed):
    isolate()
    bag = write_image_bag(labelled_folder / "images", tmp_path / "bag", topic="/cam/image_raw", fps=20, compressed=compressed)
    topic, msg_type = ("/cam/image_raw/compressed", CompressedImage) if compressed else ("/cam/image_raw", Image)
    tester = Tester("bag_play_tester")
    try:
        tester.subscribe(msg_type, topic, qos="transient_local")
        cli = installed_script()
        proc = subprocess.run([str(cli), "bag", "play", str(bag), "--rate", "2", "--qos", "transient_local"],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{topic}: 6 messages" in proc.stdout
        tester.wait(lambda: len(tester.messages(topic)) == 6, 20, "6 frames")
        msgs = tester.messages(topic)
        stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in msgs]
        assert stamps == sorted(stamps) and np.allclose(np.diff(stamps), 5e7)
        first = read_rgb(sorted((labelled_folder / "images").iterdir())[0])
        if compressed:
            got = compressed_to_rgb8(msgs[0].format, msgs[0].data)
            assert np.abs(got.astype(int) - first).mean() < 10  # JPEG of a noisy synthetic frame
        else:
            m = msgs[0]
            assert np.array_equal(image_to_rgb8(m.encoding, m.height, m.width, m.step, m.is_bigendian, m.data), first)
    finally:
        tester.close()


def test_bag_play_missing_topic_lists_the_bag_topics(labelled_folder, tmp_path):
    bag = write_image_bag(labelled_folder / "images", tmp_path / "bag", topic="/cam/image_raw")
    cli = installed_script()
    proc = subprocess.run([str(cli), "bag", "play", str(bag), "--topic", "/nope"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "/cam/image_raw (sensor_msgs/msg/Image)" in proc.stderr


def test_bag_play_says_which_subscribers_matched_late(labelled_folder, tmp_path):
    """The manual node + record + bag play pipeline lost frames silently: the player starts once it sees one
    subscriber, and one that matches later misses what was sent before (volatile QoS). The player now says so.
    Also: --remap no longer reaches rcl (no "This syntax is deprecated" warning) and applies."""
    isolate()
    bag = write_image_bag(labelled_folder / "images", tmp_path / "bag", topic="/cam/image_raw", fps=2)
    early, late = Tester("early_subscriber"), Tester("late_subscriber")
    try:
        early.subscribe(Image, "/front/image_raw")
        proc = subprocess.Popen([installed_script(), "bag", "play", str(bag), "--remap", "/cam/image_raw:=/front/image_raw"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        early.wait(lambda: len(early.messages("/front/image_raw")) >= 1, 60, "the first frame")
        late.subscribe(Image, "/front/image_raw")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "/cam/image_raw: 6 messages" in out and len(early.messages("/front/image_raw")) == 6
        assert len(late.messages("/front/image_raw")) < 6
        assert ("warning: /cam/image_raw: 1 subscriber(s) when playing started, 2 at the end: the later one(s) missed "
                "the messages sent before they matched. Give --wait-subscribers 2") in err
        assert "deprecated" not in err
    finally:
        early.close()
        late.close()

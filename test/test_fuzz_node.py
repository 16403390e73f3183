"""A short fuzz run of the real node on a real graph (benchmarks/fuzz_node.py, 800 messages in 16 s):
it stays up, answers after the storm, accounts for every frame, stays small, and its log stays the
ROS logger's. The committed, longer run is benchmarks/results/fuzz_node.md."""
import json
import subprocess
import sys

from conftest import REPO


def test_short_fuzz_run(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fuzz_node.py"), "--messages", "800", "--rate", "50",
                           "--large-every", "0", "--settle", "5", "--workdir", str(tmp_path), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["messages_sent"] == 800 and r["final_frames_answered"] and r["node_alive_at_end"] and r["node_exit_code"] == 0
    assert r["good_answered"] > 0
    for camera, c in r["node_counters"].items():
        # every frame the node received ended in exactly one outcome (labels are subscribed: none skipped)
        assert c["frames_received"] == c["frames_processed"] + c["frames_bad"] + c["frames_dropped"] + c["frames_failed"], camera
        assert c["frames_failed"] == 0 and c["frames_bad"] > 0
    # a PNG bomb decoded to RGB alone would take 300 MB; the good frames are 96x72
    assert r["memory_mb"]["peak_rss_during"] - r["memory_mb"]["rss_before"] < 250, r["memory_mb"]
    assert r["log"]["not_from_the_ros_logger"] == 0
    assert r["log"]["unsupported_encoding_errors"] == 2  # once per camera topic

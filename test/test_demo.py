"""The README's first command's job: ``uncertain-seg demo`` on the shipped sample bag and demo bundle."""
import json
import os
import subprocess

import cv2

from conftest import installed_script


def test_demo_answers_every_frame_and_writes_a_montage(tmp_path):
    """Node process + player + recorder on a private ROS domain: 5 frames in, every output out, montage."""
    out = tmp_path / "demo_output"
    cli = installed_script()
    proc = subprocess.run([str(cli), "demo", "--out", str(out), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + (out / "node.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == 5 and summary["all_frames_answered"]
    assert set(summary["frames_out"].values()) == {5}
    assert "frames in: 5" in proc.stdout and "p95" in proc.stdout
    montage = cv2.imread(str(out / "montage.png"))
    assert montage is not None and montage.shape[1] > 1000
    for kind in ("input", "labels", "labels_color", "uncertainty", "uncertainty_color", "mask", "overlay"):
        files = sorted((out / kind).glob("*.png"))
        assert len(files) == 5, kind
        image = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
        assert image.shape[:2] == (360, 480), kind
    assert cv2.imread(str(next((out / "uncertainty").glob("*.png"))), cv2.IMREAD_UNCHANGED).dtype.name == "uint16"
    assert {p.name for p in out.iterdir()} == {"input", "labels", "labels_color", "uncertainty", "uncertainty_color", "mask",
                                               "overlay", "montage.png", "summary.json", "node.log", "README.txt"}
    assert "looks black" in (out / "README.txt").read_text()  # labels/ and uncertainty/ are data, said where one looks

"""The shipped Fast DDS profile for large images, how processes pick it up, and that it delivers.

Fast DDS's default 512 KiB shared-memory segment drops a burst of 518 kB images, which a reliable
reader then gets only after the writer's next heartbeat (3 s); with the profile nothing has to be
resent, so every frame's six answers arrive well inside that period.
"""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from uncertain_seg_ros.ros.dds_transport import (
    PROFILE_VARIABLES, large_image_profile, transport_environment, transport_settings)

from conftest import REPO

NS = {"f": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
HEARTBEAT_PERIOD_MS = 3000.0  # Fast DDS's default reliable-writer heartbeat: the earliest a lost sample is resent


def test_profile_is_the_shipped_config_file_and_gives_shared_memory_room_for_an_output_burst():
    path = large_image_profile()
    assert path == REPO / "config" / "fastdds_large_images.xml"
    root = ET.parse(path).getroot()
    descriptors = {d.find("f:transport_id", NS).text: d for d in root.iterfind("f:transport_descriptors/f:transport_descriptor", NS)}
    participant = root.find("f:participant", NS)
    assert participant.get("is_default_profile") == "true"
    assert participant.find("f:rtps/f:useBuiltinTransports", NS).text == "false"
    used = [t.text for t in participant.iterfind("f:rtps/f:userTransports/f:transport_id", NS)]
    assert used and set(used) <= set(descriptors)
    kinds = {descriptors[t].find("f:type", NS).text: descriptors[t] for t in used}
    assert {"SHM", "UDPv4"} <= set(kinds), "shared memory on the host, UDP for discovery and other hosts"
    assert int(kinds["SHM"].find("f:segment_size", NS).text) >= 6 * 1920 * 1080 * 3


def test_environment_points_both_fast_dds_generations_at_the_profile():
    env = transport_environment(large_image_profile(), {})
    assert env == {var: str(large_image_profile()) for var in PROFILE_VARIABLES}


@pytest.mark.parametrize("var", ["FASTRTPS_DEFAULT_PROFILES_FILE", "FASTDDS_DEFAULT_PROFILES_FILE", "FASTDDS_BUILTIN_TRANSPORTS"])
def test_a_transport_choice_already_in_the_environment_is_kept(var):
    assert transport_environment(large_image_profile(), {var: "anything"}) == {}
    assert transport_settings({var: "anything"})[var] == "anything"


def test_no_profile_and_a_missing_profile(tmp_path):
    assert transport_environment(None, {}) == {}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transport_environment(tmp_path / "missing.xml", {})


def test_with_the_profile_a_burst_of_large_images_needs_no_resending(tmp_path):
    """Real processes on a private domain: a 518 kB frame out, six 518 kB answers back, three times."""
    out = tmp_path / "dds.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "dds_transport.py"), "--settings", "shipped profile",
                    "--rounds", "3", "--json", str(out)], check=True, timeout=300)
    result = json.loads(out.read_text())["results"][0]
    assert result["answered"] == 3 and result["lost"] == 0
    assert result["max_ms"] < HEARTBEAT_PERIOD_MS / 2, result["latencies_ms"]

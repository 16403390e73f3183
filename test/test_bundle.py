"""The model bundle: round trip, and refusal of missing, truncated, tampered or mismatched bundles."""
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uncertain_seg_ros.bundle import (ARCHITECTURE_METADATA, CHECKSUMS_FILE, CONFIG_FILE, WEIGHTS_FILE, BundleError, load_bundle,
                                     save_bundle, sha256_file, weights_digest)
from uncertain_seg_ros.model import UncertainSegmenter
from uncertain_seg_ros.resources import resolve_bundle

from conftest import tiny_bundle_config


def _rewrite_checksums(path):
    """What a careless user does after editing a file: make the checksums agree again."""
    (path / CHECKSUMS_FILE).write_text("".join(f"{sha256_file(path / n)}  {n}\n" for n in (WEIGHTS_FILE, CONFIG_FILE)))


def test_round_trip_preserves_weights_and_config(tiny_bundle):
    """A saved bundle loads to the same weights, config and a model id from the weights' sha256
    (read with the metadata sorted, see test_same_weights_same_model_id)."""
    b = load_bundle(tiny_bundle)
    assert b.config == tiny_bundle_config()
    state = load_file(str(tiny_bundle / WEIGHTS_FILE))
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, state[k])
    assert b.model_id == weights_digest(tiny_bundle / WEIGHTS_FILE)[:12] and b.model_checksum.startswith(b.model_id)
    assert not b.model.training
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, CHECKSUMS_FILE])


def test_no_pickle_in_bundle(tiny_bundle):
    """Weights are safetensors (a JSON header, no pickle opcodes); the config is JSON."""
    raw = (tiny_bundle / WEIGHTS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    json.loads(raw[8 : 8 + header_len])
    assert b"\x80\x04" not in raw[:2] and not raw.startswith(b"PK")
    json.loads((tiny_bundle / CONFIG_FILE).read_text())


@pytest.mark.parametrize("missing", [WEIGHTS_FILE, CONFIG_FILE, CHECKSUMS_FILE])
def test_missing_file_is_named(tiny_bundle, missing):
    (tiny_bundle / missing).unlink()
    with pytest.raises(BundleError, match=missing.replace(".", r"\.")):
        load_bundle(tiny_bundle)


def test_not_a_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_truncated_weights_refused(tiny_bundle):
    """A half-copied weights file fails the checksum, and the message says so."""
    f = tiny_bundle / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BundleError, match=r"checksum mismatch for .*model\.safetensors.*modified or truncated"):
        load_bundle(tiny_bundle)


def test_tampered_weight_refused(tiny_bundle):
    """One flipped byte deep inside the tensor data is caught."""
    f = tiny_bundle / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(tiny_bundle)


def test_tampered_config_refused(tiny_bundle):
    f = tiny_bundle / CONFIG_FILE
    cfg = json.loads(f.read_text())
    cfg["mask_threshold"] = 0.01
    f.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=r"checksum mismatch for .*config\.json"):
        load_bundle(tiny_bundle)


def test_truncated_weights_with_matching_checksum_refused(tiny_bundle):
    """Even with re-computed checksums, an unreadable safetensors file is reported as such."""
    f = tiny_bundle / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:1000])
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match="not a readable safetensors file"):
        load_bundle(tiny_bundle)


def test_wrong_architecture_refused(tiny_bundle):
    """Weights of another architecture under this config: the message names the mismatching tensors."""
    other = tiny_bundle_config()
    bigger = UncertainSegmenter(other.model.__class__(3, other.model.backbone.__class__(
        **{**other.model.backbone.to_dict(), "embed_dim": 64}), n_last_blocks=2, uncertainty_hidden=16))
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(tiny_bundle / WEIGHTS_FILE))
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=r"does not match the architecture.*embed_dim=48.*shape mismatches"):
        load_bundle(tiny_bundle)


def test_missing_tensor_refused(tiny_bundle):
    state = load_file(str(tiny_bundle / WEIGHTS_FILE))
    del state["head.conv.weight"]
    save_file(state, str(tiny_bundle / WEIGHTS_FILE))
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=r"missing 1 tensors.*head\.conv\.weight"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("classes"), "missing field 'classes'"),
        (lambda c: c.update(format_version=99), "format_version 99 is not supported"),
        (lambda c: c.update(uncertainty_source="vibes"), "uncertainty_source 'vibes'"),
        (lambda c: c["input"].update(height=57), "multiples of 14"),
        (lambda c: c["classes"].pop(), "2 classes listed but the model has 3 outputs"),
        (lambda c: c["calibration"].update(temperature=-1), r"calibration\.temperature is -1; it must be > 0"),
    ],
)
def test_invalid_config_refused(tiny_bundle, edit, message):
    f = tiny_bundle / CONFIG_FILE
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=message):
        load_bundle(tiny_bundle)


def test_config_not_json_refused(tiny_bundle):
    (tiny_bundle / CONFIG_FILE).write_text("{not json")
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny_bundle)


def test_failed_save_keeps_previous_bundle(tiny_bundle):
    """Export is atomic: a failing save leaves the old bundle intact and no temporary folders."""
    before = sha256_file(tiny_bundle / WEIGHTS_FILE)
    config = tiny_bundle_config()
    wrong = UncertainSegmenter(tiny_bundle_config(num_classes=2).model)
    with pytest.raises(ValueError, match="architecture differs"):
        save_bundle(tiny_bundle, wrong, config)
    assert sha256_file(tiny_bundle / WEIGHTS_FILE) == before
    assert [p.name for p in tiny_bundle.parent.iterdir()] == ["bundle"]
    load_bundle(tiny_bundle)


def test_save_replaces_existing_bundle(tiny_bundle):
    config = tiny_bundle_config()
    model = UncertainSegmenter(config.model)
    save_bundle(tiny_bundle, model, config)
    assert torch.equal(load_bundle(tiny_bundle).model.head.conv.weight, model.head.conv.weight)
    assert [p.name for p in tiny_bundle.parent.iterdir()] == ["bundle"]


def test_copied_bundle_loads(tiny_bundle, tmp_path):
    """Bundles are relocatable folders (checksums hold relative names)."""
    copy = shutil.copytree(tiny_bundle, tmp_path / "elsewhere" / "b")
    assert load_bundle(copy).model_id == load_bundle(tiny_bundle).model_id


def _edit_config(path, edit):
    f = path / CONFIG_FILE
    cfg = json.loads(f.read_text())
    edit(cfg)
    f.write_text(json.dumps(cfg))
    _rewrite_checksums(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["input"].update(std=[0.229, 0.0, 0.225]), r"input\.std\[1\] is 0\.0; it must be > 0"),
    (lambda c: c["input"].update(std=[0.229, -0.224, 0.225]), r"input\.std\[1\] is -0\.224; it must be > 0"),
    (lambda c: c["input"].update(mean=[0.5, 0.5]), r"input\.mean is \[0\.5, 0\.5\]; it must be a list of 3 numbers"),
    (lambda c: c["input"].update(mean=["0.5", 0.5, 0.5]), r"input\.mean\[0\] is '0\.5'; it must be a finite number"),
    (lambda c: c["input"].update(height=56.0), r"input\.height is 56\.0; it must be an integer"),
    (lambda c: c["calibration"].update(selective_temperature=float("inf")),
     r"calibration\.selective_temperature is inf; it must be a finite number"),
    (lambda c: c["calibration"].update(temperature=float("nan")), r"calibration\.temperature is nan"),
    (lambda c: c.update(mask_treshold=0.2), r"unknown field 'mask_treshold' \(did you mean 'mask_threshold'\?\)"),
    (lambda c: c["input"].update(mena=[0, 0, 0]), r"unknown field 'input\.mena' \(did you mean 'input\.mean'|unknown field 'input\.mena'"),
    (lambda c: c["model"]["backbone"].update(num_heads=5), r"num_heads 5 does not divide embed_dim 48"),
    (lambda c: c["model"]["backbone"].update(depth=2.0), r"model\.backbone\.depth is 2\.0; it must be an integer"),
    (lambda c: c["model"].update(selector_hidden=True), r"model\.selector_hidden is True; it must be an integer"),
    (lambda c: c["calibration"].update(method="selective"), r"calibration\.method is 'selective' but model\.selector_hidden is 0"),
    (lambda c: c["classes"][0].update(color=[1.5, 0, 0]), r"classes\[0\]\.color\[0\] is 1\.5; it must be an integer"),
    (lambda c: c.update(mask_threshold="0.5"), r"mask_threshold is '0\.5'; it must be a finite number"),
])
def test_config_values_that_would_compute_something_else_are_refused(tiny_bundle, edit, message):
    """Each edit loaded silently before (or crashed later): now refused, naming the bundle and the field."""
    _edit_config(tiny_bundle, edit)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(tiny_bundle)
    assert str(tiny_bundle / CONFIG_FILE) in str(info.value)


def test_num_heads_changed_with_same_shapes_is_refused(tiny_bundle):
    """num_heads 2 -> 4 keeps every tensor's shape (embed_dim 48) but changes the attention; the
    architecture recorded in the weights' metadata at export tells."""
    _edit_config(tiny_bundle, lambda c: c["model"]["backbone"].update(num_heads=4))
    with pytest.raises(BundleError, match=r"model\.safetensors was exported for another architecture.*"
                                          r"model\.backbone\.num_heads: config\.json says 4, the weights were exported with 2"):
        load_bundle(tiny_bundle)


def test_bundle_without_an_architecture_record_loads_with_a_warning(tiny_bundle, caplog):
    """Bundles exported before the record existed cannot be checked for such fields: they load, and say so."""
    state = load_file(str(tiny_bundle / WEIGHTS_FILE))
    save_file(state, str(tiny_bundle / WEIGHTS_FILE), metadata={"format": "pt"})
    _rewrite_checksums(tiny_bundle)
    with caplog.at_level("WARNING", logger="uncertain_seg_ros.bundle"):
        load_bundle(tiny_bundle)
    assert "exported before bundles recorded their architecture" in caplog.text


@pytest.mark.parametrize("name", ["camvid_demo", "camvid_day"])
def test_shipped_bundles_record_their_architecture(name):
    """The shipped bundles are protected against a changed num_heads too."""
    with safe_open(str(resolve_bundle(name) / WEIGHTS_FILE), "pt") as f:
        assert ARCHITECTURE_METADATA in f.metadata()


@pytest.mark.parametrize("text", ["[1, 2]", '"a bundle"', "null", "3"])
def test_config_that_is_not_an_object_is_refused(tiny_bundle, text):
    (tiny_bundle / CONFIG_FILE).write_text(text)
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=r"config\.json is invalid: the config must be a JSON object"):
        load_bundle(tiny_bundle)


def test_non_finite_weights_are_refused(tiny_bundle):
    """One NaN in a head's weights: before, every pixel became class 0 with the mask saying 'certain'."""
    state = load_file(str(tiny_bundle / WEIGHTS_FILE))
    state["head.conv.weight"].view(-1)[7] = float("nan")
    state["uncertainty_head.mlp.0.bias"].fill_(float("inf"))
    save_file(state, str(tiny_bundle / WEIGHTS_FILE))
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=r"model\.safetensors holds non-finite values \(NaN or inf\) in 2 tensors.*head\.conv\.weight"):
        load_bundle(tiny_bundle)


def test_integer_tensor_where_a_float_belongs_is_refused(tiny_bundle):
    """load_state_dict would cast an int64 tensor into the float parameter without a word."""
    state = load_file(str(tiny_bundle / WEIGHTS_FILE))
    state["head.conv.weight"] = torch.ones_like(state["head.conv.weight"], dtype=torch.int64)
    save_file(state, str(tiny_bundle / WEIGHTS_FILE))
    _rewrite_checksums(tiny_bundle)
    with pytest.raises(BundleError, match=r"1 dtype mismatches.*head\.conv\.weight: file torch\.int64 vs model torch\.float32"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/file", ".."])
def test_checksum_lines_outside_the_bundle_are_refused(tiny_bundle, name):
    """A checksums file must not make the loader read (or vouch for) files elsewhere."""
    target = tiny_bundle.parent / "outside.txt"
    target.write_text("x")
    with open(tiny_bundle / CHECKSUMS_FILE, "a") as f:
        f.write(f"{sha256_file(target)}  {name}\n")
    with pytest.raises(BundleError, match=rf"names '{re.escape(name)}', which is not a file of the bundle"):
        load_bundle(tiny_bundle)


def test_same_weights_same_model_id(tiny_bundle, tmp_path):
    """safetensors writes its metadata map in hash order, which differs from one write to the next, so
    the same weights gave files (and ids, and engine-cache keys) that differ; the id reads it sorted."""
    b = load_bundle(tiny_bundle)
    files, ids = set(), set()
    for i in range(12):
        copy = save_bundle(tmp_path / f"b{i}", b.model, b.config)
        files.add(sha256_file(copy / WEIGHTS_FILE))
        ids.add(load_bundle(copy).model_id)
    assert len(files) > 1, "every write had the same metadata order; nothing was compared"
    assert ids == {b.model_id}

"""The OpenVINO backend: PyTorch's outputs in fp32, the artefact cache, precisions the device lacks
refused with the device's reason, int8 labels on real frames, and an Intel GPU where there is one."""
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import CAMVID, REPO, camvid_frames
from uncertain_seg_ros.image_files import read_rgb
from uncertain_seg_ros.bundle import BundleConfig, ClassInfo, InputSpec, load_bundle, save_bundle
from uncertain_seg_ros.inference import (
    ArtifactCache,
    BackendUnavailable,
    Predictor,
    PredictorOptions,
    available_backends,
    create_backend,
)
from uncertain_seg_ros.inference.network import DeployedNetwork
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter, backbone_config

_REASON = available_backends("cpu")["openvino"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"openvino unavailable: {_REASON}")

DEMO = REPO / "models" / "camvid_demo"
SAMPLES = REPO / "samples" / "camvid_dusk" / "images"
# Float32 outputs computed in another summation order (other GEMM blocking, fused attention, folded
# LayerScale) differ by rounding: float32's epsilon is 1.2e-7, and a few thousand-term dot products
# through a dozen layers accumulate at most a few hundred epsilons of the output's scale. 1e-4 of the
# largest output leaves that room ten times over and is still orders of magnitude below what any
# functional difference (a missing scale, a wrong head) makes.
FP32_RELATIVE = 1e-4


def _capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _sample_frames() -> list[np.ndarray]:
    return [read_rgb(p) for p in sorted(SAMPLES.iterdir())]


def _assert_outputs_close(backend, network: DeployedNetwork, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = network(x)
    got = backend(x)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == torch.float32
        bound = FP32_RELATIVE * float(w.abs().max())
        assert float((g - w).abs().max()) <= bound, (float((g - w).abs().max()), bound)


def _label_agreement(reference, outputs) -> float:
    same = sum(int((r.labels == o.labels).sum()) for r, o in zip(reference, outputs))
    return same / sum(r.labels.size for r in reference)


def test_fp32_matches_pytorch_on_the_tiny_model_at_every_batch(tiny_bundle, tmp_path):
    """Logits and predicted loss of the deployed network within float32 rounding, for batches of 1
    and 2 cameras from one artefact (the batch axis is bounded dynamic, 1..max_batch)."""
    bundle = load_bundle(tiny_bundle)
    backend = create_backend("openvino", bundle, "cpu", max_batch=2, cache=ArtifactCache(tmp_path))
    network = DeployedNetwork(bundle.model, 56, 70)
    x = network.example(2)
    _assert_outputs_close(backend, network, x)
    _assert_outputs_close(backend, network, x[:1].contiguous())
    assert backend.key.versions["openvino"] and backend.key.input_shape == (2, 3, 56, 70)
    assert backend.describe() == "openvino fp32 on CPU"


def test_fp32_matches_pytorch_vits14_with_registers_off_518(tmp_path):
    """ViT-S/14 with register tokens at 476x644 (position embeddings interpolated, not the 518 table)."""
    torch.manual_seed(0)
    cfg = SegmenterConfig(11, backbone_config("dinov2_vits14_reg"))
    classes = [ClassInfo(i, f"class{i}", (20 * i, 255 - 20 * i, 7 * i)) for i in range(11)]
    bundle_cfg = BundleConfig(name="vits14reg", model=cfg, classes=classes, input=InputSpec(476, 644),
                              backbone_name="dinov2_vits14_reg")
    bundle = load_bundle(save_bundle(tmp_path / "bundle", UncertainSegmenter(cfg), bundle_cfg))
    backend = create_backend("openvino", bundle, "cpu", cache=ArtifactCache(tmp_path / "cache"))
    network = DeployedNetwork(bundle.model, 476, 644)
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(cv2.GaussianBlur(rng.normal(0, 1, (476, 644, 3)).astype(np.float32), (0, 0), 4))
    _assert_outputs_close(backend, network, frame.permute(2, 0, 1)[None].contiguous())


def test_fp32_labels_match_pytorch_on_the_demo_sample_frames(tmp_path):
    """The shipped demo on the five shipped dusk frames at camera resolution: at least 99.9% of pixels
    labelled as by PyTorch fp32 (only exact ties of the top two logits may go either way), and the
    network's outputs within float32 rounding."""
    bundle = load_bundle(DEMO)
    frames = _sample_frames()
    wanted = {"labels", "uncertainty"}
    torch_p = Predictor(bundle, PredictorOptions(backend="torch"))
    ov_p = Predictor(bundle, PredictorOptions(backend="openvino", cache_dir=str(tmp_path)))
    reference = [torch_p.run([f], wanted)[0] for f in frames]
    outputs = [ov_p.run([f], wanted)[0] for f in frames]
    assert _label_agreement(reference, outputs) >= 0.999
    prepared = torch_p.prepare(frames[:1])
    (want,), (got,) = torch_p.infer(prepared).values(), ov_p.infer(prepared).values()
    for w, g in zip(want, got):
        assert float((w - g).abs().max()) <= FP32_RELATIVE * float(w.abs().max())


def test_second_start_loads_the_cached_ir_and_a_tampered_entry_is_rebuilt(tiny_bundle, tmp_path, monkeypatch):
    import openvino as ov

    bundle = load_bundle(tiny_bundle)
    cache = ArtifactCache(tmp_path)
    first = create_backend("openvino", bundle, "cpu", cache=cache)
    entry = cache.entry(first.key)
    assert sorted(p.name for p in entry.iterdir()) == ["key.json", "model.bin", "model.xml"]
    conversions = []
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or real_convert(*a, **k))
    second = create_backend("openvino", bundle, "cpu", cache=cache)
    assert second.key == first.key and conversions == []
    weights = (entry / "model.bin").read_bytes()
    (entry / "model.bin").write_bytes(weights[:-4] + bytes(4 * [0x7F]))
    assert cache.lookup(first.key) is None
    network = DeployedNetwork(bundle.model, 56, 70)
    rebuilt = create_backend("openvino", bundle, "cpu", cache=cache)
    assert conversions == [1] and (cache.entry(rebuilt.key) / "model.bin").read_bytes() == weights
    _assert_outputs_close(rebuilt, network, network.example(1))


def test_ir_keeps_float32_weights(tiny_bundle, tmp_path):
    """openvino.save_model stores float16 weights unless told otherwise; fp32 must stay fp32."""
    import openvino as ov

    backend = create_backend("openvino", load_bundle(tiny_bundle), "cpu", cache=ArtifactCache(tmp_path))
    model = ov.Core().read_model(str(ArtifactCache(tmp_path).entry(backend.key) / "model.xml"))
    types = {op.get_output_element_type(0).get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert "f16" not in types and "f32" in types


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_precision_the_cpu_lacks_is_refused_with_its_reason(tiny_bundle, tmp_path, precision):
    if precision.upper() in _capabilities():
        pytest.skip(f"this CPU has {precision}: the refusal cannot be seen here")
    with pytest.raises(BackendUnavailable, match=rf"this CPU has no {precision} instructions \(OpenVINO reports capabilities"):
        create_backend("openvino", load_bundle(tiny_bundle), "cpu", precision, cache=ArtifactCache(tmp_path))


@pytest.mark.skipif("BF16" not in _capabilities(),
                    reason=f"this CPU has no bf16 instructions (OpenVINO reports capabilities {_capabilities()})")
def test_bf16_labels_match_fp32_on_the_demo_sample_frames(tmp_path):
    """bf16 keeps 8 bits of mantissa: labels move where the top two logits are closer than that
    rounding; the issue's probe saw 99.6% of patch labels equal, and 99.5% is every precision's bar."""
    bundle = load_bundle(DEMO)
    frames = _sample_frames()
    reference = [Predictor(bundle, PredictorOptions(backend="torch")).run([f], {"labels"})[0] for f in frames]
    bf16 = Predictor(bundle, PredictorOptions(backend="openvino", precision="bf16", cache_dir=str(tmp_path)))
    assert _label_agreement(reference, [bf16.run([f], {"labels"})[0] for f in frames]) >= 0.995


@pytest.mark.skipif(not (CAMVID / "dusk" / "test").is_dir(), reason=f"CamVid not found at {CAMVID}")
def test_int8_labels_match_fp32_on_camvid_frames(tmp_path):
    """Backbone weights int8 per output channel: each weight moves by at most half a step (range / 255)
    of its channel, so logits move by less than the demo's usual top-two margin and labels move only
    near ties. The frames and the bar are ONNX Runtime int8's (test_backends): the first 15 dusk/test
    and 15 day/test frames, 99.5% of pixels as PyTorch fp32 (99.65% on an AMD EPYC; the five shipped
    dusk frames alone, 99.46%: dusk is where the adapted demo's top-two margins are thin). The IR holds
    every backbone linear layer's weights as 8-bit integers, the heads' as float."""
    import openvino as ov

    bundle = load_bundle(DEMO)
    frames = camvid_frames("dusk/test", 15) + camvid_frames("day/test", 15)
    reference = [Predictor(bundle, PredictorOptions(backend="torch")).run([f], {"labels"})[0] for f in frames]
    int8 = Predictor(bundle, PredictorOptions(backend="openvino", precision="int8", cache_dir=str(tmp_path)))
    assert _label_agreement(reference, [int8.run([f], {"labels"})[0] for f in frames]) >= 0.995
    model = ov.Core().read_model(str(ArtifactCache(tmp_path).entry(int8.backend.key) / "model.xml"))
    matmuls = sum(op.get_type_name() == "MatMul" for op in model.get_ops())
    int_weights = [op for op in model.get_ops() if op.get_type_name() == "Constant"
                   and op.get_output_element_type(0).get_type_name() in ("i8", "u8")
                   and len(op.get_output_shape(0)) == 2 and op.get_output_shape(0)[1] > 1]  # (out, in), not (out, 1) zero points
    depth = len(bundle.model.backbone.blocks)
    assert matmuls == 6 * depth + 4 and len(int_weights) == 6 * depth  # q, k, v, proj, fc1, fc2 int8; the heads' 4 float
    assert int8.backend.key.versions["nncf"] and "int8" in int8.backend.key.options


def test_int8_without_nncf_says_what_to_install(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    with pytest.raises(BackendUnavailable, match="pip install nncf"):
        create_backend("openvino", load_bundle(tiny_bundle), "cpu", "int8", cache=ArtifactCache(tmp_path))


def _intel_gpu_reason() -> str | None:
    from uncertain_seg_ros.inference.openvino_backend import device_reason

    return device_reason("GPU")


@pytest.mark.skipif(_intel_gpu_reason() is not None, reason=f"{_intel_gpu_reason()}")
def test_fp32_on_an_intel_gpu(tiny_bundle, tmp_path):
    """OpenVINO's GPU plugin, inputs from and outputs to host memory."""
    bundle = load_bundle(tiny_bundle)
    backend = create_backend("openvino", bundle, "cpu", cache=ArtifactCache(tmp_path), openvino_device="GPU")
    network = DeployedNetwork(bundle.model, 56, 70)
    with torch.no_grad():
        want = network(network.example(1))
    for w, g in zip(want, backend(network.example(1))):
        assert float((w - g).abs().max()) <= 1e-3 * float(w.abs().max())  # GPU kernels' own rounding
    assert backend.describe() == "openvino fp32 on GPU"


def test_missing_device_says_which_devices_openvino_sees(tiny_bundle, tmp_path):
    with pytest.raises(BackendUnavailable, match=r"no device NPU7 \(OpenVINO reports devices \["):
        create_backend("openvino", load_bundle(tiny_bundle), "cpu", cache=ArtifactCache(tmp_path), openvino_device="NPU7")

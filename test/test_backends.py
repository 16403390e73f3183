"""Inference backends: what compilers need (torch.export, no graph breaks), ONNX Runtime against
PyTorch on real CamVid frames, the artefact cache, backend choice, and TensorRT / CUDA where present."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import CAMVID, REPO, camvid_frames, core_prediction
from uncertain_seg_ros.bundle import BundleConfig, ClassInfo, InputSpec, load_bundle, save_bundle
from uncertain_seg_ros.inference import (
    ArtifactCache,
    ArtifactKey,
    BackendUnavailable,
    Predictor,
    PredictorOptions,
    available_backends,
    choose_backend,
    create_backend,
)
from uncertain_seg_ros.inference.network import DEPLOYED_FORM, DeployedNetwork, export_program, exportable
from uncertain_seg_ros.model import SegmenterConfig, UncertainSegmenter, backbone_config

DEMO = REPO / "models" / "camvid_demo"
DAY = REPO / "models" / "camvid_day"
needs_camvid = pytest.mark.skipif(not (CAMVID / "dusk" / "test").is_dir(), reason=f"CamVid not found at {CAMVID}")


def _vits14_bundle(path: Path, registers: bool = False) -> Path:
    """ViT-S/14 (official DINOv2 architecture, random weights) deployed at 476x644, as from a 640x480 camera."""
    torch.manual_seed(0)
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    model_cfg = SegmenterConfig(11, backbone_config(name))
    classes = [ClassInfo(i, f"class{i}", (20 * i, 255 - 20 * i, 7 * i)) for i in range(11)]
    cfg = BundleConfig(name="vits14", model=model_cfg, classes=classes, input=InputSpec(476, 644), ignore_index=255,
                       backbone_name=name)
    return save_bundle(path, UncertainSegmenter(model_cfg), cfg)


@pytest.fixture(scope="module")
def vits14(tmp_path_factory) -> Path:
    return _vits14_bundle(tmp_path_factory.mktemp("vits14") / "bundle")


@pytest.mark.parametrize("which", ["demo", "vits14"])
def test_network_exports_whole_with_torch_export(which, vits14):
    """The network as exporters build it is one graph: strict torch.export succeeds with a dynamic
    camera batch, TorchDynamo reports no graph break, and the exported program computes what the
    model does."""
    bundle = load_bundle(DEMO if which == "demo" else vits14)
    net = exportable(DeployedNetwork(bundle.model, bundle.config.input.height, bundle.config.input.width))
    x = net.example(2)
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    program = export_program(net, x, max_batch=3)
    with torch.no_grad():
        want = net(x)
        got = program.module()(x)
        got3 = program.module()(net.example(3))
    assert got3[0].shape[0] == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["demo", "vits14"])
def test_deployed_network_computes_what_the_model_computes(which, vits14):
    """The inference form (heads as linear layers over the tokens, BatchNorm folded) gives the model's
    logits and predicted loss; the vits14 head gets non-trivial BatchNorm statistics so the fold is tested."""
    bundle = load_bundle(DEMO if which == "demo" else vits14)
    model = bundle.model
    if which == "vits14":
        g = torch.Generator().manual_seed(3)
        bn = model.head.bn
        with torch.no_grad():
            for t in (bn.running_mean, bn.weight, bn.bias):
                t.copy_(torch.randn(t.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.1)
    net = DeployedNetwork(model, bundle.config.input.height, bundle.config.input.width)
    x = net.example(2)
    with torch.no_grad():
        want, got = model(x), net(x)
    for w, g_ in zip(want, got):
        assert g_.shape == w.shape and g_.is_contiguous()
        torch.testing.assert_close(g_, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_exportable_network_folds_layer_scale_and_splits_qkv(ffn):
    """The exporters' copy: no LayerScale left, query/key/value as three linear layers, the source
    network untouched, and the same logits and predicted loss."""
    from uncertain_seg_ros.inference.network import SeparateQKVAttention
    from uncertain_seg_ros.model.layers import LayerScale

    torch.manual_seed(0)
    cfg = SegmenterConfig(3, backbone_config("demo_vitt14", embed_dim=48, depth=2, num_heads=2, ffn_layer=ffn),
                          n_last_blocks=2, uncertainty_hidden=16)
    model = UncertainSegmenter(cfg)
    for block in model.backbone.blocks:
        for ls in (block.ls1, block.ls2):
            ls.gamma.data.uniform_(0.05, 2.0)
    net = DeployedNetwork(model, 56, 70)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export = exportable(net)
    assert not any(isinstance(m, LayerScale) for m in export.modules())
    assert all(isinstance(b.attn, SeparateQKVAttention) for b in export.model.backbone.blocks)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    x = net.example(2)
    with torch.no_grad():
        for w, g in zip(net(x), export(x)):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_deployed_network_refuses_a_head_that_is_not_a_linear_layer(tiny_bundle):
    model = load_bundle(tiny_bundle).model
    model.uncertainty_head.mlp[0] = torch.nn.Conv2d(model.uncertainty_head.mlp[0].in_channels, 8, 3, padding=1)
    with pytest.raises(ValueError, match="only a 1x1"):
        DeployedNetwork(model, 56, 70)


def test_deployed_pos_embed_is_the_interpolated_one(vits14):
    bundle = load_bundle(vits14)
    bb = bundle.model.backbone
    want = bb.interpolate_pos_encoding(476, 644).clone()
    bb.deploy_at(476, 644)
    assert bb.deployed_pos_embed.shape == want.shape and torch.equal(bb.interpolate_pos_encoding(476, 644), want)
    assert "deployed_pos_embed" not in bundle.model.state_dict()


def _compare(reference, outputs, uncertainty_tol: float = 1e-3) -> tuple[float, float]:
    agree = [float((r.labels == o.labels).mean()) for r, o in zip(reference, outputs)]
    diff = max(float(np.abs(r.uncertainty - o.uncertainty).max()) for r, o in zip(reference, outputs))
    return min(agree), diff


@needs_camvid
def test_onnxruntime_matches_pytorch_on_camvid_frames(tmp_path):
    """The day model (no selective scaling), 31 dusk/test + 12 day/test frames at camera resolution,
    three cameras per call: labels identical on every pixel except exact numerical ties (the two best
    classes within 1e-4, which float rounding may order either way), uncertainty within 1e-3."""
    bundle = load_bundle(DAY)
    frames = camvid_frames("dusk/test", 31) + camvid_frames("day/test", 12)
    ref = Predictor(bundle, PredictorOptions(backend="torch"))
    ort = Predictor(bundle, PredictorOptions(backend="onnxruntime", max_batch=3, cache_dir=str(tmp_path)))
    wanted = {"labels", "uncertainty"}
    reference, outputs = [], []
    for i in range(0, len(frames), 3):
        reference += ref.run(frames[i : i + 3], wanted)
        outputs += ort.run(frames[i : i + 3], wanted)
    agreement, diff = _compare(reference, outputs)
    assert diff <= 1e-3, diff
    for frame, r, o in zip(frames, reference, outputs):
        differ = r.labels != o.labels
        if differ.any():
            probs = core_prediction(bundle, frame).probs[0].numpy()
            top2 = np.sort(probs[:, differ], axis=0)[-2:]
            margin = float((top2[1] - top2[0]).max())
            assert margin < 1e-4, f"labels differ on {int(differ.sum())} pixels with a top-2 margin up to {margin:.2e}"
    assert agreement >= 0.99999, agreement


@needs_camvid
def test_onnxruntime_network_outputs_match_for_the_calibrated_demo(tmp_path):
    """The shipped demo (selective scaling): the exported network's logits and predicted loss equal
    PyTorch's within 1e-3 on real frames. (Downstream, the selector's binary flag may flip on pixels
    at its decision boundary, so per-pixel uncertainty is compared on the day model above.)"""
    bundle = load_bundle(DEMO)
    torch_p = Predictor(bundle, PredictorOptions(backend="torch"))
    ort_p = Predictor(bundle, PredictorOptions(backend="onnxruntime", max_batch=3, cache_dir=str(tmp_path)))
    prepared = torch_p.prepare(camvid_frames("dusk/test", 3))
    (want,), (got,) = torch_p.infer(prepared).values(), ort_p.infer(prepared).values()
    for w, g in zip(want, got):
        assert float((w - g).abs().max()) < 1e-3


def test_onnxruntime_matches_pytorch_vits14_with_registers(tmp_path):
    """ViT-S/14 with registers at 476x644 from 640x480 frames: same labels, uncertainty within 1e-3."""
    bundle = load_bundle(_vits14_bundle(tmp_path / "b", registers=True))
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), np.uint8), (0, 0), 8) for _ in range(2)]
    reference = Predictor(bundle, PredictorOptions(backend="torch")).run(frames, {"labels", "uncertainty"})
    outputs = Predictor(bundle, PredictorOptions(backend="onnxruntime", max_batch=2, cache_dir=str(tmp_path / "c"))).run(
        frames, {"labels", "uncertainty"})
    agreement, diff = _compare(reference, outputs)
    assert agreement >= 0.999 and diff <= 1e-3, (agreement, diff)


def test_onnx_graph_runs_attention_and_gelu_as_fused_operators(tiny_bundle, tmp_path):
    """Every block's attention is ONNX Runtime's fused MultiHeadAttention with the model's head count
    (no N x N score matrix: no Softmax) and every MLP's GELU is one contrib Gelu (no Erf); the heads
    are matrix products, not convolutions; the cache key says which graph it holds."""
    import onnx

    bundle = load_bundle(tiny_bundle)
    backend = create_backend("onnxruntime", bundle, "cpu", max_batch=2, cache=ArtifactCache(tmp_path))
    graph = onnx.load(str(ArtifactCache(tmp_path).entry(backend.key) / "model.onnx")).graph
    fused = [n for n in graph.node if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")]
    gelu = [n for n in graph.node if (n.domain, n.op_type) == ("com.microsoft", "Gelu")]
    backbone = bundle.model.backbone
    assert len(fused) == len(gelu) == len(backbone.blocks)
    assert {onnx.helper.get_attribute_value(a) for n in fused for a in n.attribute if a.name == "num_heads"} == {
        backbone.blocks[0].attn.num_heads}
    ops = [n.op_type for n in graph.node]
    assert "Softmax" not in ops and "Erf" not in ops and "Split" not in ops  # q, k and v: three products
    assert ops.count("MatMul") == 6 * len(backbone.blocks) + 4  # q, k, v, proj, fc1, fc2; 1 + 3 head layers
    assert ops.count("Conv") == 1  # the patch embedding; both heads are linear layers over the tokens
    assert backend.key.options["contrib_ops"] == "com.microsoft.MultiHeadAttention, com.microsoft.Gelu"
    assert backend.key.options["network"] == DEPLOYED_FORM


@pytest.mark.parametrize("call", [dict(is_causal=True), dict(attn_mask=True), dict(gelu="tanh")])
def test_fused_operators_refuse_what_they_do_not_translate(call):
    """Causal or masked attention, or tanh-approximated GELU, is an export error naming what is
    unsupported, not a different graph."""
    from uncertain_seg_ros.inference.onnx_contrib_ops import contrib_translation

    class Unsupported(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            if "gelu" in call:
                return torch.nn.functional.gelu(q, approximate=call["gelu"])
            mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril() if call.get("attn_mask") else None
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask,
                                                                    is_causal=call.get("is_causal", False))

    expected = "exact \\(erf\\) form" if "gelu" in call else "unmasked, non-causal attention"
    with pytest.raises(Exception, match=expected):
        torch.onnx.export(Unsupported(), (torch.randn(1, 2, 5, 8),), dynamo=True, opset_version=18, verbose=False,
                          custom_translation_table=contrib_translation())


@needs_camvid
def test_onnxruntime_int8_labels_match_fp32_on_camvid_frames(tmp_path):
    """The shipped demo with its backbone's linear layers quantised to int8 (ONNX Runtime on the CPU), 15
    dusk/test + 15 day/test frames, three cameras per call: at least 99.5% of pixels labelled as by
    PyTorch fp32 (the issue's bar for every backend and precision; 99.66% on an AMD EPYC without VNNI,
    99.49% with the heads quantised too); the cached graph really is int8 but for the heads."""
    import onnx

    bundle = load_bundle(DEMO)
    frames = camvid_frames("dusk/test", 15) + camvid_frames("day/test", 15)
    ref = Predictor(bundle, PredictorOptions(backend="torch"))
    int8 = Predictor(bundle, PredictorOptions(backend="auto", precision="int8", max_batch=3, cache_dir=str(tmp_path)))
    assert int8.backend.name == "onnxruntime" and int8.backend.key.options["weights"] == "int8 per channel"
    same = total = 0
    for i in range(0, len(frames), 3):
        for r, o in zip(ref.run(frames[i : i + 3], {"labels"}), int8.run(frames[i : i + 3], {"labels"})):
            same, total = same + int((r.labels == o.labels).sum()), total + r.labels.size
    assert same / total >= 0.995, same / total
    graph = onnx.load(str(ArtifactCache(tmp_path).entry(int8.backend.key) / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    depth, head_layers = len(bundle.model.backbone.blocks), 1 + 3
    assert ops.count("MatMulInteger") == 6 * depth and "Gemm" not in ops  # q, k, v, proj, fc1, fc2
    assert ops.count("MatMul") == head_layers  # the heads stay float
    # an input is quantised once for every layer that reads it: q, k and v share one
    assert ops.count("DynamicQuantizeLinear") == 4 * depth
    assert sorted(p.name for p in (ArtifactCache(tmp_path).entry(int8.backend.key)).iterdir()) == ["key.json", "model.onnx"]


def test_predictor_splits_groups_larger_than_max_batch(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (40, 50, 3), np.uint8) for _ in range(5)]
    ref = Predictor(bundle, PredictorOptions(backend="torch")).run(frames, {"labels", "uncertainty"})
    out = Predictor(bundle, PredictorOptions(backend="onnxruntime", max_batch=2, cache_dir=str(tmp_path))).run(
        frames, {"labels", "uncertainty"})
    assert len(out) == 5
    agreement, diff = _compare(ref, out)
    assert agreement == 1.0 and diff < 1e-4


def _key(**changes) -> ArtifactKey:
    base = dict(model_checksum="ab" * 32, backend="onnxruntime", versions={"onnxruntime": "1.0"}, device="cpu x86_64",
                precision="fp32", input_shape=(1, 3, 56, 70))
    return ArtifactKey(**{**base, **changes})


def test_artifact_cache_builds_once_and_reuses(tmp_path):
    cache = ArtifactCache(tmp_path)
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        (folder / "model.bin").write_bytes(b"engine")

    first = cache.get_or_build(_key(), build)
    again = cache.get_or_build(_key(), build)
    assert first == again and len(builds) == 1
    meta = json.loads((first / "key.json").read_text())
    assert meta["key"]["model_checksum"] == "ab" * 32 and "model.bin" in meta["files"]


@pytest.mark.parametrize("change", [
    {"versions": {"onnxruntime": "2.0"}}, {"device": "NVIDIA H100 sm_90"},
])
def test_stale_cache_entry_is_rebuilt_and_removed(tmp_path, change):
    """A new library version or GPU gives a new key: rebuilt, and the old entry (never loadable again) removed."""
    cache = ArtifactCache(tmp_path)
    old = cache.get_or_build(_key(), lambda f: (f / "m.bin").write_bytes(b"old"))
    new = cache.get_or_build(_key(**change), lambda f: (f / "m.bin").write_bytes(b"new"))
    assert new != old and not old.exists() and (new / "m.bin").read_bytes() == b"new"


def test_other_precisions_and_shapes_are_kept(tmp_path):
    cache = ArtifactCache(tmp_path)
    a = cache.get_or_build(_key(), lambda f: (f / "m.bin").write_bytes(b"a"))
    b = cache.get_or_build(_key(precision="fp16"), lambda f: (f / "m.bin").write_bytes(b"b"))
    c = cache.get_or_build(_key(input_shape=(2, 3, 56, 70)), lambda f: (f / "m.bin").write_bytes(b"c"))
    assert a.exists() and b.exists() and c.exists()


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete", "key"])
def test_damaged_cache_entry_is_rebuilt_not_loaded(tmp_path, damage):
    cache = ArtifactCache(tmp_path)
    entry = cache.get_or_build(_key(), lambda f: (f / "m.bin").write_bytes(b"engine-bytes"))
    if damage == "truncate":
        (entry / "m.bin").write_bytes(b"eng")
    elif damage == "tamper":
        (entry / "m.bin").write_bytes(b"ENGINE-bytes")
    elif damage == "delete":
        (entry / "m.bin").unlink()
    else:
        meta = json.loads((entry / "key.json").read_text())
        meta["key"]["precision"] = "fp16"
        (entry / "key.json").write_text(json.dumps(meta))
    assert cache.lookup(_key()) is None
    rebuilt = cache.get_or_build(_key(), lambda f: (f / "m.bin").write_bytes(b"engine-bytes"))
    assert (rebuilt / "m.bin").read_bytes() == b"engine-bytes" and cache.lookup(_key()) == rebuilt


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)

    def build(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.get_or_build(_key(), build)
    assert list(tmp_path.iterdir()) == []


def test_onnx_backend_reuses_and_rebuilds_its_cache(tiny_bundle, tmp_path):
    """Same model: loaded from the cache; retrained weights (new checksum): a new entry."""
    bundle = load_bundle(tiny_bundle)
    first = create_backend("onnxruntime", bundle, "cpu", cache=ArtifactCache(tmp_path))
    mtime = (ArtifactCache(tmp_path).entry(first.key) / "model.onnx").stat().st_mtime_ns
    second = create_backend("onnxruntime", bundle, "cpu", cache=ArtifactCache(tmp_path))
    assert second.key == first.key
    assert (ArtifactCache(tmp_path).entry(first.key) / "model.onnx").stat().st_mtime_ns == mtime
    with torch.no_grad():
        next(bundle.model.head.parameters()).add_(1.0)
    retrained = save_bundle(tmp_path / "retrained", bundle.model, bundle.config)
    third = create_backend("onnxruntime", load_bundle(retrained), "cpu", cache=ArtifactCache(tmp_path))
    assert third.key.model_checksum != first.key.model_checksum
    assert ArtifactCache(tmp_path).lookup(first.key) is not None  # another model's entry is not stale


@pytest.mark.skipif(available_backends("cpu")["torch_compile"] is not None,
                    reason=f"torch.compile unavailable: {available_backends('cpu')['torch_compile']}")
def test_torch_compile_matches_eager_on_the_cpu(tiny_bundle):
    """torch.compile (Inductor, fullgraph) of the deployed network gives eager's labels and uncertainty,
    and camera frames at every batch size run the graphs compiled at start-up: no recompilation (the
    warm-up once compiled for ordinary tensors and every first frame recompiled for 2 s)."""
    bundle = load_bundle(tiny_bundle)
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (40, 50, 3), np.uint8) for _ in range(2)]
    ref = Predictor(bundle, PredictorOptions(backend="torch")).run(frames, {"labels", "uncertainty"})
    compiled = Predictor(bundle, PredictorOptions(backend="torch_compile", max_batch=2))
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled.run(frames, {"labels", "uncertainty"}) + compiled.run(frames[:1], {"labels"})
    agreement, diff = _compare(ref, out[:2])
    assert agreement == 1.0 and diff < 1e-4 and np.array_equal(out[2].labels, ref[0].labels)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_every_cpu_backend(tiny_bundle, tmp_path, threads):
    """``threads`` sets PyTorch's process-wide count (eager, pre- and post-processing), ONNX Runtime's
    intra-op pool and OpenVINO's INFERENCE_NUM_THREADS; 0 keeps the process's setting."""
    bundle = load_bundle(tiny_bundle)
    before = torch.get_num_threads()
    try:
        Predictor(bundle, PredictorOptions(backend="torch", threads=threads))
        assert torch.get_num_threads() == threads
        ort = Predictor(bundle, PredictorOptions(backend="onnxruntime", threads=threads, cache_dir=str(tmp_path)))
        assert ort.backend.session.get_session_options().intra_op_num_threads == threads
        if available_backends("cpu")["openvino"] is None:
            ov = Predictor(bundle, PredictorOptions(backend="openvino", threads=threads, cache_dir=str(tmp_path)))
            assert ov.backend.compiled.get_property("INFERENCE_NUM_THREADS") == threads
            assert ov.backend.compiled.get_property("ENABLE_CPU_PINNING") is False
        torch.set_num_threads(3)
        Predictor(bundle, PredictorOptions(backend="torch", threads=0))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        PredictorOptions(threads=-1)


def test_auto_on_the_cpu_takes_openvino_then_eager_pytorch_and_keeps_the_precision(monkeypatch):
    """fp32: OpenVINO where installed (measured fastest, factory.AUTO_ORDER), else eager PyTorch, not
    ONNX Runtime; bf16 on a CPU without bf16 passes OpenVINO over for eager PyTorch's autocast rather
    than running another precision; int8: ONNX Runtime, else OpenVINO. Any backend can be named."""
    from uncertain_seg_ros.inference import factory

    assert available_backends("cpu")["onnxruntime"] is None and available_backends("cpu")["openvino"] is None
    assert choose_backend("auto", "cpu") == choose_backend("auto", "cpu", "fp32") == "openvino"
    assert choose_backend("onnxruntime", "cpu") == "onnxruntime"
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert choose_backend("auto", "cpu", "bf16") == ("openvino" if has_bf16 else "torch")
    assert choose_backend("auto", "cpu", "int8") == "onnxruntime"
    real_has = factory._has
    monkeypatch.setattr(factory, "_has", lambda module: module != "onnxruntime" and real_has(module))
    assert choose_backend("auto", "cpu", "int8") == "openvino"
    monkeypatch.setattr(factory, "_has", lambda module: module != "openvino" and real_has(module))
    assert choose_backend("auto", "cpu") == "torch"


def test_auto_predictor_on_the_cpu_runs_openvino_at_the_requested_precision(tiny_bundle, tmp_path):
    predictor = Predictor(load_bundle(tiny_bundle), PredictorOptions(backend="auto", cache_dir=str(tmp_path)))
    assert predictor.backend.name == "openvino" and predictor.backend.precision == "fp32"


def test_unavailable_backends_say_why():
    reasons = available_backends("cpu")
    assert reasons["tensorrt"] == "TensorRT runs on NVIDIA GPUs only"
    with pytest.raises(BackendUnavailable, match="TensorRT runs on NVIDIA GPUs only"):
        choose_backend("tensorrt", "cpu")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        choose_backend("tvm", "cpu")
    with pytest.raises(ValueError, match="bf16 is not supported"):
        create_backend("onnxruntime", load_bundle(DEMO), "cpu", "bf16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        create_backend("torch", load_bundle(DEMO), "cpu", "fp16")
    with pytest.raises(ValueError, match="int8 runs on the onnxruntime and openvino backends only"):
        create_backend("torch", load_bundle(DEMO), "cpu", "int8")


def test_build_engine_command(tmp_path, capsys):
    from uncertain_seg_training.cli import main

    assert main(["build-engine", "--model", "camvid_demo", "--backend", "onnxruntime", "--device", "cpu",
                 "--cameras", "2", "--cache", str(tmp_path)]) == 0
    line = capsys.readouterr().out.strip()
    entry = Path(line.rsplit(" ", 1)[1])
    assert line.startswith("onnxruntime fp32 on cpu: artefact ready in") and (entry / "model.onnx").is_file()
    assert json.loads((entry / "key.json").read_text())["key"]["input_shape"] == [2, 3, 280, 378]
    assert main(["build-engine", "--backend", "tensorrt", "--device", "cpu", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("uncertain-seg build-engine: error: ") and "TensorRT runs on NVIDIA GPUs only" in err


def _tensorrt_reason() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU; none is available here"
    return available_backends("cuda")["tensorrt"]


@pytest.mark.skipif(_tensorrt_reason() is not None, reason=f"TensorRT backend unavailable: {_tensorrt_reason()}")
@needs_camvid
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_pytorch_on_camvid_frames(tmp_path, precision):
    """TensorRT (dynamo, serialised program): >= 99.5% of pixels labelled as PyTorch fp32 does; the
    second start loads the cached program instead of building."""
    bundle = load_bundle(DEMO, "cuda")
    frames = camvid_frames("dusk/test", 12)
    ref = Predictor(bundle, PredictorOptions(device="cuda", backend="torch")).run(frames, {"labels", "uncertainty"})
    trt = Predictor(bundle, PredictorOptions(device="cuda", precision=precision, backend="tensorrt", max_batch=2,
                                             cache_dir=str(tmp_path)))
    agreement, _ = _compare(ref, [o for i in range(0, 12, 2) for o in trt.run(frames[i : i + 2], {"labels", "uncertainty"})])
    assert agreement >= 0.995
    again = create_backend("tensorrt", bundle, "cuda", precision, 2, ArtifactCache(tmp_path))
    assert again.key == trt.backend.key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_camvid
@pytest.mark.parametrize("backend, precision", [("torch", "fp16"), ("torch", "bf16"), ("torch_compile", "fp32"),
                                                ("torch_compile", "fp16"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16")])
def test_cuda_backends_match_pytorch_fp32(backend, precision):
    """Every CUDA backend and precision (ONNX Runtime's fused attention on CUDA included) labels >= 99.5% as fp32 eager."""
    reason = available_backends("cuda")[backend]
    if reason is not None:
        pytest.skip(f"{backend} unavailable on CUDA: {reason}")
    bundle = load_bundle(DEMO, "cuda")
    frames = camvid_frames("dusk/test", 8)
    ref = Predictor(bundle, PredictorOptions(device="cuda", backend="torch")).run(frames, {"labels"})
    out = Predictor(bundle, PredictorOptions(device="cuda", precision=precision, backend=backend)).run(frames, {"labels"})
    assert min(float((r.labels == o.labels).mean()) for r, o in zip(ref, out)) >= 0.995

"""DINOv2 backbone: official checkpoint layout, weight loading, position embeddings, token masking."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from uncertain_seg_ros.model import (
    BackboneConfig,
    DinoVisionTransformer,
    PretrainedWeightsError,
    backbone_config,
    dinov2_backbone,
    pretrained_url,
)


def official_keys(embed_dim=384, depth=12, registers=0, ffn="mlp", mlp_hidden=1536):
    """Parameter names and shapes of an official DINOv2 checkpoint, written out as the files hold them."""
    d = embed_dim
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 37 * 37 + 1, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 14, 14),
        "patch_embed.proj.bias": (d,),
    }
    if registers:
        keys["register_tokens"] = (1, registers, d)
    for n in range(depth):
        b = f"blocks.{n}."
        keys[b + "norm1.weight"] = (d,)
        keys[b + "norm1.bias"] = (d,)
        keys[b + "attn.qkv.weight"] = (3 * d, d)
        keys[b + "attn.qkv.bias"] = (3 * d,)
        keys[b + "attn.proj.weight"] = (d, d)
        keys[b + "attn.proj.bias"] = (d,)
        keys[b + "ls1.gamma"] = (d,)
        keys[b + "norm2.weight"] = (d,)
        keys[b + "norm2.bias"] = (d,)
        if ffn == "mlp":
            keys[b + "mlp.fc1.weight"] = (mlp_hidden, d)
            keys[b + "mlp.fc1.bias"] = (mlp_hidden,)
            keys[b + "mlp.fc2.weight"] = (d, mlp_hidden)
            keys[b + "mlp.fc2.bias"] = (d,)
        else:  # SwiGLU (ViT-g): w12 packs both gate projections
            keys[b + "mlp.w12.weight"] = (2 * mlp_hidden, d)
            keys[b + "mlp.w12.bias"] = (2 * mlp_hidden,)
            keys[b + "mlp.w3.weight"] = (d, mlp_hidden)
            keys[b + "mlp.w3.bias"] = (d,)
        keys[b + "ls2.gamma"] = (d,)
    keys["norm.weight"] = (d,)
    keys["norm.bias"] = (d,)
    return keys


def random_checkpoint(keys, seed=0):
    """A state dict with the given layout filled with random tensors."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in keys.items()}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- checkpoint layout


def test_vits14_layout_matches_official_keys():
    """ViT-S/14 (plain and reg4) has exactly the official parameter names and shapes."""
    with torch.device("meta"):
        plain = DinoVisionTransformer(backbone_config("dinov2_vits14"))
        reg = DinoVisionTransformer(backbone_config("dinov2_vits14_reg"))
    assert _shapes(plain) == official_keys()
    assert _shapes(reg) == official_keys(registers=4)


def test_vitg14_layout_uses_swiglu_with_official_shapes():
    """ViT-g/14 (built on the meta device) has SwiGLU w12 (8192, 1536) / w3 (1536, 4096) and 40 blocks."""
    hidden = (int(1536 * 4 * 2 / 3) + 7) // 8 * 8
    assert hidden == 4096
    with torch.device("meta"):
        model = DinoVisionTransformer(backbone_config("dinov2_vitg14"))
    shapes = _shapes(model)
    assert shapes == official_keys(embed_dim=1536, depth=40, ffn="swiglu", mlp_hidden=4096)
    assert shapes["blocks.0.mlp.w12.weight"] == (8192, 1536)
    assert shapes["blocks.0.mlp.w3.weight"] == (1536, 4096)
    assert shapes["blocks.39.attn.qkv.weight"] == (4608, 1536)
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 1.1e9 < n_params < 1.2e9


@pytest.mark.parametrize("name,registers", [("dinov2_vits14", 0), ("dinov2_vits14_reg", 4)])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_official_checkpoint_loads_strictly(tmp_path, name, registers, fmt):
    """An official-layout ViT-S/14 checkpoint (.pth via torch.save, or .safetensors) loads and its tensors are used as is."""
    state = random_checkpoint(official_keys(registers=registers))
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = dinov2_backbone(name, weights=path)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda s: s.pop("blocks.0.ls1.gamma"), "blocks.0.ls1.gamma"),
        (lambda s: s.__setitem__("head.weight", torch.zeros(3)), "head.weight"),
        (lambda s: s.__setitem__("pos_embed", torch.zeros(1, 257, 384)), "pos_embed"),
        (lambda s: s.__setitem__("register_tokens", torch.zeros(1, 4, 384)), "register_tokens"),
    ],
    ids=["missing", "extra", "wrong-shape", "registers-into-plain"],
)
def test_mismatched_checkpoint_fails_loudly(tmp_path, corrupt, match):
    """A checkpoint with a missing key, an extra key or a wrong shape is refused (strict loading)."""
    state = random_checkpoint(official_keys(depth=1))
    corrupt(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=match):
        dinov2_backbone("dinov2_vits14", weights=path, depth=1)


def test_pretrained_urls_are_the_official_ones():
    """Hub names map to the official download URLs (reg variants to the *_reg4_pretrain.pth files)."""
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert pretrained_url("dinov2_vits14") == f"{base}/dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert pretrained_url("dinov2_vitb14_reg") == f"{base}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    assert pretrained_url("dinov2_vitg14") == f"{base}/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    with pytest.raises(ValueError):
        pretrained_url("demo_vitt14")


def test_offline_download_raises_with_local_file_hint(tmp_path, monkeypatch):
    """A failed download raises PretrainedWeightsError telling how to pass a local file, and caches nothing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "http://127.0.0.1:9/nothing.pth"
    with pytest.raises(PretrainedWeightsError, match="--pretrained PATH") as info:
        dinov2_backbone("dinov2_vits14", download=True, url=url, depth=1)
    assert url in str(info.value)
    assert info.value.__cause__ is not None
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_local_weights_file_names_the_path(tmp_path):
    """A weights path that does not exist raises PretrainedWeightsError naming it."""
    path = tmp_path / "nope" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(PretrainedWeightsError, match="dinov2_vits14_pretrain.pth") as info:
        dinov2_backbone("dinov2_vits14", weights=path, depth=1)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- input sizes


def test_non_square_input_gives_patch_grid():
    """A 476x644 (H x W) image gives 34x46 (h x w) feature maps from get_intermediate_layers, or with
    ``reshape=False`` the same features as 34*46 tokens in row-major order."""
    torch.manual_seed(0)
    model = dinov2_backbone("dinov2_vits14", depth=2).eval()
    x = torch.randn(1, 3, 476, 644)
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=2)
        tokens = model.get_intermediate_layers(x, n=2, reshape=False)
    assert len(outs) == len(tokens) == 2
    for out, seq in zip(outs, tokens):
        assert out.shape == (1, 384, 34, 46) and seq.shape == (1, 34 * 46, 384)
        assert torch.equal(out.flatten(2).transpose(1, 2), seq)


def test_feature_map_is_row_major_in_height_and_width():
    """Feature map cell (i, j) is the patch at row i, column j of the image (no H/W transposition)."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=1, num_heads=2)).eval()
    with torch.no_grad():
        for blk in model.blocks:  # identity blocks: each output token depends on its own patch only
            blk.ls1.gamma.zero_()
            blk.ls2.gamma.zero_()
        x = torch.randn(1, 3, 42, 70)
        y = x.clone()
        y[..., 2 * 14 : 3 * 14, 1 * 14 : 2 * 14] += 1.0
        a = model.get_intermediate_layers(x)[0]
        b = model.get_intermediate_layers(y)[0]
    changed = (a - b).abs().amax(dim=1)[0] > 0
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[2, 1] = True
    assert torch.equal(changed, expected)


def test_input_not_multiple_of_patch_size_raises():
    """An input whose sides are not multiples of 14 raises a ValueError saying so."""
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.get_intermediate_layers(torch.randn(1, 3, 100, 140))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.forward_features(torch.randn(1, 3, 140, 100))


# --------------------------------------------------------------------------- position embeddings


def official_interpolate_pos_encoding(pos_embed, x, w, h, patch_size, interpolate_offset, interpolate_antialias):
    """Transcription of the official DINOv2 ``DinoVisionTransformer.interpolate_pos_encoding``.

    As in the official code, ``w`` is the image height and ``h`` its width (``B, nc, w, h = x.shape``).
    """
    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def official_pos_for_image(model, img):
    """The official position table for ``img``, called as ``prepare_tokens_with_masks`` does."""
    B, nc, w, h = img.shape
    p = model.patch_size
    tokens = torch.zeros(B, 1 + (w // p) * (h // p), model.embed_dim)
    cfg = model.cfg
    return official_interpolate_pos_encoding(
        model.pos_embed, tokens, w, h, p, cfg.interpolate_offset, cfg.interpolate_antialias
    )


SIZES = [(518, 518), (476, 644), (224, 224), (644, 476)]


@pytest.fixture(scope="module", params=["dinov2_vits14", "dinov2_vits14_reg"])
def pos_model(request):
    """A one-block ViT-S/14 (plain or reg4 interpolation settings) with a random, non-smooth pos_embed."""
    torch.manual_seed(0)
    model = dinov2_backbone(request.param, depth=1)
    with torch.no_grad():
        model.pos_embed.normal_()
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.cls_token.zero_()
        if model.register_tokens is not None:
            model.register_tokens.zero_()
    return model.eval()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pos_encoding_matches_official(pos_model, size):
    """interpolate_pos_encoding(H, W) equals the official algorithm's table bit for bit (offset/antialias per variant)."""
    img = torch.zeros(1, 3, *size)
    expected = official_pos_for_image(pos_model, img)
    with torch.no_grad():
        got = pos_model.interpolate_pos_encoding(*size)
    assert got.shape == (1, 1 + (size[0] // 14) * (size[1] // 14), 384)
    assert torch.equal(got, expected)
    if size == (518, 518):
        assert torch.equal(got, pos_model.pos_embed)


@pytest.mark.parametrize("size", [(476, 644), (644, 476)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_prepare_tokens_adds_official_pos_table(pos_model, size):
    """With zero patch embeddings, prepare_tokens yields exactly the official table (cls, [zero registers], patches)."""
    img = torch.randn(1, 3, *size)
    expected = official_pos_for_image(pos_model, img)
    with torch.no_grad():
        tokens = pos_model.prepare_tokens(img)
    r = pos_model.num_register_tokens
    assert torch.equal(tokens[:, :1], expected[:, :1])
    assert torch.equal(tokens[:, 1 + r :], expected[:, 1:])
    assert torch.equal(tokens[:, 1 : 1 + r], torch.zeros(1, r, 384))


def test_pos_table_cached_in_eval_and_refreshed_on_change():
    """In eval under no_grad the table is computed once per size, and recomputed after pos_embed changes."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=1, num_heads=2)).eval()
    img = torch.zeros(1, 3, 476, 644)
    with torch.no_grad():
        first = model.interpolate_pos_encoding(476, 644)
        assert model.interpolate_pos_encoding(476, 644) is first
        other = model.interpolate_pos_encoding(224, 224)
        assert torch.equal(other, official_pos_for_image(model, torch.zeros(1, 3, 224, 224)))
        assert torch.equal(model.interpolate_pos_encoding(476, 644), first)
        model.pos_embed.add_(1)
        updated = model.interpolate_pos_encoding(476, 644)
    assert not torch.equal(updated, first)
    assert torch.equal(updated, official_pos_for_image(model, img))


def test_pos_table_not_cached_when_training():
    """With gradients enabled the table is recomputed each call and gradients reach pos_embed."""
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=1, num_heads=2)).train()
    a = model.interpolate_pos_encoding(476, 644)
    b = model.interpolate_pos_encoding(476, 644)
    assert a is not b
    assert a.requires_grad
    a.sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


# --------------------------------------------------------------------------- token masking and registers


@pytest.fixture(scope="module")
def small_model():
    """A tiny two-block backbone with 4 registers and random (non-zero) mask/register/cls tokens."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=2, num_heads=2, num_register_tokens=4))
    with torch.no_grad():
        model.mask_token.normal_()
        model.cls_token.normal_()
        model.register_tokens.normal_()
    return model.eval()


def _mask():
    """A (2, 3*5) patch mask for 42x70 images: a few patches per image, differing between images."""
    m = torch.zeros(2, 3, 5, dtype=torch.bool)
    m[0, 0, 0] = m[0, 1, 3] = m[0, 2, 4] = True
    m[1, 1, 1] = m[1, 2, 2] = True
    return m.flatten(1)


def _all_outputs(model, x, masks):
    ff = model.forward_features(x, masks)
    return [*ff.values(), *model.get_intermediate_layers(x, n=2, masks=masks)]


def test_masked_tokens_are_mask_token_plus_position():
    """Masked patch tokens are mask_token + their position embedding after prepare_tokens."""
    model = DinoVisionTransformer(BackboneConfig(embed_dim=32, depth=1, num_heads=2, num_register_tokens=4)).eval()
    with torch.no_grad():
        model.mask_token.normal_()
        x = torch.randn(2, 3, 42, 70)
        masks = _mask()
        tokens = model.prepare_tokens(x, masks)
        unmasked = model.prepare_tokens(x)
        pos = model.interpolate_pos_encoding(42, 70)[0, 1:]
    patches = tokens[:, 5:]
    for b in range(2):
        expected = model.mask_token + pos[masks[b]]
        torch.testing.assert_close(patches[b][masks[b]], expected, rtol=0, atol=1e-6)
        assert torch.equal(patches[b][~masks[b]], unmasked[b, 5:][~masks[b]])


def test_masked_patch_pixels_have_no_influence(small_model):
    """Changing pixels inside masked patches changes no output of forward_features or get_intermediate_layers."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 42, 70)
    masks = _mask()
    y = x.clone()
    grid = masks.view(2, 3, 5)
    for b, i, j in grid.nonzero().tolist():
        y[b, :, i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14] = torch.randn(3, 14, 14) * 5
    with torch.no_grad():
        for a, c in zip(_all_outputs(small_model, x, masks), _all_outputs(small_model, y, masks), strict=True):
            assert torch.equal(a, c)


def test_unmasked_patch_pixels_do_influence(small_model):
    """Changing pixels inside an unmasked patch changes the outputs."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 42, 70)
    masks = _mask()
    assert not masks.view(2, 3, 5)[0, 0, 1]
    y = x.clone()
    y[0, :, 0:14, 14:28] += 1.0
    with torch.no_grad():
        for a, c in zip(_all_outputs(small_model, x, masks), _all_outputs(small_model, y, masks), strict=True):
            assert not torch.equal(a[0], c[0])
            assert torch.equal(a[1], c[1])  # the other image in the batch is untouched


def test_all_false_mask_equals_no_mask(small_model):
    """An all-False mask gives exactly the outputs of no mask."""
    x = torch.randn(2, 3, 42, 70)
    none = torch.zeros(2, 15, dtype=torch.bool)
    with torch.no_grad():
        for a, c in zip(_all_outputs(small_model, x, None), _all_outputs(small_model, x, none), strict=True):
            assert torch.equal(a, c)


def test_register_tokens_sit_between_cls_and_patches(small_model):
    """Token order is [cls + pos0, registers (no pos), patches + pos]; forward_features splits it with official keys."""
    x = torch.randn(2, 3, 42, 70)
    with torch.no_grad():
        tokens = small_model.prepare_tokens(x)
        pos = small_model.interpolate_pos_encoding(42, 70)
        patches = small_model.patch_embed(x)
        ff = small_model.forward_features(x)
    assert tokens.shape == (2, 1 + 4 + 15, 32)
    assert torch.equal(tokens[:, 0], (small_model.cls_token + pos[:, :1])[0].expand(2, -1))
    assert torch.equal(tokens[:, 1:5], small_model.register_tokens.expand(2, -1, -1))
    assert torch.equal(tokens[:, 5:], patches + pos[:, 1:])
    assert set(ff) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"}
    assert ff["x_norm_clstoken"].shape == (2, 32)
    assert ff["x_norm_regtokens"].shape == (2, 4, 32)
    assert ff["x_norm_patchtokens"].shape == (2, 15, 32)
    maps = small_model.get_intermediate_layers(x, n=1)[0]
    assert torch.equal(maps.flatten(2).transpose(1, 2), ff["x_norm_patchtokens"])

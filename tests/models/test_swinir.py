import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vrestore
from vrestore.models import build
from vrestore.models.swinir import (
    RSTB,
    SwinTransformerBlock,
    edge_windows,
    reorder_index,
    shift_mask,
    window_attention,
    window_partition,
)


def test_reference_vector(reference_dir):
    model = vrestore.load(reference_dir / "swinir_e24_color_dn.pth")
    io = np.load(reference_dir / "swinir_e24_color_dn_io.npz")
    cons = json.loads((reference_dir / "MANIFEST.json").read_text())["swinir_e24_color_dn"]["constructor"]
    assert model.cfg.embed_dim == cons["embed_dim"] and model.cfg.depths == cons["depths"]
    with torch.no_grad():
        out = model(torch.from_numpy(io["input"]))
    assert float((out - torch.from_numpy(io["output"])).abs().max()) < 1e-4


def test_published_m_layout_builds_and_loads(reference_dir, tmp_path):
    spec = json.loads((reference_dir / "checkpoint_layouts.json").read_text())["swinir_m_color_dn"]
    model = build("swinir_m_color_dn")
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"] == 11504163
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(*s, generator=g) * 0.02 for k, s in spec["parameters"].items()}
    own = model.state_dict()
    for k, shape in spec["buffers"].items():  # buffers as the reference computes them
        if k.endswith("attn_mask"):
            params[k] = shift_mask(128, 128, 8, 4)
        else:
            params[k] = own[k]
        assert list(params[k].shape) == shape
    for key in ("params", "params_ema"):
        torch.save({key: params}, tmp_path / f"m_{key}.pth")
        m = vrestore.load(tmp_path / f"m_{key}.pth")
        assert m.cfg.embed_dim == 180 and m.cfg.depths == [6] * 6 and m.cfg.img_size == 128
    with torch.no_grad():
        y = m(torch.rand(1, 3, 20, 27))
    assert y.shape == (1, 3, 20, 27)
    bad = dict(params)
    bad["layers.0.residual_group.blocks.1.attn_mask"] = torch.zeros(256, 64, 64)
    torch.save({"params": bad}, tmp_path / "bad.pth")
    with pytest.raises(vrestore.VrestoreError, match="attention mask"):
        vrestore.load(tmp_path / "bad.pth")


def test_window_chunking_is_exact(monkeypatch):
    torch.manual_seed(0)
    m = build("swinir_t_color_dn").eval()
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        full = m(x)
        monkeypatch.setattr(SwinTransformerBlock, "chunk_windows", 5)
        chunked = m(x)
    assert torch.allclose(full, chunked, atol=1e-5)


@pytest.mark.parametrize("chunk", [4096, 5])
def test_shift_mask_on_edge_windows_only_matches_the_dense_mask(monkeypatch, chunk):
    """Shifted blocks apply the mask to the edge windows alone (the rest share
    the position bias); outputs and gradients equal the dense form that traced
    graphs use."""
    torch.manual_seed(0)
    m = build("swinir_t_color_dn")
    monkeypatch.setattr(SwinTransformerBlock, "chunk_windows", chunk)
    x = torch.rand(2, 3, 40, 56)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        y = m(x)
        y.square().mean().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    split, g_split = run()
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    dense, g_dense = run()
    assert torch.allclose(split, dense, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_split, g_dense, strict=True))


@pytest.mark.parametrize("h,w", [(40, 56), (8, 64), (64, 8), (8, 8), (480, 856)])
def test_edge_windows_are_the_windows_the_shift_mask_touches(h, w):
    m = shift_mask(h, w, 8, 4)
    assert edge_windows(h, w, 8) == m.ne(0).flatten(1).any(1).nonzero().flatten().tolist()


@pytest.mark.parametrize("h,w", [(40, 56), (8, 8), (480, 856)])
def test_shift_mask_of_listed_windows_equals_those_rows_of_the_dense_mask(h, w):
    dense = shift_mask(h, w, 8, 4)
    some = [0, *edge_windows(h, w, 8)]
    assert torch.equal(shift_mask(h, w, 8, 4, some), dense[some])
    assert torch.equal(shift_mask(h, w, 8, 4, []), dense[:0])


def test_eager_blocks_never_build_the_dense_mask():
    """The dense mask grows with the frame (530 MB per shifted block at 1920x1080); eager inference and training
    need the edge windows' masks alone, so no block may hold the dense one after an eager pass."""
    m = build("swinir_t_color_dn").eval()
    with torch.no_grad():
        m(torch.rand(1, 3, 40, 56))
    m(torch.rand(1, 3, 24, 32)).mean().backward()
    blocks = [b for b in m.modules() if isinstance(b, SwinTransformerBlock)]
    assert any(b.shift for b in blocks)
    assert all(b._mask_cache is None for b in blocks)


@pytest.mark.parametrize("upsampler,scale", [("pixelshuffle", 2), ("pixelshuffle", 4), ("pixelshuffledirect", 4)])
def test_upsamplers_and_config_inference(tmp_path, upsampler, scale):
    m = build("swinir", embed_dim=24, depths=[2], num_heads=[2], img_size=32, upsampler=upsampler, upscale=scale,
              num_feat=16).eval()
    torch.save({"params": m.state_dict()}, tmp_path / "sr.pth")
    m2 = vrestore.load(tmp_path / "sr.pth")
    assert (m2.cfg.upsampler, m2.cfg.upscale) == (upsampler, scale)
    x = torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x), atol=1e-6)
    assert m(x).shape == (1, 3, 13 * scale, 17 * scale)


@pytest.mark.slow
def test_1080p_frame_through_swinir_m():
    """The published size on a full-HD frame fits in memory (window chunking)."""
    m = build("swinir_m_color_dn").eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, 1080, 1920))
    assert y.shape == (1, 3, 1080, 1920)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("per_window", [False, True])
def test_window_attention_equals_sdpa(heads, per_window):
    """The written-out attention (faster on CPUs for 64-token windows) is
    scaled dot-product attention with an additive bias, heads concatenated."""
    torch.manual_seed(0)
    b, n, d = 6, 64, 8
    q, k, v = (torch.randn(b, heads, n, d) for _ in range(3))
    bias = torch.randn(b if per_window else 1, heads, n, n)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, heads * d)
    assert torch.allclose(window_attention(q, k, v, bias), want, atol=1e-5)
    # other devices take the fused kernel, with the same output layout
    meta = window_attention(*(t.to("meta") for t in (q, k, v, bias)))
    assert meta.shape == want.shape and meta.device.type == "meta"


@pytest.mark.parametrize("h,w", [(40, 56), (8, 64), (16, 8)])
def test_reorder_index_is_roll_and_partition(h, w):
    torch.manual_seed(0)
    x = torch.randn(2, h * w, 5)
    for shift in (0, 4):
        img = torch.roll(x.view(2, h, w, 5), shifts=(-shift, -shift), dims=(1, 2))
        want = window_partition(img, 8).reshape(2, h * w, 5)
        assert torch.equal(x.index_select(1, reorder_index(h, w, 8, None, shift)), want)
        back = want.index_select(1, reorder_index(h, w, 8, shift, None))
        assert torch.equal(back, x)
    # from one block's windows straight to the next block's shifted windows
    w0 = x.index_select(1, reorder_index(h, w, 8, None, 0))
    assert torch.equal(w0.index_select(1, reorder_index(h, w, 8, 0, 4)),
                       x.index_select(1, reorder_index(h, w, 8, None, 4)))


def test_group_leaves_its_input_alone_without_gradients():
    """Blocks write their results into the group's gathered copy in place when
    no graph is recorded; the group's input is never touched."""
    torch.manual_seed(0)
    g = RSTB(16, 2, 2, 8, 2.0, "1conv").eval()
    x = torch.randn(1, 24 * 32, 16)
    before = x.clone()
    with torch.no_grad():
        y = g(x, (24, 32))
    assert torch.equal(x, before)
    with torch.enable_grad():
        assert torch.allclose(g(x, (24, 32)), y, atol=1e-6)


def test_trains_after_inference_at_the_same_size():
    """The cached gather indices may first be built in inference mode (a
    validation pass); training at that size afterwards must still work."""
    torch.manual_seed(0)
    m = build("swinir", embed_dim=16, depths=[2], num_heads=[2], img_size=32, window_size=8)
    x = torch.rand(1, 3, 40, 48)  # a size no other test uses, so the cache starts empty for it
    with torch.inference_mode():
        m(x)
    m(x).square().mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)

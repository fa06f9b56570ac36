import pytest
import torch
import torch.nn.functional as F

from vrestore.models.dcn import modulated_deform_conv2d


def naive_mdcn(x, offset, mask, weight, bias, stride, pad, dil, groups, dg):
    """Direct per-pixel definition (MMCV's semantics), written independently."""
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    ho = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    cols = torch.zeros(n, c, kh * kw, ho, wo, dtype=x.dtype)

    def bil(img, y, xx):
        if y <= -1 or y >= h or xx <= -1 or xx >= w:
            return torch.zeros(img.shape[0], dtype=img.dtype)
        y0, x0 = int(torch.floor(torch.tensor(y))), int(torch.floor(torch.tensor(xx)))
        out = torch.zeros(img.shape[0], dtype=img.dtype)
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for x1, wx in ((x0, 1 - (xx - x0)), (x0 + 1, xx - x0)):
                if 0 <= yy < h and 0 <= x1 < w:
                    out += wy * wx * img[:, yy, x1]
        return out

    cpg = c // dg
    for b in range(n):
        for g in range(dg):
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(ho):
                        for ox in range(wo):
                            dy = float(offset[b, g * 2 * kh * kw + 2 * k, oy, ox])
                            dx = float(offset[b, g * 2 * kh * kw + 2 * k + 1, oy, ox])
                            m = mask[b, g * kh * kw + k, oy, ox]
                            y = oy * stride - pad + i * dil + dy
                            xx = ox * stride - pad + j * dil + dx
                            cols[b, g * cpg:(g + 1) * cpg, k, oy, ox] = bil(x[b, g * cpg:(g + 1) * cpg], y, xx) * m
    out = torch.zeros(n, cout, ho, wo, dtype=x.dtype)
    cg, og = c // groups, cout // groups
    for gi in range(groups):
        wmat = weight[gi * og:(gi + 1) * og].reshape(og, -1)
        col = cols[:, gi * cg:(gi + 1) * cg].reshape(n, cg * kh * kw, ho * wo)
        out[:, gi * og:(gi + 1) * og] = (wmat @ col).view(n, og, ho, wo)
    return out + bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
@pytest.mark.parametrize("stride,pad,dil,groups,dg", [(1, 1, 1, 1, 2), (2, 1, 1, 2, 1), (2, 1, 1, 2, 2),
                                                     (1, 2, 2, 1, 4)])
def test_matches_direct_definition(stride, pad, dil, groups, dg, sampler):
    if sampler == "gather" and dg % groups:
        with pytest.raises(ValueError, match="divide deform_groups"):
            modulated_deform_conv2d(torch.zeros(1, 8, 5, 5), torch.zeros(1, 18 * dg, 5, 5),
                                    torch.zeros(1, 9 * dg, 5, 5), torch.zeros(6, 8 // groups, 3, 3), None, 1, 1, 1,
                                    groups, dg, sampler=sampler)
        return
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    weight = torch.randn(6, 8 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    ho = (7 + 2 * pad - dil * 2 - 1) // stride + 1
    wo = (9 + 2 * pad - dil * 2 - 1) // stride + 1
    offset = torch.randn(2, 2 * dg * 9, ho, wo, dtype=torch.float64) * 3  # many samples fall outside
    offset[0, :4, 0, 0] = 1e6  # far outside, both ways: the gather sampler clamps positions to its zero border
    offset[1, 4:8, 1, 0] = -1e6
    mask = torch.rand(2, dg * 9, ho, wo, dtype=torch.float64)
    with torch.no_grad():
        ours = modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg, sampler=sampler)
    ref = naive_mdcn(x, offset, mask, weight, bias, stride, pad, dil, groups, dg)
    assert torch.allclose(ours, ref, atol=1e-10)


def test_zero_offsets_unit_mask_equal_conv2d():
    torch.manual_seed(1)
    x = torch.randn(1, 64, 20, 24)
    w = torch.randn(32, 64, 3, 3)
    b = torch.randn(32)
    off = torch.zeros(1, 2 * 16 * 9, 20, 24)
    mask = torch.ones(1, 16 * 9, 20, 24)
    ours = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 1, 16)
    assert torch.allclose(ours, F.conv2d(x, w, b, padding=1), atol=1e-4)


@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
def test_backward_is_correct(sampler):
    """The gather sampler runs eagerly under autograd (only inference compiles it)."""
    torch.manual_seed(2)
    args = [torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True),
            (torch.randn(1, 36, 4, 4, dtype=torch.float64) * 0.7).requires_grad_(),
            torch.rand(1, 18, 4, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: modulated_deform_conv2d(*a, 1, 1, 1, 1, 2, sampler=sampler), args,
                                      atol=1e-6)


def test_exports_to_onnx_and_runs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from vrestore.models.basicvsrpp import SecondOrderDeformableAlignment

    torch.manual_seed(3)
    m = SecondOrderDeformableAlignment(32, 16, deform_groups=4).eval()
    with torch.no_grad():
        m.conv_offset[-1].weight.normal_(0, 0.05)
    inputs = (torch.randn(1, 32, 12, 16), torch.randn(1, 48, 12, 16), torch.randn(1, 2, 12, 16),
              torch.randn(1, 2, 12, 16))
    path = tmp_path / "dcn.onnx"
    torch.onnx.export(m, inputs, str(path), opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)})[0]
    assert abs(got - m(*inputs).detach().numpy()).max() < 1e-4


def _dcn_inputs(seed: int, c: int = 16, dg: int = 4, h: int = 10, w: int = 13):
    torch.manual_seed(seed)
    return (torch.randn(2, c, h, w), torch.randn(2, 2 * dg * 9, h, w) * 2, torch.rand(2, dg * 9, h, w),
            torch.randn(8, c // 2, 3, 3) * 0.1, torch.randn(8))


def test_inference_path_matches_autograd_path_and_leaves_inputs_alone():
    """Without autograd the columns are modulated in place; that must not change the result or the mask."""
    x, off, mask, w, b = _dcn_inputs(4)
    mask_before = mask.clone()
    with torch.no_grad():
        fast = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4)
    graded = modulated_deform_conv2d(x, off, mask.requires_grad_(), w, b, 1, 1, 1, 2, 4)
    assert torch.equal(mask.detach(), mask_before)
    assert torch.allclose(fast, graded.detach(), atol=1e-5)
    with torch.no_grad():  # channels-last input (what the CPU model passes) gives the same numbers
        cl = modulated_deform_conv2d(x.contiguous(memory_format=torch.channels_last), off, mask, w, b, 1, 1, 1, 2, 4)
    assert torch.allclose(cl, fast, atol=1e-5)


def test_bf16_paths_are_close_to_fp32():
    """bf16 autocast (the CPU default where bf16 is native) and plain bf16 tensors take the matmul branch;
    sampling positions stay fp32 either way, so only bf16 rounding of values and weights differs."""
    x, off, mask, w, b = _dcn_inputs(5)
    with torch.no_grad():
        ref = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4)
        plain = modulated_deform_conv2d(x.bfloat16(), off.bfloat16(), mask.bfloat16(), w.bfloat16(), b.bfloat16(),
                                        1, 1, 1, 2, 4)
    scale = ref.abs().max()
    assert auto.dtype == plain.dtype == torch.bfloat16
    assert (auto.float() - ref).abs().max() < 0.02 * scale
    assert (plain.float() - ref).abs().max() < 0.05 * scale  # offsets rounded to bf16 as well


def test_auto_sampler_gathers_for_cpu_inference_only(monkeypatch):
    """``auto`` compiles the gather sampler for CPU inference; autograd, ONNX export and float64 take grid_sample,
    and so does the default (None), unless ``VRESTORE_DCN_SAMPLER`` says otherwise."""
    from vrestore.models import dcn

    monkeypatch.delenv("VRESTORE_DCN_SAMPLER", raising=False)
    x, off, mask, w, b = _dcn_inputs(6)
    args = (x, off, mask, w, b, 2, 4)
    with torch.no_grad():
        assert dcn._use_gather("auto", *args)
        assert not dcn._use_gather(None, *args) and not dcn._use_gather("grid_sample", *args)
        assert not dcn._use_gather("auto", x.double(), off, mask, w, b, 2, 4)
        monkeypatch.setenv("VRESTORE_DCN_SAMPLER", "auto")
        assert dcn._use_gather(None, *args)
    assert not dcn._use_gather("auto", x, off, mask, w.requires_grad_(), b, 2, 4)
    with pytest.raises(ValueError, match="unknown DCN sampler"):
        dcn._use_gather("bilinear", *args)
    with pytest.raises(ValueError, match="divide deform_groups"):
        dcn._use_gather("gather", x, off, mask, w, b, 4, 2)


def test_default_sampler_applies_to_layers_without_their_own(monkeypatch):
    """``default_sampler`` (what a long video's restore sets) reaches layers whose sampler is None, for the block
    only; a layer's own sampler and a user's ``VRESTORE_DCN_SAMPLER`` both win over it."""
    from vrestore.models import dcn

    monkeypatch.delenv("VRESTORE_DCN_SAMPLER", raising=False)
    x, off, mask, w, b = _dcn_inputs(6)
    args = (x, off, mask, w, b, 2, 4)
    with torch.no_grad():
        with dcn.default_sampler("auto"):
            assert dcn._use_gather(None, *args)
            assert not dcn._use_gather("grid_sample", *args)
            with dcn.default_sampler(None):  # None: no change
                assert dcn._use_gather(None, *args)
            monkeypatch.setenv("VRESTORE_DCN_SAMPLER", "grid_sample")
            assert not dcn._use_gather(None, *args)
            monkeypatch.delenv("VRESTORE_DCN_SAMPLER")
        assert not dcn._use_gather(None, *args)
        with pytest.raises(ValueError, match="unknown DCN sampler"), dcn.default_sampler("fast"):
            pass


def test_set_sampler_reaches_every_layer_of_a_model():
    from vrestore.models import build
    from vrestore.models.dcn import ModulatedDeformConv2d, set_sampler

    m = build("basicvsrpp_c16n2_x1")
    assert set_sampler(m, "auto") == 4  # one alignment per propagation branch
    assert {x.sampler for x in m.modules() if isinstance(x, ModulatedDeformConv2d)} == {"auto"}
    with pytest.raises(ValueError, match="unknown DCN sampler"):
        set_sampler(m, "nearest")


def test_gather_matches_grid_sample_in_fp32_and_bf16():
    """The two samplers at a BasicVSR++-like shape (8 channels per group, channels-last offsets as the CPU model
    makes them): equal in fp32, close under bf16 autocast, where both round the columns to bf16."""
    torch.manual_seed(7)
    x = torch.randn(1, 32, 23, 30).contiguous(memory_format=torch.channels_last)
    off = (torch.randn(1, 2 * 4 * 9, 23, 30) * 4).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(1, 4 * 9, 23, 30).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 32, 3, 3) * 0.1, torch.randn(16)
    with torch.no_grad():
        ref = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 1, 4, sampler="grid_sample")
        got = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 1, 4, sampler="gather")
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert torch.allclose(got, ref, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got16 = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 1, 4, sampler="gather")
    assert got16.dtype == torch.bfloat16
    assert (got16.float() - ref).abs().max() < 0.02 * ref.abs().max()


def test_gather_reads_zeros_at_nan_and_infinite_positions():
    x, off, mask, w, b = _dcn_inputs(8)
    off[0, 0, 2, 3] = float("nan")
    off[1, 5, 4, 4] = float("inf")
    off[1, 6, 4, 5] = float("-inf")
    with torch.no_grad():
        got = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4, sampler="gather")
        clean = off.clone()
        clean[0, 0, 2, 3] = clean[1, 5, 4, 4] = clean[1, 6, 4, 5] = -1e6  # the same as far outside the image
        ref = modulated_deform_conv2d(x, clean, mask, w, b, 1, 1, 1, 2, 4, sampler="grid_sample")
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-5)


def test_a_failing_compiler_falls_back_to_grid_sample(monkeypatch, caplog):
    from vrestore.models import dcn

    def broken(*a, **k):
        raise RuntimeError("no Python.h")

    monkeypatch.setattr(dcn, "_compiled", lambda: broken)
    monkeypatch.setattr(dcn, "_COMPILED_OK", True)
    x, off, mask, w, b = _dcn_inputs(9)
    with torch.no_grad():
        got = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4, sampler="auto")
        ref = modulated_deform_conv2d(x, off, mask, w, b, 1, 1, 1, 2, 4, sampler="grid_sample")
    assert torch.allclose(got, ref, atol=1e-5)
    assert "using grid_sample from now on" in caplog.text
    assert not dcn._COMPILED_OK and not dcn._use_gather("auto", x, off, mask, w, b, 2, 4)

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


@pytest.mark.parametrize("stride,pad,dil,groups,dg", [(1, 1, 1, 1, 2), (2, 1, 1, 2, 1), (1, 2, 2, 1, 4)])
def test_matches_direct_definition(stride, pad, dil, groups, dg):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    weight = torch.randn(6, 8 // groups, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    ho = (7 + 2 * pad - dil * 2 - 1) // stride + 1
    wo = (9 + 2 * pad - dil * 2 - 1) // stride + 1
    offset = torch.randn(2, 2 * dg * 9, ho, wo, dtype=torch.float64) * 3  # many samples fall outside
    mask = torch.rand(2, dg * 9, ho, wo, dtype=torch.float64)
    ours = modulated_deform_conv2d(x, offset, mask, weight, bias, stride, pad, dil, groups, dg)
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


def test_backward_is_correct():
    torch.manual_seed(2)
    args = [torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True),
            (torch.randn(1, 36, 4, 4, dtype=torch.float64) * 0.7).requires_grad_(),
            torch.rand(1, 18, 4, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: modulated_deform_conv2d(*a, 1, 1, 1, 1, 2), args, atol=1e-6)


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

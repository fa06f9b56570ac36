"""Modulated deformable convolution (DCNv2) in pure PyTorch.

The same function as MMCV's / torchvision's ``modulated_deform_conv2d``:
offsets are laid out per deformable group as (dy, dx) pairs for each kernel
point in row-major order, the mask has one channel per group and kernel point,
sampling is bilinear with zeros outside the image. No hand-written native op;
the bilinear sampling into columns has two implementations, and the weighted
sum over channels and kernel points is a 1x1 convolution (oneDNN) over them:

- ``"gather"``: the columns are written pixel-major straight from a padded,
  channels-last copy of the input, one expression that inductor
  (``torch.compile``) turns into a single C++ loop (four contiguous loads of a
  group's channels per kernel point, no gather instructions, no index arrays).
  2.6x faster than ``"grid_sample"`` at BasicVSR++'s shape (fp32, channels-last),
  2.9x a plain convolution instead of 7.7x: ``benchmarks/run.py dcn``.
- ``"grid_sample"``: one ``grid_sample`` call for all kernel points;
  differentiable, runs anywhere, exports to ONNX (GridSample, opset >= 16).

``"auto"`` takes ``"gather"`` for CPU inference where a C++ compiler is found,
else ``"grid_sample"``; it is what ``restore --compile`` sets on stage 1's
layers (``set_sampler``). A layer without a sampler of its own follows
``VRESTORE_DCN_SAMPLER`` if set, else the block's ``default_sampler``, else
``"grid_sample"``: compiling costs seconds per feature size, more than a short
clip gains (the 48-frame demo: 79 s with grid_sample, 86 s with the gather
sampler compiled before, 117 s compiling it first), so ``Restorer.restore_video``
asks for ``"auto"`` only for videos long enough to repay it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
SAMPLERS = ("auto", "gather", "grid_sample")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
                            padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                            groups: int = 1, deform_groups: int = 1, sampler: str | None = None) -> torch.Tensor:
    """x (N, C, H, W); offset (N, 2*dg*kh*kw, Ho, Wo); mask (N, dg*kh*kw, Ho, Wo);
    weight (Cout, C/groups, kh, kw) -> (N, Cout, Ho, Wo). ``sampler``: one of
    ``SAMPLERS`` (None: ``VRESTORE_DCN_SAMPLER``, else ``default_sampler``'s, else ``"grid_sample"``)."""
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    k = kh * kw
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dg = deform_groups
    if c % dg or c % groups or cin_g * groups != c:
        raise ValueError(f"channels {c} incompatible with groups={groups}, deform_groups={dg}, weight {weight.shape}")
    if offset.shape[1] != 2 * dg * k or mask.shape[1] != dg * k:
        raise ValueError(f"offset/mask channels {offset.shape[1]}/{mask.shape[1]} != {2 * dg * k}/{dg * k}")
    if offset.shape[2:] != (ho, wo) or mask.shape[2:] != (ho, wo):
        raise ValueError(f"offset/mask size {tuple(offset.shape[2:])}/{tuple(mask.shape[2:])} != output {(ho, wo)}")
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
    if _use_gather(sampler, x, offset, mask, weight, bias, groups, dg):
        try:
            return _by_gather(x, offset, mask, weight, bias, groups, dg, geometry)
        except Exception as e:  # noqa: BLE001 - a compiler that fails here must not stop a restore
            if not _COMPILED_OK or torch.compiler.is_compiling():
                raise
            _disable_compiled(e)
    return _by_grid_sample(x, offset, mask, weight, bias, groups, dg, geometry)


# ----------------------------------------------------------------------------- choosing the sampler

_COMPILED_OK = True  # cleared when inductor fails once (no headers, broken toolchain): grid_sample from then on
_compiled_gather = None


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown DCN sampler {sampler!r}; expected one of {SAMPLERS}")


_DEFAULT_SAMPLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("dcn_sampler", default=None)


@contextlib.contextmanager
def default_sampler(sampler: str | None):
    """Within the block, layers without a sampler of their own use ``sampler`` (None: no change), unless the
    user set ``VRESTORE_DCN_SAMPLER``: a per-call choice (a long video) that leaves the modules as they are."""
    if sampler is None:
        yield
        return
    _check_sampler(sampler)
    token = _DEFAULT_SAMPLER.set(sampler)
    try:
        yield
    finally:
        _DEFAULT_SAMPLER.reset(token)


def user_sampler() -> str | None:
    """The sampler the user chose (``VRESTORE_DCN_SAMPLER``), if any: it wins over ``default_sampler``."""
    return os.environ.get("VRESTORE_DCN_SAMPLER") or None


def _use_gather(sampler: str | None, x, offset, mask, weight, bias, groups: int, dg: int) -> bool:
    sampler = sampler or user_sampler() or _DEFAULT_SAMPLER.get() or "grid_sample"
    _check_sampler(sampler)
    if sampler == "grid_sample":
        return False
    if dg % groups:  # columns are deform-group-major: a conv group must span whole deform groups
        if sampler == "gather":
            raise ValueError(f"the gather sampler needs groups ({groups}) to divide deform_groups ({dg})")
        return False
    if sampler == "gather":
        return True
    tensors = [x, offset, mask, weight] + ([] if bias is None else [bias])
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.jit.is_scripting()
    return _can_compile(x, tensors) and not exporting and x.dtype in (torch.float32, torch.bfloat16)


def _can_compile(x: torch.Tensor, tensors) -> bool:
    """Whether inductor may build the gather loop here: CPU, no gradient wanted from ``tensors``, a compiler."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not needs_grad and can_compile_on(x.device)


def can_compile_on(device: torch.device | str) -> bool:
    """Whether ``"auto"`` would compile the gather sampler for inference on ``device`` (a CPU with a C++
    compiler, and no failed compilation so far in this process)."""
    return torch.device(device).type == "cpu" and _COMPILED_OK and _have_compiler()


def _cpu_autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@functools.cache
def _have_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def _disable_compiled(err: Exception) -> None:
    global _COMPILED_OK
    _COMPILED_OK = False
    log.warning("compiling the deformable convolution's sampling failed (%s: %s); using grid_sample from now on "
                "(set VRESTORE_DCN_SAMPLER=grid_sample to skip the attempt)", type(err).__name__, str(err)[:200])


def _undeformed_positions(geometry, dev: torch.device, dtype: torch.dtype):
    """Where the kernel samples before its offsets, for both samplers: the first kernel point's row of each
    output row (Ho,) and column of each output column (Wo,), and each kernel point's (dy, dx) from it, (k,)
    each, row-major."""
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = geometry
    ys = torch.arange(ho, device=dev, dtype=dtype) * sh - ph
    xs = torch.arange(wo, device=dev, dtype=dtype) * sw - pw
    ky = (torch.arange(kh, device=dev, dtype=dtype) * dh).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=dtype) * dw).repeat(kh)
    return ys, xs, ky, kx


# ----------------------------------------------------------------------------- gather

def _gather_columns(table: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, base_y: torch.Tensor,
                    base_x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear samples, modulated: (N, Ho*Wo, dg*k*cg), channels in (group, kernel point, channel) order.

    ``table``: the input as rows of one group's channels, (N*(h+3)*(w+3)*dg, cg), zero-padded by one pixel
    before and two after, so that a position clamped to [-1, h] x [-1, w] reads zeros for every corner
    outside the image (a position further out has zero weight on its in-image corners after the clamp) and
    no bounds test is needed. ``offset`` (N, Ho, Wo, dg, k, 2) (dy, dx), ``mask`` (N, Ho, Wo, dg, k), views
    in any layout; ``base_y`` (Ho, 1, 1, k) and ``base_x`` (Wo, 1, k): each kernel point's undeformed
    position. Written for inductor, which fuses it into one loop nest over pixels, groups and kernel points
    with the channels innermost; run eagerly it is right but slow.
    """
    n, ho, wo, dg, k = mask.shape
    cg = table.shape[1]
    row = (w + 3) * dg
    y, x = offset[..., 0] + base_y, offset[..., 1] + base_x
    y = torch.where(y > -1, y, -1.0).clamp(max=h)  # NaN (fails every comparison) reads zeros
    x = torch.where(x > -1, x, -1.0).clamp(max=w)
    y0, x0 = y.floor(), x.floor()
    ly, lx = (y - y0).unsqueeze(-1), (x - x0).unsqueeze(-1)
    first = (torch.arange(n, device=table.device) * (h + 3) + 1) * row + dg  # pixel (0, 0) of each sample
    r = (y0.long() * row + x0.long() * dg + first.view(n, 1, 1, 1, 1)
         + torch.arange(dg, device=table.device).view(dg, 1))
    v00, v01, v10, v11 = table[r], table[r + dg], table[r + row], table[r + row + dg]
    top = v00 + (v01 - v00) * lx
    bottom = v10 + (v11 - v10) * lx
    cols = (top + (bottom - top) * ly) * mask.unsqueeze(-1)
    return cols.to(table.dtype).reshape(n, ho * wo, dg * k * cg)


def _by_gather(x, offset, mask, weight, bias, groups: int, dg: int, geometry) -> torch.Tensor:
    kh, kw, ho, wo = geometry[0], geometry[1], geometry[-2], geometry[-1]
    n, c, h, w = x.shape
    cout, cg, k = weight.shape[0], c // dg, kh * kw
    dtype = torch.bfloat16 if _cpu_autocast_bf16() and x.device.type == "cpu" else x.dtype
    pdtype = torch.promote_types(dtype, torch.float32)  # positions need more than bf16's 8 bits
    table = x.new_zeros(n, h + 3, w + 3, dg, cg, dtype=dtype)
    table[:, 1:h + 1, 1:w + 1] = x.reshape(n, dg, cg, h, w).permute(0, 3, 4, 1, 2)
    ys, xs, ky, kx = _undeformed_positions(geometry, x.device, pdtype)
    base_y, base_x = ys.view(ho, 1, 1, 1) + ky, xs.view(wo, 1, 1) + kx
    # Pixel-major offsets and mask, as the loop reads them (the CPU model's already are; a copy costs less
    # than strided reads of planar ones).
    cl = torch.channels_last
    off = offset.to(pdtype).contiguous(memory_format=cl).reshape(n, dg, k, 2, ho, wo).permute(0, 4, 5, 1, 2, 3)
    m = mask.to(pdtype).contiguous(memory_format=cl).reshape(n, dg, k, ho, wo).permute(0, 3, 4, 1, 2)
    # Eagerly (right but slow) under autograd, where a compiled backward was not tried, and inside an outer
    # torch.compile, which compiles it with the rest.
    fn = _compiled() if _can_compile(x, (x, offset, mask)) and not torch.compiler.is_compiling() else _gather_columns
    cols = fn(table.view(-1, cg), off, m, base_y, base_x, h, w)
    cols = cols.view(n, ho, wo, dg * k * cg).permute(0, 3, 1, 2)  # channels-last: oneDNN's 1x1 conv reads it as is
    # weight (cout, C/groups = (dg/groups, cg), k) in the columns' order (dg/groups, k, cg)
    wmat = weight.reshape(cout, dg // groups, cg, k).transpose(2, 3).reshape(cout, -1, 1, 1).to(dtype)
    return F.conv2d(cols, wmat, None if bias is None else bias.to(dtype), groups=groups)


def _compiled():
    global _compiled_gather
    if _compiled_gather is None:
        # One graph per input size and dtype (dynamic shapes ran slower); a folder of clips of many sizes needs
        # more than dynamo's default of 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_gather = torch.compile(_gather_columns, dynamic=False)
    return _compiled_gather


# ----------------------------------------------------------------------------- grid_sample

def _by_grid_sample(x, offset, mask, weight, bias, groups: int, dg: int, geometry) -> torch.Tensor:
    kh, kw, ho, wo = geometry[0], geometry[1], geometry[-2], geometry[-1]
    n, c, h, w = x.shape
    cout, cin_g, k = weight.shape[0], weight.shape[1], kh * kw
    dtype = x.dtype
    sdtype = torch.promote_types(dtype, torch.float32)  # sampling positions need more than bf16's 8 bits
    # Sampling positions normalised for grid_sample (align_corners=True: -1 is pixel 0, +1 pixel size-1):
    # base position of every kernel point at every output pixel, (k, Ho, Wo), plus the scaled offset.
    fy, fx = 2.0 / max(h - 1, 1), 2.0 / max(w - 1, 1)
    ys, xs, ky, kx = _undeformed_positions(geometry, x.device, sdtype)
    base_y = (ky.reshape(k, 1, 1) + ys.reshape(1, ho, 1)) * fy - 1.0
    base_x = (kx.reshape(k, 1, 1) + xs.reshape(1, 1, wo)) * fx - 1.0
    # Planar offsets and mask (the CPU model's are channels-last): the passes below then read them in order.
    off = offset.reshape(n, dg, k, 2, ho, wo).to(sdtype).contiguous()
    gy = torch.add(base_y, off[:, :, :, 0], alpha=fy)  # (n, dg, k, Ho, Wo)
    gx = torch.add(base_x, off[:, :, :, 1], alpha=fx)
    grid = torch.stack((gx, gy), dim=-1).reshape(n * dg, k * ho, wo, 2)

    # One image per (sample, deformable group), planar: a channels-last x interleaves the groups, which
    # makes grid_sample's gathers 1.7x slower than the copy costs.
    xg = x.reshape(n * dg, c // dg, h, w).to(sdtype).contiguous()
    sampled = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # (n*dg, C/dg, k*Ho, Wo) viewed as (n, C*k, Ho, Wo): channel index c*k + kernel point, the weight's order.
    sampled = sampled.view(n, dg, c // dg, k, ho, wo)
    m = mask.reshape(n, dg, 1, k, ho, wo).to(sampled.dtype).contiguous()
    if sampled.requires_grad or m.requires_grad:
        sampled = sampled * m
    else:  # inference: modulate in place, no second buffer of the columns' size
        sampled.mul_(m)
    cols = sampled.view(n, c * k, ho, wo).to(dtype)
    wmat = weight.reshape(cout, cin_g * k, 1, 1).to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if cols.device.type == "cpu" and (cols.dtype == torch.bfloat16 or _cpu_autocast_bf16()):
        # bf16: a matmul (oneDNN) over the columns beats a 1x1 convolution, which reorders them first.
        cols = cols.to(torch.bfloat16).reshape(n, groups, cin_g * k, ho * wo)
        out = torch.matmul(wmat.to(torch.bfloat16).reshape(1, groups, cout // groups, cin_g * k), cols)
        out = out.reshape(n, cout, ho, wo)
        return out if bias is None else out + bias.to(out.dtype).reshape(1, cout, 1, 1)
    # fp32 and the rest: a 1x1 convolution, which oneDNN runs 1.6x faster on the CPU than MKL's matmul.
    return F.conv2d(cols, wmat, bias, groups=groups)


class ModulatedDeformConv2d(nn.Module):
    """Layer holding the weight and bias; offsets and masks come from the caller.
    Parameter names match MMCV (``weight``, ``bias``) so checkpoints load as is."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, deform_groups: int = 1, bias: bool = True):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.deform_groups = groups, deform_groups
        self.sampler: str | None = None  # see SAMPLERS; None: the op's default
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups, sampler=self.sampler)


def set_sampler(model: nn.Module, sampler: str | None) -> int:
    """Set the sampler of every deformable convolution in ``model``; returns how many there are."""
    if sampler is not None:
        _check_sampler(sampler)
    layers = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    for m in layers:
        m.sampler = sampler
    return len(layers)

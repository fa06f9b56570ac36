"""Modulated deformable convolution (DCNv2) in pure PyTorch.

The same function as MMCV's / torchvision's ``modulated_deform_conv2d``:
offsets are laid out per deformable group as (dy, dx) pairs for each kernel
point in row-major order, the mask has one channel per group and kernel point,
sampling is bilinear with zeros outside the image. No compiled op: bilinear
sampling is one ``grid_sample`` call for all kernel points, followed by one
matrix product, so it runs on CPU and GPU, differentiates, and exports to ONNX
(GridSample, opset >= 16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
                            padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                            groups: int = 1, deform_groups: int = 1) -> torch.Tensor:
    """x (N, C, H, W); offset (N, 2*dg*kh*kw, Ho, Wo); mask (N, dg*kh*kw, Ho, Wo);
    weight (Cout, C/groups, kh, kw) -> (N, Cout, Ho, Wo)."""
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

    dtype = x.dtype
    # Base sampling positions of every kernel point at every output pixel, (k, Ho, Wo).
    ys = torch.arange(ho, device=x.device, dtype=offset.dtype) * sh - ph
    xs = torch.arange(wo, device=x.device, dtype=offset.dtype) * sw - pw
    ky = (torch.arange(kh, device=x.device, dtype=offset.dtype) * dh).repeat_interleave(kw)
    kx = (torch.arange(kw, device=x.device, dtype=offset.dtype) * dw).repeat(kh)
    base_y = ky.reshape(k, 1, 1) + ys.reshape(1, ho, 1)
    base_x = kx.reshape(k, 1, 1) + xs.reshape(1, 1, wo)

    off = offset.reshape(n, dg, k, 2, ho, wo)
    py = base_y + off[:, :, :, 0]  # (n, dg, k, Ho, Wo)
    px = base_x + off[:, :, :, 1]
    # Normalise for grid_sample with align_corners=True: -1 is pixel 0, +1 pixel size-1.
    gx = px * (2.0 / max(w - 1, 1)) - 1.0
    gy = py * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1).reshape(n * dg, k * ho, wo, 2).to(dtype)

    xg = x.reshape(n * dg, c // dg, h, w)
    sampled = F.grid_sample(xg, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    # (n*dg, C/dg, k*Ho, Wo) -> modulate -> columns (n, C*k, Ho*Wo) with C major, k minor.
    sampled = sampled.reshape(n, dg, c // dg, k, ho, wo) * mask.reshape(n, dg, 1, k, ho, wo).to(dtype)
    cols = sampled.reshape(n, groups, (c // groups) * k, ho * wo)
    wmat = weight.reshape(groups, cout // groups, cin_g * k).to(dtype)
    out = torch.matmul(wmat.unsqueeze(0), cols)  # (n, groups, Cout/groups, Ho*Wo)
    out = out.reshape(n, cout, ho, wo)
    if bias is not None:
        out = out + bias.reshape(1, cout, 1, 1).to(dtype)
    return out


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
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups)

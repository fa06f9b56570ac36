"""Modulated deformable convolution (DCNv2) in pure PyTorch.

The same function as MMCV's / torchvision's ``modulated_deform_conv2d``:
offsets are laid out per deformable group as (dy, dx) pairs for each kernel
point in row-major order, the mask has one channel per group and kernel point,
sampling is bilinear with zeros outside the image. No compiled op: bilinear
sampling is one ``grid_sample`` call for all kernel points, and the weighted sum
over channels and kernel points is a 1x1 convolution (oneDNN) over the sampled
columns, so it runs on CPU and GPU, differentiates, and exports to ONNX
(GridSample, opset >= 16). Sampling dominates: ``benchmarks/run.py dcn``.
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
    sdtype = torch.promote_types(dtype, torch.float32)  # sampling positions need more than bf16's 8 bits
    # Sampling positions normalised for grid_sample (align_corners=True: -1 is pixel 0, +1 pixel size-1):
    # base position of every kernel point at every output pixel, (k, Ho, Wo), plus the scaled offset.
    fy, fx = 2.0 / max(h - 1, 1), 2.0 / max(w - 1, 1)
    dev = x.device
    ys = torch.arange(ho, device=dev, dtype=sdtype) * sh - ph
    xs = torch.arange(wo, device=dev, dtype=sdtype) * sw - pw
    ky = (torch.arange(kh, device=dev, dtype=sdtype) * dh).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=sdtype) * dw).repeat(kh)
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
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if cols.device.type == "cpu" and (cols.dtype == torch.bfloat16 or autocast_bf16):
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
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.groups, self.deform_groups)

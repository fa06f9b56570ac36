"""SPyNet optical flow (Ranjan and Black, 2017) and backward flow warping.

Parameter names follow MMEditing's ``SPyNet`` (``basic_module.{level}.
basic_module.{i}.conv``) so the flow network inside published BasicVSR++
checkpoints loads unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def flow_warp(x: torch.Tensor, flow: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``x`` (N, C, H, W) at positions displaced by ``flow`` (N, 2, H, W),
    (dx, dy) in pixels; bilinear, align_corners=True."""
    n, _, h, w = x.shape
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device, dtype=flow.dtype),
                            torch.arange(w, device=x.device, dtype=flow.dtype), indexing="ij")
    px = gx + flow[:, 0]
    py = gy + flow[:, 1]
    grid = torch.stack((px * (2.0 / max(w - 1, 1)) - 1.0, py * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=True)


class _ConvAct(nn.Module):
    def __init__(self, cin: int, cout: int, act: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 7, 1, 3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.act else x


class SPyNetBasicModule(nn.Module):
    """One pyramid level: predicts a flow residual from (ref, warped supp, flow)."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.Sequential(_ConvAct(8, 32, True), _ConvAct(32, 64, True), _ConvAct(64, 32, True),
                                          _ConvAct(32, 16, True), _ConvAct(16, 2, False))
        # Untrained, predict zero flow rather than random flow: training from
        # scratch then starts from "no motion" instead of warping with noise.
        nn.init.zeros_(self.basic_module[-1].conv.weight)
        nn.init.zeros_(self.basic_module[-1].conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(x)


class SPyNet(nn.Module):
    """Coarse-to-fine flow over a 6-level pyramid; ``forward(ref, supp)``
    returns the flow that warps ``supp`` onto ``ref``."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList([SPyNetBasicModule() for _ in range(6)])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def predicts_zero(self) -> bool:
        """Whether every level still has its zero output layer (never trained)."""
        return all(not m.basic_module[-1].conv.weight.any() for m in self.basic_module)

    def reset_output_layers(self) -> None:
        """Random output layers (PyTorch's default init). Supervised flow
        training from the zero start sits at a saddle: the output layer sees
        features uncorrelated with the motion and keeps predicting zero, so the
        layers before it get no gradient (measured: EPE equal to the zero
        flow's after 750 iterations; with random output layers it falls from
        iteration ~200)."""
        for m in self.basic_module:
            m.basic_module[-1].conv.reset_parameters()

    def compute_flow(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        n, _, h, w = ref.shape
        refs = [(ref - self.mean) / self.std]
        supps = [(supp - self.mean) / self.std]
        for _ in range(5):
            refs.append(F.avg_pool2d(refs[-1], 2, 2, count_include_pad=False))
            supps.append(F.avg_pool2d(supps[-1], 2, 2, count_include_pad=False))
        refs, supps = refs[::-1], supps[::-1]
        flow = ref.new_zeros(n, 2, h // 32, w // 32)
        for level, (r, s) in enumerate(zip(refs, supps, strict=True)):
            up = flow if level == 0 else F.interpolate(flow, scale_factor=2, mode="bilinear",
                                                       align_corners=True) * 2.0
            flow = up + self.basic_module[level](torch.cat([r, flow_warp(s, up, "border"), up], 1))
        return flow

    def forward(self, ref: torch.Tensor, supp: torch.Tensor) -> torch.Tensor:
        h, w = ref.shape[2:]
        hu, wu = (h + 31) // 32 * 32, (w + 31) // 32 * 32  # not -(-h // 32): ONNX divides truncating
        ref = F.interpolate(ref, size=(hu, wu), mode="bilinear", align_corners=False)
        supp = F.interpolate(supp, size=(hu, wu), mode="bilinear", align_corners=False)
        flow = F.interpolate(self.compute_flow(ref, supp), size=(h, w), mode="bilinear", align_corners=False)
        # Rescale (dx, dy) to the original size; per-channel products (not a
        # constant tensor) so that exported graphs keep the sizes dynamic.
        return torch.cat([flow[:, :1] * (w / wu), flow[:, 1:] * (h / hu)], dim=1)

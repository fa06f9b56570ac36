"""Frame pairs with known optical flow, for pre-training SPyNet.

Published BasicVSR++ starts from SPyNet weights trained on Sintel/KITTI; we may
not download them, and a SPyNet that learns only through the restoration loss
starts at zero flow and stays near it on our short CPU runs. Two views of one
photograph under two nearby affine cameras give exact flow for free: frame i
shows the photograph at ``A_i(q) = c_i + k_i R(theta_i) (q - m)``, so the pixel
``p`` of the reference frame is found in the second frame at
``A_2^{-1}(A_1(p))`` and the flow is that minus ``p`` (SPyNet's convention:
the flow that warps the second frame onto the reference).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VrestoreError
from .sources import PHOTOS, VALIDATION_PHOTOS, photo


def _rotation(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def affine_flow(size: int, a1: tuple[np.ndarray, float, np.ndarray], a2: tuple[np.ndarray, float, np.ndarray]
                ) -> np.ndarray:
    """(2, size, size) flow (dx, dy) from camera ``a1`` to ``a2``; a camera is
    (centre c, scale k, rotation matrix R) mapping frame pixels to photograph pixels."""
    m = (size - 1) / 2.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    q = np.stack([xs.ravel() - m, ys.ravel() - m])  # (2, P) frame offsets from the centre
    (c1, k1, r1), (c2, k2, r2) = a1, a2
    s = c1[:, None] + k1 * (r1 @ q)  # photograph positions seen by the reference frame
    p2 = (r2.T @ (s - c2[:, None])) / k2  # the same positions in the second frame, centred
    return (p2 - q).reshape(2, size, size)


def render(img: torch.Tensor, size: int, cam: tuple[np.ndarray, float, np.ndarray]) -> torch.Tensor:
    """The (3, size, size) view of ``img`` (3, H, W) through camera ``cam`` (bicubic)."""
    c, k, r = cam
    h, w = img.shape[1:]
    m = (size - 1) / 2.0
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64) - m, torch.arange(size, dtype=torch.float64) - m,
                            indexing="ij")
    r_t = torch.from_numpy(r)
    px = c[0] + k * (r_t[0, 0] * xs + r_t[0, 1] * ys)
    py = c[1] + k * (r_t[1, 0] * xs + r_t[1, 1] * ys)
    grid = torch.stack((px * (2.0 / (w - 1)) - 1.0, py * (2.0 / (h - 1)) - 1.0), -1).float().unsqueeze(0)
    return F.grid_sample(img.unsqueeze(0), grid, mode="bicubic", padding_mode="border", align_corners=True)[0]


class KnownFlowPairs:
    """Pairs of views of the scikit-image photographs (validation photographs
    excluded) with their exact flow. Motion: translation up to ``max_shift``
    pixels (squared-uniform radius, so small motions dominate as in video),
    rotation up to ``max_rotate`` degrees and zoom up to ``max_zoom``;
    photographs at full, half and quarter size (quarter size is what the
    same-size BasicVSR++ hands SPyNet); Gaussian noise up to ``noise`` / 255.
    ``sample`` returns (frames (B, 2, 3, P, P), flow (B, 2, P, P))."""

    def __init__(self, patch: int, max_shift: float = 12.0, max_rotate: float = 3.0, max_zoom: float = 0.04,
                 noise: float = 8.0, photos: tuple[str, ...] | None = None):
        names = photos or tuple(p for p in PHOTOS if p not in VALIDATION_PHOTOS)
        if patch < 32:
            raise VrestoreError(f"flow patches must be at least 32 px (SPyNet's coarsest level), not {patch}")
        self.patch, self.max_shift, self.noise = patch, max_shift, noise
        self.max_rotate, self.max_zoom = math.radians(max_rotate), max_zoom
        # distance from a view's centre to the farthest photograph pixel it can touch (scale k up to 1.25,
        # then the shift, then the bicubic support)
        self.margin = patch / 2.0 * math.sqrt(2.0) * (1.0 + max_zoom) * 1.25 + max_shift * 1.25 + 4.0
        self.levels: list[torch.Tensor] = []  # every photograph at 1, 1/2, 1/4 size where the views fit inside
        for n in names:
            img = torch.from_numpy(photo(n)).permute(2, 0, 1).float().div(255.0)
            for f in (1, 2, 4):
                lev = F.avg_pool2d(img.unsqueeze(0), f)[0] if f > 1 else img
                if min(lev.shape[1:]) >= 2 * self.margin + 1:
                    self.levels.append(lev)
        if not self.levels:
            raise VrestoreError(f"no photograph is large enough for {patch} px flow patches")

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.patch
        frames, flows = [], []
        for _ in range(batch):
            img = self.levels[int(rng.integers(0, len(self.levels)))]
            h, w = img.shape[1:]
            mg = self.margin
            c1 = np.array([rng.uniform(mg, w - 1 - mg), rng.uniform(mg, h - 1 - mg)])
            k1 = rng.uniform(0.8, 1.25)
            th1 = rng.uniform(-math.pi, math.pi) if rng.random() < 0.5 else 0.0  # upright half the time
            r1 = _rotation(th1)
            radius = self.max_shift * rng.random() ** 2
            ang = rng.uniform(0, 2 * math.pi)
            shift = radius * np.array([math.cos(ang), math.sin(ang)])  # in reference-frame pixels
            cam1 = (c1, k1, r1)
            cam2 = (c1 + k1 * (r1 @ shift), k1 * (1.0 + rng.uniform(-self.max_zoom, self.max_zoom)),
                    _rotation(th1 + rng.uniform(-self.max_rotate, self.max_rotate)))
            pair = torch.stack([render(img, p, cam1), render(img, p, cam2)])
            sigma = rng.uniform(0, self.noise) / 255.0
            pair = pair + sigma * torch.from_numpy(rng.standard_normal(pair.shape)).float()
            frames.append((pair.clamp(0, 1) * 255).round() / 255)  # 8-bit frames, as decoded video is
            flows.append(torch.from_numpy(affine_flow(p, cam1, cam2)).float())
        return torch.stack(frames), torch.stack(flows)

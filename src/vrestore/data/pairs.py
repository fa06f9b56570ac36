"""Training samples: random temporal windows and aligned crops of prepared
pairs (``vrestore prepare``), still-image denoising patches, and cached
stage-1 outputs for stage 2.

Samples are drawn from a generator seeded by (seed, iteration), so a resumed
run sees exactly the batches it would have seen without the interruption.
Frames are decoded once into uint8 ``.npy`` files beside the data set
(``FRAME_STORE``) and memory-mapped, so a data set larger than RAM trains
from the page cache and every process and step shares one copy.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from ..errors import VrestoreError

log = logging.getLogger(__name__)

#: folder, inside a prepared data set, of its decoded frames (one .npy per video)
FRAME_STORE = ".frames"
#: index file of a stage-1 output cache folder: what it was made from and its clips' names
CACHE_INDEX = "index.json"


def _read_all(path: Path) -> np.ndarray:
    from ..video.io import VideoReader

    frames = [f.rgb for f in VideoReader(path)]
    if not frames:
        raise VrestoreError(f"{path}: no frames")
    return np.stack(frames)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``path`` whole or not at all (a killed run leaves no half file)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def decoded_frames(root: Path, rel: str) -> np.ndarray:
    """All frames of the video ``root / rel`` as (T, H, W, 3) uint8, decoded
    once into ``root / FRAME_STORE`` and memory-mapped read-only. The file
    name carries the video's size and modification time, so a re-prepared
    video is decoded again (and its stale copy removed). In memory, with a
    warning, where the data set's folder is not writable."""
    src = root / rel
    st = src.stat()
    stem = rel.replace("/", "__").replace("\\", "__")
    store = root / FRAME_STORE
    npy = store / f"{stem}.{st.st_size}-{st.st_mtime_ns}.npy"
    if npy.exists():
        return np.load(npy, mmap_mode="r")
    frames = _read_all(src)
    try:
        store.mkdir(exist_ok=True)
        for stale in store.iterdir():  # this video as it was before (not another rank's current copy)
            if stale != npy and re.fullmatch(rf"{re.escape(stem)}\.\d+-\d+\.npy", stale.name):
                stale.unlink(missing_ok=True)
        save_npy(npy, frames)
    except OSError as e:
        log.warning("%s: cannot store decoded frames (%s); holding them in memory", store, e)
        return frames
    return np.load(npy, mmap_mode="r")


@dataclass
class Clip:
    name: str
    lq: np.ndarray  # (T, h, w, 3) uint8
    gt: np.ndarray  # (T, H, W, 3) uint8
    pqfs: set[int]
    keep: np.ndarray  # indices kept after duplicate removal


def augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Same random h/v flip and transpose for every array (..., H, W, C)."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    out = []
    for a in arrays:
        if hflip:
            a = a[..., :, ::-1, :]
        if vflip:
            a = a[..., ::-1, :, :]
        if transpose:
            a = np.swapaxes(a, -3, -2)
        out.append(np.ascontiguousarray(a))
    return out


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1]."""
    t = torch.from_numpy(a if a.flags.writeable else np.array(a)).float().div_(255.0)
    return t.movedim(-1, -3)


def read_meta(root: Path) -> dict:
    """A prepared data set's meta.json (clips, their files and PQF lists)."""
    meta_path = root / "meta.json"
    if not meta_path.exists():
        raise VrestoreError(f"{root}: no meta.json; build the data set with `vrestore prepare`")
    return json.loads(meta_path.read_text())


def in_subset(name: str, subset: list[str] | None) -> bool:
    """Whether a clip belongs to a recipe step's ``subset`` (clip names or
    shell patterns such as ``ldv_*``); no subset means every clip."""
    return not subset or any(fnmatch(name, pattern) for pattern in subset)


def data_roots(root: str | Path | Sequence[str | Path]) -> list[Path]:
    """One prepared data set folder, or several (a recipe's ``data.train``
    may list them, e.g. real clips and procedural cartoons), as a list."""
    if isinstance(root, (str, os.PathLike)):
        return [Path(root)]
    roots = [Path(str(r)) for r in root]
    if not roots:
        raise VrestoreError("no prepared data set given (an empty list)")
    return roots


def read_metas(root: str | Path | Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """(folder, meta.json) of each data set of ``root`` in order; the sets
    must share a scale, and clip names must be unique across them so that a
    step's ``subset`` and the logs name one clip each."""
    metas = [(r, read_meta(r)) for r in data_roots(root)]
    scales = {int(m["scale"]) for _, m in metas}
    if len(scales) > 1:
        raise VrestoreError(f"data sets {[str(r) for r, _ in metas]} mix scales {sorted(scales)}: prepare them "
                            "for one task")
    seen: dict[str, Path] = {}
    for r, m in metas:
        for name in m["clips"]:
            if name in seen:
                raise VrestoreError(f"clip {name!r} is in both {seen[name]} and {r}: rename one of the source "
                                    "videos and prepare its set again")
            seen[name] = r
    return metas


def clip_names(root: str | Path | Sequence[str | Path]) -> list[str]:
    """The clip names of one prepared set or several, in the order the sets
    are sampled and cached (each set's in name order, after the set before),
    read from meta.json alone: nothing is decoded."""
    return [n for _, meta in read_metas(root) for n in sorted(meta["clips"])]


class PairedClips:
    """Windows of ``clip_len`` frames from a prepared data set folder, or
    from several (their clips in name order, each set after the one before);
    ``subset``: clip names or shell patterns (``ldv_*``) to keep."""

    def __init__(self, root: str | Path | Sequence[str | Path], clip_len: int, patch: int, *,
                 subset: list[str] | None = None, dedup: bool = False, max_frames: int | None = None):
        metas = read_metas(root)
        self.scale = int(metas[0][1]["scale"])
        self.clip_len, self.patch = clip_len, patch
        self.clips: list[Clip] = []
        for folder, name, c in [(f, n, c) for f, m in metas for n, c in sorted(m["clips"].items())]:
            if not in_subset(name, subset):
                continue
            lq, gt = decoded_frames(folder, c["lq"]), decoded_frames(folder, c["gt"])
            if max_frames:
                lq, gt = lq[:max_frames], gt[:max_frames]
            n = min(len(lq), len(gt))
            lq, gt = lq[:n], gt[:n]
            keep = np.arange(n)
            if dedup:
                same = np.array([False] + [np.array_equal(lq[i], lq[i - 1]) for i in range(1, n)])
                keep = np.nonzero(~same)[0]
            if len(keep) < clip_len:
                continue
            self.clips.append(Clip(name, lq, gt, set(c["pqfs"]), keep))
        if not self.clips:
            where = ", ".join(str(f) for f, _ in metas)
            within = f" in subset {subset}" if subset else ""
            raise VrestoreError(f"{where}: no clip has {clip_len} frames{within}")
        weights = np.array([len(c.keep) for c in self.clips], np.float64)
        self.weights = weights / weights.sum()

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(lq (B, T, 3, h, w), gt (B, T, 3, H, W), pqfs of the window). All
        windows of a batch share the PQF phase so one PQF list serves all."""
        T, s, p = self.clip_len, self.scale, self.patch
        phase = int(rng.integers(0, 4))
        lqs, gts = [], []
        pqfs: list[int] = []
        for _ in range(batch):
            c = self.clips[int(rng.choice(len(self.clips), p=self.weights))]
            starts = [i for i in range(len(c.keep) - T + 1) if c.keep[i] % 4 == phase] or \
                list(range(len(c.keep) - T + 1))
            i0 = starts[int(rng.integers(0, len(starts)))]
            idx = c.keep[i0: i0 + T]
            pqfs = [j for j, k in enumerate(idx) if k in c.pqfs]
            h, w = c.lq.shape[1:3]
            lp = p // s
            if h < lp or w < lp:
                raise VrestoreError(f"clip {c.name} ({w}x{h}) is smaller than the LQ patch {lp}")
            y, x = int(rng.integers(0, h - lp + 1)), int(rng.integers(0, w - lp + 1))
            lq = c.lq[idx, y: y + lp, x: x + lp]
            gt = c.gt[idx, y * s: (y + lp) * s, x * s: (x + lp) * s]
            lq, gt = augment([lq, gt], rng)
            lqs.append(lq)
            gts.append(gt)
        return to_tensor(np.stack(lqs)), to_tensor(np.stack(gts)), pqfs

    def validation_clips(self, max_frames: int) -> list[tuple[str, np.ndarray, np.ndarray, list[int]]]:
        return [(c.name, c.lq[:max_frames], c.gt[:max_frames], sorted(p for p in c.pqfs if p < max_frames))
                for c in self.clips]


class NoisyStills:
    """Stage-2 pre-training: clean photograph patches with Gaussian noise
    (sigma in [sigma_min, sigma_max] / 255), as SwinIR's denoising task."""

    def __init__(self, patch: int, sigma: tuple[float, float] = (5.0, 50.0)):
        from .sources import PHOTOS, photo

        self.images = [photo(n) for n in PHOTOS]
        self.patch, self.sigma = patch, sigma

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.patch
        gts = []
        for _ in range(batch):
            img = self.images[int(rng.integers(0, len(self.images)))]
            y, x = int(rng.integers(0, img.shape[0] - p + 1)), int(rng.integers(0, img.shape[1] - p + 1))
            gts.append(augment([img[y: y + p, x: x + p]], rng)[0])
        gt = to_tensor(np.stack(gts))
        sig = torch.from_numpy(rng.uniform(*self.sigma, size=(batch, 1, 1, 1))).float() / 255.0
        noise = torch.from_numpy(rng.standard_normal(gt.shape)).float()
        return gt + sig * noise, gt


class FramePairs:
    """Stage-2 fine-tuning: (stage-1 output, GT) frames from a cache folder
    (``input_K.npy``, ``gt_K.npy`` per clip K, and ``CACHE_INDEX``), memory-mapped."""

    def __init__(self, cache: str | Path, patch: int, subset: list[str] | None = None):
        cache = Path(cache)
        names = json.loads((cache / CACHE_INDEX).read_text())["names"]
        keep = list(range(len(names)))
        if subset:  # clip-name patterns, as PairedClips takes them (the three-step recipe's last step)
            keep = [k for k in keep if in_subset(names[k], subset)]
            if not keep:
                raise VrestoreError(f"{cache}: subset {subset} matches none of its clips {names}")
        self.names = [names[k] for k in keep]
        self.inp = [np.load(cache / f"input_{k}.npy", mmap_mode="r") for k in keep]
        self.gt = [np.load(cache / f"gt_{k}.npy", mmap_mode="r") for k in keep]
        self.index = [(k, t) for k, clip in enumerate(self.inp) for t in range(len(clip))]
        self.patch = patch

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.patch
        xs, gs = [], []
        for _ in range(batch):
            k, t = self.index[int(rng.integers(0, len(self.index)))]
            h, w = self.inp[k].shape[1:3]
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            a, b = augment([self.inp[k][t, y: y + p, x: x + p], self.gt[k][t, y: y + p, x: x + p]], rng)
            xs.append(a)
            gs.append(b)
        return to_tensor(np.stack(xs)), to_tensor(np.stack(gs))

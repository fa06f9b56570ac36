"""The LDV 2.0 degradation protocol, reproducible from any clean video.

HEVC low-delay P through x265 (no B-frames, one I frame then P frames) with
per-frame QPs computed the way HM's ``encoder_lowdelay_P_main.cfg`` does (GOP
of 4, QP offsets 5/4/5/1 plus the QP-offset model, clipped to [0, 3]), so
frames 0, 4, 8, ... are the peak-quality frames (PQFs). Downscaling for the
SR tracks uses FFmpeg's bicubic scaler (swscale) on the 4:2:0 planes, after
cropping to multiples of 16 (x2) or 64 (x4), as the challenge did. Pictures
with a side of 64 px or less are coded with 32 or 16 px coding-tree units
(``ctu_size``): with HM's 64 px, x265's output for them changes from run to
run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import VrestoreError
from .colour import ColourInfo
from .io import MIN_SIDE, VideoReader, _fill_plane, _plane, ctu_size, packet_sizes, temp_path_for

#: HM low-delay P GOP: (QPOffset, QPOffsetModelOffset, QPOffsetModelScale) for POC 1..4 of each GOP.
HM_LDP_GOP = ((5, -6.5, 0.2590), (4, -6.5, 0.2590), (5, -6.5, 0.2590), (1, 0.0, 0.0))
PQF_PERIOD = 4
CROP_MULTIPLE = {1: 1, 2: 16, 4: 64}


def ldp_frame_qp(index: int, qp: int) -> int:
    """Slice QP of frame ``index`` under HM's low-delay P configuration."""
    if index == 0:
        return qp  # the I frame
    offset, model_off, model_scale = HM_LDP_GOP[(index - 1) % PQF_PERIOD]
    q = qp + offset
    q += int(math.floor(min(3.0, max(0.0, q * model_scale + model_off + 0.5))))
    return min(q, 51)


def pqf_indices(num_frames: int, period: int = PQF_PERIOD) -> list[int]:
    return list(range(0, num_frames, period))


def detect_pqfs(sizes: list[int], period: int = PQF_PERIOD, min_ratio: float = 1.3) -> list[int] | None:
    """Guess the PQF positions from per-frame compressed sizes: the phase of
    ``period`` whose frames are consistently the largest. None if no phase
    stands out (not a low-delay stream with a QP cascade)."""
    n = len(sizes)
    if n < 2 * period:
        return None
    s = np.asarray(sizes[1:], np.float64)  # frame 0 is the I frame
    idx = np.arange(1, n)
    best, best_ratio = None, 0.0
    for phase in range(period):
        sel = idx % period == phase
        wins = 0
        total = 0
        for k in np.nonzero(sel)[0]:  # each candidate must beat the rest of its GOP (the frames before it)
            neigh = s[max(0, k - period + 1): k]
            if len(neigh):
                total += 1
                wins += bool(s[k] > neigh.max())
        ratio = s[sel].mean() / max(1.0, s[~sel].mean())
        if wins >= 0.8 * total and ratio > best_ratio:
            best, best_ratio = phase, ratio
    if best is None or best_ratio < min_ratio:
        return None
    return [0] + [i for i in range(1, n) if i % period == best]


def _zones(num_frames: int, qp: int) -> str:
    # libx265 through libavcodec applies zone k to frame k-1 (measured with
    # packet sizes: tests/video/test_degrade.py checks it), hence the +1.
    return "/".join(f"{i + 1},{i + 1},q={ldp_frame_qp(i, qp)}" for i in range(num_frames))


def _yuv420_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    y, u, v = (_plane(p, np.uint8).copy() for p in frame.planes)
    return y, u, v


def _frame_from_planes(planes, pix_fmt: str = "yuv420p") -> av.VideoFrame:
    y = planes[0]
    f = av.VideoFrame(y.shape[1], y.shape[0], pix_fmt)
    for plane, arr in zip(f.planes, planes, strict=True):
        _fill_plane(plane, arr)
    return f


def crop_planes(planes, width: int, height: int):
    y, u, v = planes
    return y[:height, :width], u[: height // 2, : width // 2], v[: height // 2, : width // 2]


def bicubic_downscale(frame: av.VideoFrame, scale: int) -> av.VideoFrame:
    """FFmpeg's bicubic scaler (``-vf scale=w/s:h/s -sws_flags bicubic``) on yuv420p."""
    return frame.reformat(width=frame.width // scale, height=frame.height // scale, format="yuv420p",
                          interpolation="BICUBIC")


def bicubic_upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, sH, sW, 3) uint8: bicubic upscaling of the
    compressed input, the baseline x2/x4 models are scored against."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    up = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


@dataclass
class DegradeReport:
    source: str
    output: str
    num_frames: int
    width: int
    height: int
    scale: int
    qp: int
    pqfs: list[int]
    frame_qps: list[int]
    packet_sizes: list[int]
    gt_output: str | None = None
    extra: dict = field(default_factory=dict)


class LDPEncoder:
    """x265 low-delay P encoder with the HM QP cascade; frames are yuv420p."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, qp: int, num_frames: int,
                 colour: ColourInfo, time_base: Fraction | None = None):
        if width % 2 or height % 2:
            raise VrestoreError(f"{path}: HEVC 4:2:0 needs even sizes, got {width}x{height}")
        self.path = path
        self.tmp = temp_path_for(path)
        self.oc = av.open(str(self.tmp), "w")
        st = self.oc.add_stream("libx265", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        self.ctu = ctu_size(width, height)
        params = (f"qp={qp}:ipratio=1:bframes=0:keyint=-1:min-keyint=1:scenecut=0:open-gop=0:rc-lookahead=0:"
                  f"b-adapt=0:aq-mode=0:cutree=0:frame-threads=1:ctu={self.ctu}:log-level=error:"
                  f"zones={_zones(num_frames, qp)}")
        st.options = {"x265-params": params}
        tb = time_base or 1 / Fraction(fps)
        st.codec_context.time_base = tb
        st.time_base = tb
        for k, v in colour.tags.items():
            setattr(st.codec_context, k, v)
        self.st = st
        self.tb = tb
        self.count = 0

    def encode(self, frame: av.VideoFrame, pts: int | None = None) -> None:
        frame.pts = self.count if pts is None else pts
        frame.time_base = self.tb
        frame.pict_type = av.video.frame.PictureType.NONE
        for p in self.st.encode(frame):
            self.oc.mux(p)
        self.count += 1

    def close(self) -> None:
        for p in self.st.encode(None):
            self.oc.mux(p)
        self.oc.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.oc.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def _source_frames(src: Path, max_frames: int | None) -> tuple[VideoReader, Iterator[av.VideoFrame]]:
    """Yield the source's frames as yuv420p av frames (the codec domain)."""
    reader = VideoReader(src, max_frames=max_frames)
    if reader.info.kind != "container":
        from .colour import rgb_to_planes

        def gen() -> Iterator[av.VideoFrame]:
            for fr in reader:
                rgb = fr.rgb if fr.rgb.dtype == np.uint8 else (fr.rgb >> 8).astype(np.uint8)
                yield _frame_from_planes(rgb_to_planes(rgb, reader.info.colour, 8, (2, 2)))
        return reader, gen()
    reader.close()

    def gen_av() -> Iterator[av.VideoFrame]:
        with av.open(str(src)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for i, f in enumerate(c.decode(s)):
                if max_frames is not None and i >= max_frames:
                    break
                if f.format.name != "yuv420p":
                    f = f.reformat(format="yuv420p")
                yield f
    return reader, gen_av()


def degrade_video(src: str | os.PathLike, dst: str | os.PathLike, *, qp: int = 37, scale: int = 1,
                  gt_dst: str | os.PathLike | None = None, max_frames: int | None = None,
                  overwrite: bool = False, progress: Callable[[int, int | None], None] | None = None
                  ) -> DegradeReport:
    """Compress ``src`` with the LDV protocol (optionally after bicubic x2/x4
    downscaling) into ``dst``; optionally write the matching cropped ground
    truth losslessly (FFV1 yuv420p, bit-exact) to ``gt_dst``."""
    src, dst = Path(src), Path(dst)
    if scale not in CROP_MULTIPLE:
        raise VrestoreError(f"--scale must be 1, 2 or 4, got {scale}")
    if not 0 <= qp <= 51:
        raise VrestoreError(f"--qp must be in 0..51, got {qp}")
    for out in (dst, Path(gt_dst) if gt_dst else None):
        if out is not None and out.resolve() == src.resolve():
            raise VrestoreError(f"{out}: output path is the input file")
        if out is not None and out.exists() and not overwrite:
            raise VrestoreError(f"{out}: already exists (pass --overwrite to replace it)")
    reader, frames = _source_frames(src, max_frames)
    info = reader.info
    m = CROP_MULTIPLE[scale]
    w, h = info.width // m * m, info.height // m * m
    w, h = w - w % 2, h - h % 2
    need = max(MIN_SIDE * scale, m)  # x265 codes nothing below one 16 px coding-tree unit
    if w < need or h < need:
        raise VrestoreError(f"{src}: {info.width}x{info.height} is too small for x{scale} (needs >= {need}x{need})")
    lw, lh = w // scale, h // scale
    if lw % 2 or lh % 2:
        raise VrestoreError(f"{src}: cropped size {w}x{h} / {scale} is odd; cannot encode 4:2:0")
    n_hint = info.num_frames if max_frames is None else min(max_frames, info.num_frames or max_frames)
    # x265 zones need the count up front; over-estimating only adds unused zones.
    n_zones = (n_hint or 100000) + 8
    colour = info.colour
    enc = LDPEncoder(dst, lw, lh, info.fps, qp, n_zones, colour)
    gt_writer = None
    if gt_dst is not None:
        gt_writer = _LosslessYUVWriter(Path(gt_dst), w, h, info.fps, colour)
    count = 0
    try:
        for f in frames:
            planes = crop_planes(_yuv420_planes(f), w, h)
            clean = _frame_from_planes(planes)
            if gt_writer is not None:
                gt_writer.write(clean)
            enc.encode(bicubic_downscale(clean, scale) if scale > 1 else clean)
            count += 1
            if progress:
                progress(count, n_hint)
        if count == 0:
            raise VrestoreError(f"{src}: holds no decodable frames")
        enc.close()
        if gt_writer is not None:
            gt_writer.close()
    except BaseException:
        enc.abort()
        if gt_writer is not None:
            gt_writer.abort()
        raise
    sizes = packet_sizes(dst)
    return DegradeReport(str(src), str(dst), count, lw, lh, scale, qp, pqf_indices(count),
                         [ldp_frame_qp(i, qp) for i in range(count)], sizes,
                         str(gt_dst) if gt_dst else None,
                         {"gt_width": w, "gt_height": h, "ctu": enc.ctu, "colour": asdict(colour),
                          "fps": str(info.fps)})


class _LosslessYUVWriter:
    """FFV1 writer for yuv420p frames exactly as given (the GT of a pair)."""

    def __init__(self, path: Path, width: int, height: int, fps: Fraction, colour: ColourInfo):
        self.path = path
        self.tmp = temp_path_for(path)
        self.oc = av.open(str(self.tmp), "w")
        self.st = self.oc.add_stream("ffv1", rate=fps)
        self.st.width, self.st.height, self.st.pix_fmt = width, height, "yuv420p"
        self.tb = 1 / Fraction(fps)
        self.st.codec_context.time_base = self.tb
        self.st.time_base = self.tb
        for k, v in colour.tags.items():
            setattr(self.st.codec_context, k, v)
        self.n = 0

    def write(self, f: av.VideoFrame) -> None:
        f.pts = self.n
        f.time_base = self.tb
        for p in self.st.encode(f):
            self.oc.mux(p)
        self.n += 1

    def close(self) -> None:
        for p in self.st.encode(None):
            self.oc.mux(p)
        self.oc.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.oc.close()
        if self.tmp.exists():
            self.tmp.unlink()


VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".y4m", ".m4v", ".ts"}


def list_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def prepare_dataset(src: str | os.PathLike, out: str | os.PathLike, *, task: str = "qe", qp: int = 37,
                    max_frames: int | None = None, overwrite: bool = False,
                    progress: Callable[[str, int, int | None], None] | None = None, jobs: int = 1) -> dict:
    """Turn clean videos into training pairs: ``out/gt/NAME.mkv`` (lossless
    GT), ``out/lq/NAME.mp4`` (LDV-compressed), and ``out/meta.json`` with the
    PQF list and sizes of each pair. Re-running skips finished pairs (and
    redoes those compressed under an earlier protocol). ``jobs`` > 1 degrades
    that many videos at once in worker processes (x265 keeps few cores busy on
    small pictures); the pairs are the same either way (LQ bytes, GT frames),
    and ``progress`` then counts finished videos (name ``"videos"``) rather
    than frames. A failed video stops the run once the videos in progress end
    (those finished stay recorded); the videos not yet started are dropped."""
    scale = {"qe": 1, "x2": 2, "x4": 4}.get(task)
    if scale is None:
        raise VrestoreError(f"unknown task {task!r}; use qe, x2 or x4")
    src, out = Path(src), Path(out)
    videos = [src] if src.is_file() else list_videos(src) if src.is_dir() else None
    if videos is None:
        raise VrestoreError(f"{src}: no such file or directory")
    if not videos:
        raise VrestoreError(f"{src}: holds no videos ({', '.join(sorted(VIDEO_SUFFIXES))})")
    (out / "gt").mkdir(parents=True, exist_ok=True)
    (out / "lq").mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta and (meta.get("task"), meta.get("qp")) != (task, qp):
        raise VrestoreError(f"{out}: holds a {meta.get('task')} QP{meta.get('qp')} set; use another folder")
    meta.update({"task": task, "scale": scale, "qp": qp, "protocol": "LDV2 x265 LDP"})
    clips = meta.setdefault("clips", {})
    todo = []
    for v in videos:
        done = clips.get(v.stem)
        # A pair compressed before small pictures got smaller coding-tree units
        # (no "ctu" recorded: x265's 64) is redone, so a set holds one protocol.
        if done and (out / done["gt"]).exists() and (out / done["lq"]).exists() and not overwrite and \
                done.get("ctu", 64) == ctu_size(*done["lq_size"]):
            continue
        todo.append((v, out / "gt" / f"{v.stem}.mkv", out / "lq" / f"{v.stem}.mp4"))

    def record(v: Path, gt: Path, lq: Path, rep: DegradeReport) -> None:
        """Add a finished pair to meta.json at once: an interrupted run keeps it."""
        clips[v.stem] = {"gt": str(gt.relative_to(out)), "lq": str(lq.relative_to(out)),
                         "num_frames": rep.num_frames, "lq_size": [rep.width, rep.height],
                         "gt_size": [rep.extra["gt_width"], rep.extra["gt_height"]], "pqfs": rep.pqfs,
                         "ctu": rep.extra["ctu"], "source": str(v)}
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)

    kw = {"qp": qp, "scale": scale, "max_frames": max_frames, "overwrite": True}
    if jobs > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(jobs, len(todo))) as pool:
            futures = {pool.submit(degrade_video, v, lq, gt_dst=gt, **kw): (v, gt, lq) for v, gt, lq in todo}
            try:
                for i, fut in enumerate(as_completed(futures), 1):
                    record(*futures[fut], fut.result())
                    if progress:
                        progress("videos", i, len(todo))
            except BaseException:
                for f in futures:  # leaving the pool waits for the running videos, not for all the rest
                    f.cancel()
                raise
        return meta
    for v, gt, lq in todo:
        cb = (lambda i, n, _name=v.stem: progress(_name, i, n)) if progress else None
        record(v, gt, lq, degrade_video(v, lq, gt_dst=gt, progress=cb, **kw))
    return meta


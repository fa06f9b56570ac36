"""The two-stage restorer: stage 1 (one or an ensemble of recurrent models),
optional stage 2 (one or an ensemble) frame by frame, optional x8 TTA around both, run over a
stream of frames in overlapping temporal chunks and spatial tiles so memory
does not grow with the video's length or size.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import VrestoreError
from ..models.dcn import ModulatedDeformConv2d, can_compile_on, default_sampler, set_sampler, user_sampler
from ..video.colour import luma_weights
from . import device as devmod

log = logging.getLogger(__name__)

#: ``tile=None`` (``restore``'s default) tiles frames whose stage-1 features (1/4 of each side for the same-size
#: models, the input's size for `x4`) have more pixels than this, those of a 1920x1088 same-size frame: `qe`
#: peaked at 5.9 GB on a 32-frame window at 1920x1080 (``vrestore bench --model qe --size 1920x1080 --frames 32
#: --warmup 0``) and would need about four times that at 3840x2160, all of the 24 GB of this project's
#: machine; `x4` from 640x360 (230,400 feature pixels) peaked at 4.2 and 4.9 GB on 2 and 8 frames (``vrestore
#: bench --model x4 --size 640x360 --frames N --warmup 0``), about 126 MB more per frame of the window
AUTO_TILE_ABOVE = (1920 // 4) * (1088 // 4)
#: and with tiles of this many feature pixels a side (1024 input pixels for the same-size models, 256 for `x4`)
AUTO_TILE = 256

ModelSpec = nn.Module | str | os.PathLike
BACKENDS = ("auto", "torch", "onnxruntime")
#: Stage-1 feature pixels x frames from which ``restore_video`` compiles the deformable convolutions' sampler
#: (``"auto"``). Measured on this project's 2-core CPU at 854x480 (features 214x120 for the same-size model;
#: ``python benchmarks/run.py long_video``): compiling costs 10 s the first time and 3 s with inductor's
#: cache, and saves 46 ms per frame, so it pays after about 220 frames; the threshold is about 390 such
#: frames (170 at 1280x720).
COMPILED_DCN_FROM = 10_000_000


def _is_onnx(spec: object) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".onnx")


def _as_model(spec: ModelSpec, backend: str, device: str, frames: int):
    """A torch module or, for the onnxruntime backend, an ``OnnxModel``;
    checkpoints given to the onnxruntime backend are exported once (cached)."""
    from .onnx_backend import OnnxModel

    if isinstance(spec, OnnxModel):
        return spec
    if backend == "onnxruntime" or (backend == "auto" and _is_onnx(spec)):
        if isinstance(spec, nn.Module):
            raise VrestoreError("the onnxruntime backend takes .onnx files or checkpoint paths, not a module; "
                                "export it with vrestore.export.onnx.export_onnx")
        if not _is_onnx(spec):
            from ..export.onnx import ensure_onnx

            spec = ensure_onnx(spec, frames)
        return OnnxModel(spec, device)
    if _is_onnx(spec):
        raise VrestoreError(f"{spec}: an ONNX file needs --backend onnxruntime")
    if isinstance(spec, nn.Module):
        return spec.eval()
    from ..models.checkpoint import load

    return load(spec)


# ---------------------------------------------------------------------------
# x8 geometric transforms on (..., H, W) tensors

def tta_forward(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` in 0..7: rotate by (k % 4) quarter turns, then flip W if k >= 4. ``k`` = 0 returns
    ``x`` itself (``rot90`` by no turns copies: a window of float frames, measured)."""
    if k == 0:
        return x
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return y.flip(-1) if k >= 4 else y


def tta_inverse(y: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``tta_forward(., k)``; ``k`` = 0 returns ``y`` itself."""
    if k == 0:
        return y
    if k >= 4:
        y = y.flip(-1)
    return torch.rot90(y, -(k % 4), dims=(-2, -1))


# Transforms of stage-2 TTA by count: identity, then a flip, then the half turn and its flip, then all eight.
STAGE2_TTA = {1: (0,), 2: (0, 4), 4: (0, 2, 4, 6), 8: tuple(range(8))}


# ---------------------------------------------------------------------------
# Blending weights

def _ramp(n: int, lo_overlap: int, hi_overlap: int) -> torch.Tensor:
    """1-D weights: linear ramps over the overlaps at each end, 1 elsewhere."""
    w = torch.ones(n)
    if lo_overlap:
        w[:lo_overlap] = torch.arange(1, lo_overlap + 1) / (lo_overlap + 1)
    if hi_overlap:
        w[n - hi_overlap:] = torch.arange(hi_overlap, 0, -1) / (hi_overlap + 1)
    return w


def _tiling(total: int, size: int, overlap: int) -> tuple[int, list[int]]:
    """One axis of the tiles: their length and starts. As few tiles as ``size`` allows, all of one length
    (a multiple of 8 where ``size`` allows), spread evenly with at least ``overlap`` shared pixels (at most
    half the size: tiles that overlap more would advance by a pixel or two). Tiles of
    ``size`` placed from the start would leave the last one mostly overlap: 1024 px tiles on 1080 rows
    restored 1024 + 1024 rows, where two tiles of 560 cover them."""
    if total <= size:
        return total, [0]
    overlap = min(overlap, size // 2)
    n = -(-(total - overlap) // (size - overlap))
    length = -(-(total + (n - 1) * overlap) // n)
    length = min(size, -(-length // 8) * 8)
    step = -(-(total - length) // (n - 1))
    while length - step < overlap:  # integer steps: never share less than asked
        length += 1
        step = -(-(total - length) // (n - 1))
    return length, [min(i * step, total - length) for i in range(n)]


@dataclass
class RestoreReport:
    source: str
    output: str
    frames: int
    unique_frames: int
    seconds: float
    fps: float
    pqfs: list[int] | None
    extra: dict = field(default_factory=dict)


class Restorer:
    """Chain stage 1 (one model, or several averaged: an ensemble), optional
    stage 2 (one, or several averaged on the same stage-1 output) and optional
    x8 TTA; run it on clips, frame arrays or files. ``stage1=None`` runs stage 2
    alone on the input frames (on the held-out clips the bundled stage 2s score
    higher without the bundled stage 1: docs/models.md, "Stage 2 alone").

    ``tta``: x8 TTA around both stages. ``stage2_tta``: 1, 2, 4 or 8
    transforms around stage 2 only (``STAGE2_TTA``), stage 1 running once:
    the bundled stage 1 barely changes its input, so x8 TTA spends most of its
    time where nothing is gained (docs/models.md, "Cheaper than x8 TTA").

    ``chunk``/``overlap``: frames per temporal window of the recurrent model
    and frames shared by consecutive windows (stage 1's outputs blended
    linearly, then stage 2 once per frame; with x8 TTA the final outputs are
    blended); without stage 1 windows share nothing. ``tile``:
    split frames larger than ``tile`` x ``tile`` input pixels into the fewest
    tiles of at most that size that overlap by ``tile_overlap`` pixels, all of
    one size (``_tiling``) (0 = never tile; None, ``restore``'s
    default: tiles where stage 1's features are larger than
    ``AUTO_TILE_ABOVE`` pixels, ``tile_for``); ``stage2_tile``: the
    same for stage 2, in its own (output) pixels, by default the same tiles
    (the stage-1 tile x the scale): a frame that needs tiles for stage 1's memory
    needs them for stage 2's too (`qe-fast`, stage 2 alone, peaks at 6.7 GB on
    3840x2160 frames: ``benchmarks/run.py large_frames``). ``backend``: ``torch``,
    ``onnxruntime`` (exported graphs; checkpoints are exported on first use,
    and the chunk is the exported T) or ``auto`` (by file extension).
    ``compile``: ``torch.compile`` stage 2 and, on the CPU, the sampling of
    stage 1's deformable convolutions (``models.dcn``, sampler ``auto``); each
    new frame size first pays the compilation, about 20 s for SwinIR-T on 2
    CPU cores, a few seconds for the sampling.
    """

    def __init__(self, stage1: ModelSpec | list[ModelSpec] | None, stage2: ModelSpec | list[ModelSpec] | None = None,
                 *,
                 tta: bool = False, device: str = "auto", dtype: str = "auto", chunk: int = 32,
                 overlap: int = 8, tile: int | None = 0, tile_overlap: int = 32, stage2_tile: int | None = None,
                 dedup: bool = False, channels_last: bool | None = None, backend: str = "auto",
                 compile: bool = False, stage2_tta: int = 1):
        specs = list(stage1) if isinstance(stage1, (list, tuple)) else [] if stage1 in (None, "none") else [stage1]
        if not specs and not stage2:
            raise VrestoreError("nothing to run: give a stage-1 model, a stage-2 model or both")
        if backend not in BACKENDS:
            raise VrestoreError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.precision = devmod.select(device, dtype)
        self.channels_last = self.precision.channels_last if channels_last is None else channels_last
        dev = str(self.precision.device)
        self.stage1 = [self._prepare(_as_model(s, backend, dev, chunk)) for s in specs]
        frames = {getattr(m, "frames", 0) for m in self.stage1} - {0}
        if len(frames) > 1:
            raise VrestoreError(f"ensemble members were exported for different chunk lengths {sorted(frames)}")
        if frames:  # exported stage 1: the chunk is fixed by the graph
            chunk = frames.pop()
            overlap = min(overlap, chunk // 2)
        scales = {getattr(m, "scale", 1) for m in self.stage1} or {1}
        if len(scales) != 1:
            raise VrestoreError(f"ensemble members have different scales {sorted(scales)}")
        self.scale = scales.pop()
        second = [] if stage2 is None else stage2 if isinstance(stage2, (list, tuple)) else [stage2]
        self.stage2s = [self._prepare(_as_model(s, backend, dev, chunk)) for s in second]
        if any(getattr(m, "scale", 1) != 1 for m in self.stage2s):
            raise VrestoreError("stage 2 must keep the size (a restoration SwinIR, upscale 1)")
        self.compiled = compile and any(isinstance(m, nn.Module) for m in [*self.stage1, *self.stage2s])
        for i, m in enumerate(self.stage1 if compile else []):
            if isinstance(m, nn.Module):
                # Stage 1: only the deformable convolutions' sampling (BasicVSR++'s compiled blocks measured
                # slower, 0.36 -> 0.43 s per frame). A copy, so the caller's module keeps the default sampler.
                self.stage1[i] = m = copy.deepcopy(m)
                set_sampler(m, "auto")
        for i, m in enumerate(self.stage2s if compile else []):
            if isinstance(m, nn.Module):
                # Stage 2 whole: the bundled SwinIR-T takes 0.75 s per 854x480 frame compiled against 0.81 eager
                # (bf16, this project's CPU).
                # A copy: the frozen graph holds the weights as they are now, and the caller's module stays eager.
                self.stage2s[i] = m = copy.deepcopy(m)
                devmod.compile_units(m, inference=True)
        if not self.stage1:  # stage 2 alone sees one frame at a time: windows need no shared frames
            overlap = 0
        if chunk < 2 or not 0 <= overlap <= chunk // 2:
            raise VrestoreError(f"need --chunk >= 2 and 0 <= --overlap <= chunk/2 (got {chunk}, {overlap})")
        if stage2_tta not in STAGE2_TTA:
            raise VrestoreError(f"stage-2 TTA takes {', '.join(map(str, STAGE2_TTA))} transforms, got {stage2_tta}")
        if tta and stage2_tta > 1:
            raise VrestoreError("x8 TTA already transforms stage 2: use TTA or stage-2 TTA, not both")
        self.tta, self.chunk, self.overlap = tta, chunk, overlap
        self.stage2_transforms = STAGE2_TTA[stage2_tta]
        self.tile, self.tile_overlap, self.stage2_tile = tile, tile_overlap, stage2_tile
        self.dedup = dedup
        ort = [m for m in [*self.stage1, *self.stage2s] if not isinstance(m, nn.Module)]
        self.engine = (f"onnxruntime {ort[0].session.get_providers()[0]} float32" if ort
                       else f"torch {self.precision}{', compiled' if self.compiled else ''}")

    @property
    def stage2(self):
        """The stage-2 model, the list of an ensemble's members, or None."""
        return None if not self.stage2s else self.stage2s[0] if len(self.stage2s) == 1 else self.stage2s

    def _prepare(self, m):
        if not isinstance(m, nn.Module):  # an ONNX Runtime graph
            return m
        m = m.to(self.precision.device).eval()
        if self.channels_last:  # oneDNN's fast conv path on CPUs
            m = m.to(memory_format=torch.channels_last)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    # -- one clip through everything -------------------------------------
    def _stage1(self, clip: torch.Tensor, pqfs: list[int] | None) -> torch.Tensor:
        """clip (T, 3, H, W) -> (T, 3, sH, sW): ensemble average of stage-1 models; the clip itself
        without one (stage 2 alone)."""
        if not self.stage1:
            return clip
        acc = None
        for m in self.stage1:
            with self.precision.autocast():
                y = m(clip.unsqueeze(0), pqfs=pqfs)[0].float()
            acc = y if acc is None else acc + y
        return acc / len(self.stage1)

    def tile_for(self, height: int, width: int) -> int:
        """Stage 1's tile, in input pixels, for frames of this input size: ``tile``, or with ``tile=None``
        ``AUTO_TILE`` feature pixels where the features have more than ``AUTO_TILE_ABOVE`` (0: no tiles).
        Stage 2 alone counts as a same-size model (features at 1/4)."""
        if self.tile is not None:
            return self.tile
        m = max((getattr(s, "multiple", 1) for s in self.stage1), default=4)
        return AUTO_TILE * m if (height // m) * (width // m) > AUTO_TILE_ABOVE else 0

    def _stage2(self, frames: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Each frame through stage 2; an ensemble's members (and the stage-2
        TTA transforms) see the same frame and their float outputs are averaged. ``inplace``: each output
        replaces its input frame (the stream's own windows: one window's float frames less)."""
        if not self.stage2s:
            return frames
        s2_tile = self.stage2_tile
        if s2_tile is None:  # stage 1's tiles, in stage 2's (output) pixels
            h, w = frames.shape[-2:]
            s2_tile = self.tile_for(h // self.scale, w // self.scale) * self.scale
        out = frames if inplace else torch.empty_like(frames)

        def run(t: torch.Tensor) -> torch.Tensor:
            acc = None
            for k in self.stage2_transforms:
                x = tta_forward(t, k).contiguous()
                for m in self.stage2s:
                    y = m(x).float()
                    y = tta_inverse(y, k)
                    acc = y if acc is None else acc + y
            return acc / (len(self.stage2s) * len(self.stage2_transforms))

        for i in range(frames.shape[0]):
            x = frames[i: i + 1].contiguous()  # one layout, so a compiled stage 2 does not recompile per stride
            with self.precision.autocast():
                if s2_tile:
                    out[i: i + 1] = self._tiled(run, x, s2_tile, self.tile_overlap, 1)
                else:
                    out[i: i + 1] = run(x)
        return out

    def _tiled(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
               scale: int) -> torch.Tensor:
        """Apply ``fn`` on overlapping spatial tiles of x (..., H, W) and blend."""
        h, w = x.shape[-2:]
        if not tile or (h <= tile and w <= tile):
            return fn(x)
        (th, ys), (tw, xs) = _tiling(h, tile, overlap), _tiling(w, tile, overlap)
        out = None
        norm = torch.zeros(h * scale, w * scale, device=x.device)
        for yi, y0 in enumerate(ys):
            for xi, x0 in enumerate(xs):
                y = fn(x[..., y0: y0 + th, x0: x0 + tw])
                lo_y = (ys[yi - 1] + th - y0) * scale if yi > 0 else 0
                hi_y = (y0 + th - ys[yi + 1]) * scale if yi + 1 < len(ys) else 0
                lo_x = (xs[xi - 1] + tw - x0) * scale if xi > 0 else 0
                hi_x = (x0 + tw - xs[xi + 1]) * scale if xi + 1 < len(xs) else 0
                wgt = (_ramp(th * scale, lo_y, hi_y)[:, None] * _ramp(tw * scale, lo_x, hi_x)[None]).to(x.device)
                if out is None:
                    out = torch.zeros(*y.shape[:-2], h * scale, w * scale, device=x.device, dtype=torch.float32)
                sl = (..., slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale))
                out[sl] += y.float() * wgt
                norm[sl[1:]] += wgt
        return out.div_(norm)  # in place: a second window of float output frames otherwise, for a moment

    def run_clip(self, clip: torch.Tensor, pqfs: list[int] | None = None, *, stage2: bool = True) -> torch.Tensor:
        """Restore one clip held in memory: (T, 3, H, W) float in [0, 1], or uint8 ->
        (T, 3, sH, sW) float (not clipped). TTA spans both stages. ``stage2=False``: stage 1's output (the
        stream runs stage 2 itself, once per frame; not with x8 TTA, whose transforms pair the two stages).
        A uint8 clip becomes float tile by tile, so a tiled run never holds the whole clip as float."""
        if not stage2 and self.tta:
            raise VrestoreError("x8 TTA spans both stages: stage 1 alone cannot be run under it")
        clip = clip.to(self.precision.device)
        if clip.dtype != torch.uint8:
            clip = clip.float()

        def first(t: torch.Tensor) -> torch.Tensor:
            return self._stage1(t.float().div_(255.0) if t.dtype == torch.uint8 else t, pqfs)

        transforms = range(8) if self.tta else [0]
        acc = None
        with torch.inference_mode():
            for k in transforms:
                x = tta_forward(clip, k)
                y = self._tiled(first, x, self.tile_for(*x.shape[-2:]), self.tile_overlap, self.scale)
                y = tta_inverse(self._stage2(y) if stage2 else y, k)
                acc = y if acc is None else acc + y
        if acc is clip:  # stage 2 alone, not run here: the caller's own tensor, which its caller may write to
            acc = acc.clone()
        return acc if len(transforms) == 1 else acc / len(transforms)

    # -- streams -------------------------------------------------------------
    def stream(self, frames: Iterable[np.ndarray], pqfs: list[int] | None = None) -> Iterator[np.ndarray]:
        """Restore an iterable of RGB uint8 (H, W, 3) frames, yielding restored
        uint8 frames in order; holds at most one chunk of frames in memory.
        ``pqfs`` are indices in the input (before de-duplication)."""
        source: Iterable[tuple[int, np.ndarray]] = enumerate(frames)
        repeats: list[int] = []  # copies of each kept frame (filled as input is read)
        if self.dedup:
            source = _dedup(source, repeats)
        pqf_set = set(pqfs) if pqfs is not None else None
        unique_pqfs: list[int] | None = [] if pqf_set is not None else None
        self.stats = {"unique_frames": 0}
        buf: list[torch.Tensor] = []  # input frames of the current window
        recent: deque[torch.Tensor] = deque(maxlen=self.chunk)  # the last inputs: context for the last window
        start = 0  # index (in kept frames) of buf[0]
        pending: torch.Tensor | None = None  # outputs of the overlap, blended into the next window
        ready: list[np.ndarray] = []  # restored kept frames not yet emitted
        emitted = 0

        def drain(final: bool) -> Iterator[np.ndarray]:
            # A kept frame's repeat count is known once a later frame was read.
            nonlocal emitted
            while ready and (final or not self.dedup or emitted < len(repeats) - 1):
                f = ready.pop(0)
                for _ in range(repeats[emitted] if self.dedup else 1):
                    yield f
                emitted += 1

        def window_pqfs(s: int, n: int) -> list[int] | None:
            if unique_pqfs is None:
                return None
            return [p - s for p in unique_pqfs if s <= p < s + n]

        # Without x8 TTA, windows are blended after stage 1 and stage 2 runs once per frame as it is
        # emitted: blending after stage 2 ran it twice on every shared frame (chunk 32, overlap 8: 4/3 of
        # the frames). x8 TTA pairs each transform's two stages, so there the windows' final outputs blend.
        late = not self.tta

        @torch.inference_mode()
        def run(final: bool) -> None:
            nonlocal buf, start, pending
            ov = 0 if pending is None else pending.shape[0]
            if final and ov and len(buf) == ov:  # nothing new since the last window
                out = pending
            else:
                # The last window reaches back over frames already restored, so
                # it has a full chunk of temporal context like the others (stage 2
                # alone needs none).
                ctx = min(self.chunk, len(recent)) - len(buf) if final and self.stage1 else 0
                clip = list(recent)[len(recent) - len(buf) - ctx:] if ctx else buf
                # uint8: run_clip makes float frames one tile at a time
                out = self.run_clip(torch.stack(clip), window_pqfs(start - ctx, len(clip)), stage2=not late)[ctx:]
                if ov:
                    w = _ramp(2 * ov, 0, ov)[ov:].view(-1, 1, 1, 1).to(out.device)  # previous window's weight
                    out[:ov] = pending * w + out[:ov] * (1 - w)
            keep = 0 if final else min(self.overlap, len(buf) - ov - 1)
            done = out[: len(buf) - keep]
            if late and self.stage2s:
                done = self._stage2(done, inplace=True)
            done = _keep_grey(done, buf[: len(done)])
            # in place: ``done`` is this window's own (float frames the size of the output, a window of them)
            arr = done.clamp_(0, 1).mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            ready.extend(arr)
            # a copy: a view would keep this whole window's float frames allocated while the next one runs
            pending = out[len(buf) - keep:].clone() if keep else None
            start += len(buf) - keep
            buf = buf[len(buf) - keep:]

        for orig_idx, f in source:
            if f.dtype != np.uint8:
                f = (f >> 8).astype(np.uint8)
            self.stats["unique_frames"] += 1
            if unique_pqfs is not None and orig_idx in pqf_set:
                unique_pqfs.append(start + len(buf))
            # uint8 until a window runs: a window of float input frames is 4x the memory
            buf.append(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1))
            recent.append(buf[-1])
            if len(buf) >= self.chunk:
                run(final=False)
            yield from drain(final=False)
        if buf:
            run(final=True)
        yield from drain(final=True)

    def restore_frames(self, frames: np.ndarray, pqfs: list[int] | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, sH, sW, 3) uint8."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VrestoreError(f"expected (T, H, W, 3) frames, got {frames.shape}")
        return np.stack(list(self.stream(list(frames), pqfs)))

    def dcn_sampler_for(self, width: int, height: int, num_frames: int | None) -> str | None:
        """``"auto"`` (the compiled sampler where it can run) for a video long enough to repay compiling it
        (``COMPILED_DCN_FROM``), else None (the layers' own choice). Only on a CPU that can compile it, for
        torch stage-1 modules with deformable convolutions of the default sampler (``--compile`` has already
        set theirs), not with ``--tile``, whose edge tiles would each compile again, and not where the user
        chose a sampler (``dcn.user_sampler``), which would win anyway."""
        layers = [(m, d) for m in self.stage1 if isinstance(m, nn.Module)
                  for d in m.modules() if isinstance(d, ModulatedDeformConv2d)]
        if (not num_frames or not layers or self.tile_for(height, width)
                or any(d.sampler is not None for _, d in layers)
                or not can_compile_on(self.precision.device) or user_sampler()):
            return None
        # BasicVSR++ pads to a multiple of its feature scale: features at 1/4 size (same size) or full (x4).
        per_frame = max(width * height // getattr(m, "multiple", 1) ** 2 for m, _ in layers)
        return "auto" if per_frame * num_frames >= COMPILED_DCN_FROM else None

    def restore_video(self, src: str | os.PathLike, dst: str | os.PathLike, *, codec: str | None = None,
                      quality: int | None = None, pqfs: list[int] | str | None = "auto", overwrite: bool = False,
                      progress: Callable[[int, int | None], None] | None = None, raw=None) -> RestoreReport:
        """Decode ``src``, restore and encode to ``dst`` in one streaming pass,
        keeping frame count, timestamps, colour tags and audio/subtitles."""
        from ..video.degrade import detect_pqfs
        from ..video.io import VideoReader, VideoWriter, packet_sizes

        src, dst = Path(src), Path(dst)
        if dst.exists() and src.exists() and dst.resolve() == src.resolve():
            raise VrestoreError(f"{dst}: output path is the input file")
        reader = VideoReader(src, raw)
        info = reader.info
        if pqfs == "auto":
            pqfs = detect_pqfs(packet_sizes(src)) if info.kind == "container" else None
            if pqfs is None:
                log.info("%s: no peak-quality-frame pattern found; plain second-order propagation", src)
        if codec is None:
            codec = "png" if dst.suffix == "" else "ffv1" if dst.suffix == ".mkv" else "x264"
        writer = VideoWriter(dst, fps=info.fps, time_base=info.time_base, codec=codec, quality=quality,
                             colour=info.colour, audio_from=src if info.kind == "container" else None,
                             overwrite=overwrite)
        pts_list: list[int | None] = []

        def frames() -> Iterator[np.ndarray]:
            for fr in reader:
                pts_list.append(fr.pts)
                yield fr.rgb

        sampler = self.dcn_sampler_for(info.width, info.height, info.num_frames)
        t0 = time.perf_counter()
        n = 0
        try:
            with default_sampler(sampler):
                for out in self.stream(frames(), pqfs if isinstance(pqfs, list) else None):
                    writer.write(out, pts_list[n] if info.kind == "container" else None)
                    n += 1
                    if progress:
                        progress(n, info.num_frames)
            if n == 0:
                raise VrestoreError(f"{src}: holds no decodable frames")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
        unique = self.stats["unique_frames"]
        dt = time.perf_counter() - t0
        if sampler and not can_compile_on(self.precision.device):  # compiling failed part-way: grid_sample since
            sampler = "grid_sample (compiling failed)"
        extra = {"corrupt_packets": reader.corrupt_packets, "truncated": reader.truncated,
                 "precision": self.engine, "dcn_sampler": sampler or "default",
                 "tile": self.tile_for(info.height, info.width)}
        return RestoreReport(str(src), str(dst), n, unique, dt, n / dt if dt else 0.0,
                             pqfs if isinstance(pqfs, list) else None, extra)


#: BT.709 luma weights: the grey that a restored greyscale frame is made
_LUMA = torch.tensor(luma_weights("bt709")).view(3, 1, 1)


def _keep_grey(out: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Outputs (T, 3, H, W) of greyscale inputs (R = G = B everywhere: a black-and-white video, whose chroma
    the codec kept exactly) made grey again: the models add faint colour noise to them (about 0.3 of
    squared error per chroma plane on the greyscale validation clips, docs/models.md), and a restored
    black-and-white film should stay black and white. Other frames are left as they are. In place: ``out`` is
    the stream's own window, and a copy would hold a second window of float frames for a black-and-white film."""
    grey = [i for i, x in enumerate(inputs) if torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])]
    if not grey:
        return out
    y = (out[grey].clamp(0, 1) * _LUMA.to(out.device, out.dtype)).sum(1, keepdim=True)  # of the RGB it would be
    out[grey] = y.expand(-1, 3, -1, -1)
    return out


def _dedup(source: Iterable[tuple[int, np.ndarray]], repeats: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Drop frames identical to their predecessor; ``repeats`` counts the
    consecutive copies of each kept frame, filled in as input is read."""
    prev = None
    for idx, f in source:
        if prev is not None and f.shape == prev.shape and np.array_equal(f, prev):
            repeats[-1] += 1
            continue
        repeats.append(1)
        prev = f
        yield idx, f

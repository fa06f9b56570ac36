"""Faults during `vrestore restore`: SIGTERM/SIGINT leave nothing partial and a
resumable batch; concurrent processes on one output folder share the work
without corrupting each other's files (docs/reliability.md)."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vrestore.video.io import VideoReader, VideoWriter


def _default_sigint() -> None:
    # A suite started in the background by a shell without job control inherits an ignored SIGINT, which
    # Python (rightly) keeps; the child gets the default a user's terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vrestore.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)


def _clips(folder, frames, n, length):
    folder.mkdir()
    for k in range(n):
        with VideoWriter(folder / f"clip{k:02d}.mkv", codec="ffv1", fps=25) as w:
            for f in np.roll(frames[:length, :48, :64], k, axis=0):
                w.write(np.ascontiguousarray(f))
    return folder


def _wait_for(pred, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_restore_leaves_no_partial_output(tmp_path, small_frames, qe_checkpoint, sig, code):
    src = tmp_path / "in.mkv"
    with VideoWriter(src, codec="ffv1", fps=25) as w:
        # long enough that a loaded machine cannot finish before the signal (it arrives within the first frames)
        for f in np.concatenate([small_frames] * 20)[:400, :48, :64]:
            w.write(np.ascontiguousarray(f))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = _cli("restore", src, "-o", out_dir / "out.mkv", "--model", qe_checkpoint, "--dtype", "fp32", "--chunk", "4",
             "--overlap", "1")
    assert _wait_for(lambda: any(out_dir.iterdir())), p.communicate()[0]  # the temporary file exists
    p.send_signal(sig)
    output = p.communicate(timeout=120)[0]
    assert p.returncode == code, output
    assert list(out_dir.iterdir()) == [], output  # neither the final name nor a partial file


def test_interrupted_batch_resumes_and_concurrent_batches_share_a_folder(tmp_path, small_frames, qe_checkpoint):
    src = _clips(tmp_path / "in", small_frames, 6, 8)
    common = ["--model", qe_checkpoint, "--dtype", "fp32", "--chunk", "4", "--overlap", "1", "--codec", "ffv1"]
    # Reference: one process, undisturbed.
    ref = _cli("restore", src, "-o", tmp_path / "ref", *common)
    assert ref.wait(timeout=600) == 0, ref.communicate()[0]
    # Interrupted after the first output, then resumed.
    cut_dir = tmp_path / "cut"
    p = _cli("restore", src, "-o", cut_dir, *common)
    assert _wait_for(lambda: cut_dir.exists() and any(f.suffix == ".mkv" and not f.name.startswith(".")
                                                      for f in cut_dir.iterdir()))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    finished = {f.name for f in cut_dir.iterdir()}
    assert all(not n.startswith(".") for n in finished) and 1 <= len(finished) < 6
    again = _cli("restore", src, "-o", cut_dir, *common)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and f"{len(finished)} already done" in text, text
    # Two processes on one folder at once.
    both_dir = tmp_path / "both"
    a, b = _cli("restore", src, "-o", both_dir, *common), _cli("restore", src, "-o", both_dir, *common)
    outs = [a.communicate(timeout=600)[0], b.communicate(timeout=600)[0]]
    assert a.returncode == 0 and b.returncode == 0, outs
    # Each video was restored by exactly one of them (the other skipped it: done or claimed).
    assert sum(int(re.search(r"(\d+) restored", o).group(1)) for o in outs) == 6, outs
    for d in (cut_dir, both_dir):
        assert sorted(f.name for f in d.iterdir()) == sorted(f.name for f in (tmp_path / "ref").iterdir())
        for f in (tmp_path / "ref").iterdir():
            want = np.stack([x.rgb for x in VideoReader(f)])
            got = np.stack([x.rgb for x in VideoReader(d / f.name)])
            assert np.array_equal(want, got), f.name

"""Hostile and unusual inputs through `vrestore restore` (docs/reliability.md)."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from vrestore.cli import app
from vrestore.errors import VrestoreError
from vrestore.infer.restorer import Restorer
from vrestore.models import build
from vrestore.video.io import VideoReader, VideoWriter

runner = CliRunner()


def _restore(src, dst, ckpt, *extra):
    return runner.invoke(app, ["restore", str(src), "-o", str(dst), "--model", str(ckpt), "--dtype", "fp32",
                               "--chunk", "6", "--overlap", "2", *extra])


def _write(path, frames, codec="x264"):
    with VideoWriter(path, codec=codec, fps=25) as w:
        for f in frames:
            w.write(np.ascontiguousarray(f))
    return path


def test_corrupt_packet_in_the_middle_restores_what_decodes(tmp_path, small_frames, qe_checkpoint):
    src = _write(tmp_path / "in.mp4", small_frames[:12, :64, :96])
    data = bytearray(src.read_bytes())
    i = int(len(data) * 0.45)
    data[i: i + 64] = b"\xff" * 64
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    r = VideoReader(bad)
    decoded = sum(1 for _ in r)
    assert r.corrupt_packets >= 1 and decoded < 12
    res = _restore(bad, tmp_path / "out.mkv", qe_checkpoint)
    assert res.exit_code == 0, res.output
    assert "corrupt packet" in res.output
    assert sum(1 for _ in VideoReader(tmp_path / "out.mkv")) == decoded


def test_mismatched_extension_is_read_by_content(tmp_path, small_frames, qe_checkpoint):
    src = _write(tmp_path / "in.mp4", small_frames[:5, :32, :48])
    for ext in (".mkv", ".avi", ".webm"):
        odd = tmp_path / f"really_mp4{ext}"
        shutil.copy(src, odd)
        assert len(list(VideoReader(odd))) == 5
    res = _restore(tmp_path / "really_mp4.avi", tmp_path / "out.mkv", qe_checkpoint)
    assert res.exit_code == 0, res.output


def test_one_frame_and_identical_frames(tmp_path, small_frames, qe_checkpoint):
    one = _write(tmp_path / "one.mkv", small_frames[:1, :32, :48], "ffv1")
    assert _restore(one, tmp_path / "one_out.mkv", qe_checkpoint).exit_code == 0
    assert len(list(VideoReader(tmp_path / "one_out.mkv"))) == 1
    same = np.repeat(small_frames[:1, :32, :48], 9, axis=0)
    r = Restorer(str(qe_checkpoint), device="cpu", dtype="fp32", chunk=4, overlap=1, dedup=True)
    out = r.restore_frames(same)
    assert out.shape == same.shape and r.stats["unique_frames"] == 1
    assert all(np.array_equal(out[0], o) for o in out)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 7), (3, 40)])
def test_tiny_and_odd_sizes(h, w, small_frames):
    for name in ("basicvsrpp_c16n2_x1", "basicvsrpp_c16n2_x4"):
        r = Restorer(build(name), device="cpu", dtype="fp32", chunk=4, overlap=1)
        out = r.restore_frames(small_frames[:3, :h, :w])
        assert out.shape == (3, h * r.scale, w * r.scale, 3)


def test_alpha_channels_are_dropped(tmp_path, small_frames, qe_checkpoint, pyav_encode):
    rgba = np.concatenate([small_frames[:3, :32, :48], np.full((3, 32, 48, 1), 128, np.uint8)], axis=-1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(rgba):
        pyav_encode(folder / f"{i:03d}.png", f[None], "png", "rgba", in_format="rgba")
    video = tmp_path / "alpha.mov"
    pyav_encode(video, rgba, "qtrle", "argb", in_format="rgba")
    for src in (folder, video):
        frames = [f.rgb for f in VideoReader(src)]
        assert len(frames) == 3 and frames[0].shape == (32, 48, 3)
        assert np.array_equal(frames[0], small_frames[0, :32, :48])  # lossless: colours kept, alpha dropped
        assert _restore(src, tmp_path / f"out_{src.name}.mkv", qe_checkpoint).exit_code == 0


def test_unwritable_output_locations_fail_clearly(tmp_path, small_frames, qe_checkpoint):
    src = _write(tmp_path / "in.mkv", small_frames[:3, :32, :48], "ffv1")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = _restore(src, blocker / "out.mkv", qe_checkpoint)
    assert res.exit_code == 2 and "a_file" in res.output
    with pytest.raises(VrestoreError):
        VideoWriter(blocker / "out.mkv", codec="ffv1")

"""Prepared pairs are decoded once into a memory-mapped store beside the data set."""

import os

import numpy as np
import pytest

from vrestore.data import pairs
from vrestore.data.pairs import FRAME_STORE, PairedClips, decoded_frames, read_meta
from vrestore.errors import VrestoreError


def test_frames_are_decoded_once_and_memory_mapped(tiny_pairs, monkeypatch):
    clip = next(iter(read_meta(tiny_pairs)["clips"].values()))
    for rel in (clip["lq"], clip["gt"]):
        first = decoded_frames(tiny_pairs, rel)
        assert isinstance(first, np.memmap) and not first.flags.writeable
        assert np.array_equal(first, pairs._read_all(tiny_pairs / rel))

    def no_decode(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(pairs, "_read_all", no_decode)
    data = PairedClips(tiny_pairs, 3, 32)  # every video of the set is in the store by now
    assert all(isinstance(c.lq, np.memmap) and isinstance(c.gt, np.memmap) for c in data.clips)
    lq, gt, _ = data.sample(2, np.random.default_rng(0))
    assert lq.shape[:2] == gt.shape[:2] == (2, 3) and lq.dtype.is_floating_point


def test_a_changed_video_is_decoded_again_and_its_stale_copy_removed(tmp_path, tiny_pairs):
    root = tmp_path / "set"
    root.mkdir()
    clip = next(iter(read_meta(tiny_pairs)["clips"].values()))
    (root / "lq").mkdir()
    src = root / clip["lq"]
    src.write_bytes((tiny_pairs / clip["lq"]).read_bytes())
    before = np.array(decoded_frames(root, clip["lq"]))
    # the same video with its last frame dropped, written over the old file
    from vrestore.video.io import VideoWriter

    short = tmp_path / "short.mkv"
    with VideoWriter(short, fps=25, codec="ffv1") as w:
        for f in before[:-1]:
            w.write(f)
    os.replace(short, src)
    after = decoded_frames(root, clip["lq"])
    assert len(after) == len(before) - 1
    assert len(list((root / FRAME_STORE).glob("*.npy"))) == 1


def test_a_read_only_data_set_is_held_in_memory(tiny_pairs, monkeypatch, caplog):
    clip = next(iter(read_meta(tiny_pairs)["clips"].values()))
    store = tiny_pairs / FRAME_STORE

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(pairs, "save_npy", refuse)
    for f in store.glob("*"):
        f.unlink()
    with caplog.at_level("WARNING"):
        frames = decoded_frames(tiny_pairs, clip["gt"])
    assert not isinstance(frames, np.memmap) and len(frames) > 0
    assert "holding them in memory" in caplog.text


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def die(path, array):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", die)
    with pytest.raises(KeyboardInterrupt):
        pairs.save_npy(tmp_path / "a.npy", np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_several_prepared_sets_train_as_one(tmp_path, tiny_pairs, renamed_copy):
    """Real clips and, say, procedural cartoons prepared apart: their clips in
    name order, each set after the one before; sets that would be ambiguous
    together (one clip name twice, two scales) are refused by name."""
    other = renamed_copy(tiny_pairs, tmp_path / "other", "aaa_first_by_name")
    one = PairedClips(tiny_pairs, 3, 32)
    both = PairedClips([tiny_pairs, other], 3, 32)
    assert [c.name for c in both.clips] == [c.name for c in one.clips] + ["aaa_first_by_name"]
    assert np.array_equal(both.clips[-1].lq, one.clips[0].lq)
    assert both.weights == pytest.approx([0.5, 0.5])  # by frame count
    picks = {both.sample(1, np.random.default_rng(s))[0].shape for s in range(4)}
    assert picks == {(1, 3, 3, 32, 32)}
    assert [c.name for c in PairedClips([tiny_pairs, other], 3, 32, subset=["aaa_*"]).clips] == ["aaa_first_by_name"]
    with pytest.raises(VrestoreError, match=f"is in both {tiny_pairs} and"):
        PairedClips([tiny_pairs, renamed_copy(tiny_pairs, tmp_path / "same", one.clips[0].name)], 3, 32)
    with pytest.raises(VrestoreError, match=r"mix scales \[1, 4\]"):
        PairedClips([tiny_pairs, renamed_copy(tiny_pairs, tmp_path / "x4", "b", scale=4)], 3, 32)
    with pytest.raises(VrestoreError, match="no prepared data set"):
        PairedClips([], 3, 32)

import json

import numpy as np
import pytest
import torch

from vrestore.errors import VrestoreError
from vrestore.metrics import psnr
from vrestore.video.degrade import degrade_video, detect_pqfs, ldp_frame_qp, prepare_dataset
from vrestore.video.io import VideoReader, ctu_size, probe


def test_hm_low_delay_p_qps():
    # HM encoder_lowdelay_P_main.cfg at QP 37: I frame 37, then 45, 44, 45, 38 (the PQF) repeating.
    assert [ldp_frame_qp(i, 37) for i in range(9)] == [37, 45, 44, 45, 38, 45, 44, 45, 38]
    assert ldp_frame_qp(4, 22) == 23


def test_ldp_stream_shows_the_pqf_pattern(tmp_path, small_clean):
    rep = degrade_video(small_clean, tmp_path / "lq.mp4", qp=37, gt_dst=tmp_path / "gt.mkv")
    s = rep.packet_sizes
    assert rep.pqfs == [0, 4, 8, 12, 16]
    # Every PQF is larger than each non-PQF frame of its GOP (QP 38 vs 44/45).
    for p in rep.pqfs[1:]:
        assert s[p] > max(s[p - 3: p]), (p, s)
    assert detect_pqfs(s) == rep.pqfs
    # One I frame then P frames only.
    import av

    with av.open(str(tmp_path / "lq.mp4")) as c:
        types = [av.video.frame.PictureType(f.pict_type).name for f in c.decode(video=0)]
    assert types[0] == "I" and set(types[1:]) == {"P"}
    # The per-frame quality shows the same sawtooth.
    gt = [f.rgb for f in VideoReader(tmp_path / "gt.mkv")]
    lq = [f.rgb for f in VideoReader(tmp_path / "lq.mp4")]
    ps = [psnr(a, b) for a, b in zip(gt, lq, strict=True)]
    assert np.mean([ps[i] for i in rep.pqfs[1:]]) > np.mean([ps[i] for i in range(1, len(ps)) if i % 4]) + 0.5


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_pairs_align(tmp_path, small_clean, scale):
    rep = degrade_video(small_clean, tmp_path / "lq.mp4", qp=22, scale=scale, gt_dst=tmp_path / "gt.mkv",
                        max_frames=4)
    gt = np.stack([f.rgb for f in VideoReader(tmp_path / "gt.mkv")])
    lq = np.stack([f.rgb for f in VideoReader(tmp_path / "lq.mp4")])
    m = {2: 16, 4: 64}[scale]
    assert gt.shape[1] % m == 0 and gt.shape[2] % m == 0
    assert lq.shape[1] * scale == gt.shape[1] and lq.shape[2] * scale == gt.shape[2]
    assert (rep.width, rep.height) == (lq.shape[2], lq.shape[1])
    # Bicubic upscaling of the LR frame matches the GT best with no shift.
    up = torch.nn.functional.interpolate(torch.from_numpy(lq).permute(0, 3, 1, 2).float(), scale_factor=scale,
                                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
    g = gt.astype(np.float32)
    errs = {}
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = np.roll(up, (dy, dx), axis=(1, 2))[:, 4:-4, 4:-4]
            errs[(dy, dx)] = float(np.mean((a - g[:, 4:-4, 4:-4]) ** 2))
    assert min(errs, key=errs.get) == (0, 0)


def test_prepare_is_reproducible_and_resumable(tmp_path, small_clean):
    out = tmp_path / "set"
    meta = prepare_dataset(small_clean, out, task="qe", max_frames=8)
    clip = meta["clips"]["bikes_small"]
    assert clip["pqfs"] == [0, 4] and clip["num_frames"] == 8
    first = (out / clip["lq"]).read_bytes()
    before = (out / clip["lq"]).stat().st_mtime_ns
    prepare_dataset(small_clean, out, task="qe", max_frames=8)  # finished pairs are skipped
    assert (out / clip["lq"]).stat().st_mtime_ns == before
    prepare_dataset(small_clean, tmp_path / "again", task="qe", max_frames=8)
    assert (tmp_path / "again" / clip["lq"]).read_bytes() == first
    assert json.loads((out / "meta.json").read_text())["protocol"].startswith("LDV2")
    with pytest.raises(VrestoreError, match="qe QP37"):
        prepare_dataset(small_clean, out, task="x4")


def test_prepare_in_parallel_gives_the_same_pairs(tmp_path, small_clean):
    src = tmp_path / "clean"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / f"{name}.mkv").symlink_to(small_clean)
    calls = []
    serial = prepare_dataset(src, tmp_path / "serial", task="x2", max_frames=6)
    parallel = prepare_dataset(src, tmp_path / "parallel", task="x2", max_frames=6, jobs=3,
                               progress=lambda *a: calls.append(a))
    assert serial["clips"] == parallel["clips"] and sorted(parallel["clips"]) == ["a", "b", "c"]
    assert calls[-1] == ("videos", 3, 3)
    for clip in parallel["clips"].values():  # the GT's Matroska header holds a random id: compare its frames
        assert (tmp_path / "parallel" / clip["lq"]).read_bytes() == (tmp_path / "serial" / clip["lq"]).read_bytes()
        gts = [np.stack([f.rgb for f in VideoReader(tmp_path / d / clip["gt"])]) for d in ("serial", "parallel")]
        assert np.array_equal(*gts) and len(gts[0]) == 6
    assert json.loads((tmp_path / "parallel" / "meta.json").read_text())["clips"] == parallel["clips"]
    # a broken video stops a parallel run with its own error; the finished pairs stay recorded
    (src / "broken.mkv").write_bytes(b"not a video")
    (src / "d.mkv").symlink_to(small_clean)
    with pytest.raises(VrestoreError, match="broken"):
        prepare_dataset(src, tmp_path / "parallel", task="x2", max_frames=6, jobs=2)
    assert {"a", "b", "c"} <= set(json.loads((tmp_path / "parallel" / "meta.json").read_text())["clips"])


def test_small_pictures_degrade_the_same_every_time(tmp_path, small_clean):
    # x4 of the 128x128 clip is 32x32: with x265's 64 px CTUs most encodes of it
    # gave a different bitstream, in one process as across processes.
    outs = set()
    for i in range(4):
        degrade_video(small_clean, tmp_path / f"lq{i}.mp4", scale=4)
        outs.add((tmp_path / f"lq{i}.mp4").read_bytes())
    assert len(outs) == 1
    # A pair prepared before the fix (no "ctu" in its meta: x265's 64) is redone on the next run.
    out = tmp_path / "x4set"
    clip = prepare_dataset(small_clean, out, task="x4", max_frames=8)["clips"]["bikes_small"]
    assert clip["ctu"] == 16 and clip["lq_size"] == [32, 32]
    meta = json.loads((out / "meta.json").read_text())
    del meta["clips"]["bikes_small"]["ctu"]
    (out / "meta.json").write_text(json.dumps(meta))
    before = (out / clip["lq"]).stat().st_mtime_ns
    assert prepare_dataset(small_clean, out, task="x4", max_frames=8)["clips"]["bikes_small"]["ctu"] == 16
    assert (out / clip["lq"]).stat().st_mtime_ns != before
    assert [ctu_size(*s) for s in ((1280, 720), (320, 64), (80, 65), (64, 64), (48, 33), (32, 96))] == \
        [64, 32, 64, 32, 32, 16]


def test_degrade_bad_input(tmp_path, small_clean):
    with pytest.raises(VrestoreError, match="input file"):
        degrade_video(small_clean, small_clean, overwrite=True)
    with pytest.raises(VrestoreError, match="scale"):
        degrade_video(small_clean, tmp_path / "x.mp4", scale=3)
    tiny = tmp_path / "tiny.mkv"
    from vrestore.video.io import VideoWriter

    with VideoWriter(tiny, codec="ffv1") as w:
        w.write(np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(VrestoreError, match="too small"):
        degrade_video(tiny, tmp_path / "y.mp4", scale=4)
    assert not (tmp_path / "y.mp4").exists()
    # Below 16 px x265 refuses to open (an opaque FFmpeg error before): a clear refusal instead.
    with VideoWriter(tiny, codec="ffv1", overwrite=True) as w:
        w.write(np.zeros((12, 40, 3), np.uint8))
    with pytest.raises(VrestoreError, match=r"too small for x1 \(needs >= 16x16\)"):
        degrade_video(tiny, tmp_path / "y.mp4")
    with VideoWriter(tiny, codec="ffv1", overwrite=True) as w:
        w.write(np.zeros((16, 16, 3), np.uint8))
    assert degrade_video(tiny, tmp_path / "y.mp4").width == 16
    assert probe(small_clean).num_frames == 20


def test_bicubic_upscale_is_the_uint8_baseline():
    from vrestore.video.degrade import bicubic_upscale

    flat = np.full((2, 5, 7, 3), 130, np.uint8)
    up = bicubic_upscale(flat, 4)
    assert up.shape == (2, 20, 28, 3) and up.dtype == np.uint8
    assert (up == 130).all()  # a flat image stays flat (no ringing, no offset)
    edge = np.zeros((1, 8, 8, 3), np.uint8)
    edge[:, :, 4:] = 255
    assert bicubic_upscale(edge, 2).min() == 0 and bicubic_upscale(edge, 2).max() == 255  # clamped, not wrapped

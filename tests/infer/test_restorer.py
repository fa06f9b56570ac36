import av
import numpy as np
import pytest
import torch
from torch import nn

from vrestore.errors import VrestoreError
from vrestore.infer.restorer import Restorer, tta_forward, tta_inverse
from vrestore.metrics import psnr
from vrestore.models import save
from vrestore.video.io import VideoReader, probe


def _fp32(*a, **kw):
    return Restorer(*a, device="cpu", dtype="fp32", **kw)


def test_tta_is_the_average_of_the_eight_transformed_runs(small_frames, random_model):
    s1 = random_model("basicvsrpp_c16n2_x4")
    s2 = random_model("swinir_e24_color_dn", seed=1)
    clip = torch.from_numpy(small_frames[:3, :32, :32]).permute(0, 3, 1, 2).float() / 255
    r = _fp32(s1, s2, tta=True)
    got = r.run_clip(clip)
    manual = []
    with torch.no_grad():
        for k in range(8):
            x = tta_forward(clip, k)
            y = s1(x.unsqueeze(0))[0]
            y = torch.cat([s2(y[i: i + 1]) for i in range(len(y))])
            manual.append(tta_inverse(y, k))
    assert torch.allclose(got, torch.stack(manual).mean(0), atol=1e-5)
    for k in range(8):
        assert torch.equal(tta_inverse(tta_forward(clip, k), k), clip)


def test_compiled_stage2_matches_eager(small_frames, random_model):
    """``compile=True`` compiles stage 2 (frozen weights) and stage 1's DCN sampling, on copies, and restores the
    same frames."""
    from vrestore.models.dcn import ModulatedDeformConv2d

    s1 = random_model("basicvsrpp_c16n2_x1")
    s2 = random_model("swinir_e24_color_dn", seed=1)
    clip = torch.from_numpy(small_frames[:3]).permute(0, 3, 1, 2).float() / 255
    eager, comp = _fp32(s1, s2), _fp32(s1, s2, compile=True)
    assert comp.compiled and comp.stage2._compiled_call_impl is not None and "compiled" in comp.engine
    assert not eager.compiled and eager.stage2._compiled_call_impl is None

    def samplers(m):
        return {x.sampler for x in m.modules() if isinstance(x, ModulatedDeformConv2d)}
    assert samplers(comp.stage1[0]) == {"auto"} and samplers(eager.stage1[0]) == samplers(s1) == {None}
    torch.testing.assert_close(comp.run_clip(clip), eager.run_clip(clip), atol=1e-4, rtol=0)


class _Blur(nn.Module):
    """An equivariant toy model (isotropic 3x3 blur), same API as stage 1."""

    scale = 1

    def forward(self, x, pqfs=None):
        n, t, c, h, w = x.shape
        k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
        y = nn.functional.conv2d(nn.functional.pad(x.reshape(-1, 1, h, w), (1, 1, 1, 1), mode="replicate"),
                                 k.view(1, 1, 3, 3))
        return y.view(n, t, c, h, w)


def test_tta_leaves_an_equivariant_model_unchanged(small_frames):
    clip = torch.from_numpy(small_frames[:2]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(_fp32(_Blur(), tta=True).run_clip(clip), _fp32(_Blur()).run_clip(clip), atol=1e-6)


def test_ensemble_averages_stage1_outputs(small_frames, random_model):
    a, b = random_model("basicvsrpp_c16n2_x4", 0), random_model("basicvsrpp_c16n2_x4", 1)
    clip = torch.from_numpy(small_frames[:2, :24, :24]).permute(0, 3, 1, 2).float() / 255
    ens = _fp32([a, b]).run_clip(clip)
    avg = (_fp32(a).run_clip(clip) + _fp32(b).run_clip(clip)) / 2
    assert torch.allclose(ens, avg, atol=1e-6)
    with pytest.raises(VrestoreError, match="different scales"):
        _fp32([a, random_model("basicvsrpp_c16n2_x1")])


def test_stage2_ensemble_averages_stage2_outputs_on_one_stage1_output(small_frames, random_model):
    """Several stage 2s run on the same stage-1 output and their outputs are averaged (stage 1 runs once), with
    and without stage-2 tiles."""
    s1 = random_model("basicvsrpp_c16n2_x1")
    a, b = random_model("swinir_e24_color_dn", 1), random_model("swinir_e24_color_dn", 2)
    clip = torch.from_numpy(small_frames[:2, :32, :32]).permute(0, 3, 1, 2).float() / 255
    ens = _fp32(s1, [a, b])
    assert ens.stage2 == [a, b]
    avg = (_fp32(s1, a).run_clip(clip) + _fp32(s1, b).run_clip(clip)) / 2
    assert not torch.allclose(_fp32(s1, a).run_clip(clip), avg, atol=1e-3)  # the members differ
    torch.testing.assert_close(ens.run_clip(clip), avg, atol=1e-6, rtol=0)
    tiles = {"stage2_tile": 24, "tile_overlap": 8}  # the members' average is blended, tile by tile
    tiled = (_fp32(s1, a, **tiles).run_clip(clip) + _fp32(s1, b, **tiles).run_clip(clip)) / 2
    torch.testing.assert_close(_fp32(s1, [a, b], **tiles).run_clip(clip), tiled, atol=1e-6, rtol=0)
    assert _fp32(s1, [a]).stage2 is a and _fp32(s1).stage2 is None
    with pytest.raises(VrestoreError, match="keep the size"):
        _fp32(s1, [a, random_model("basicvsrpp_c16n2_x4")])


@pytest.mark.parametrize("n", [2, 4, 8])
def test_stage2_tta_averages_transformed_stage2_runs_on_one_stage1_output(small_frames, random_model, n):
    """Stage-2 TTA: stage 1 runs once, stage 2 on each transform of its output, inverted and averaged (and each
    ensemble member under each transform)."""
    from vrestore.infer.restorer import STAGE2_TTA

    s1 = random_model("basicvsrpp_c16n2_x1")
    a, b = random_model("swinir_e24_color_dn", 1), random_model("swinir_e24_color_dn", 2)
    clip = torch.from_numpy(small_frames[:2, :32, :40]).permute(0, 3, 1, 2).float() / 255  # not square
    with torch.no_grad():
        y1 = s1(clip.unsqueeze(0))[0]
        manual = torch.stack([tta_inverse(m(tta_forward(y1, k)), k) for k in STAGE2_TTA[n] for m in (a, b)]).mean(0)
    assert len(STAGE2_TTA[n]) == n and STAGE2_TTA[n][0] == 0
    torch.testing.assert_close(_fp32(s1, [a, b], stage2_tta=n).run_clip(clip), manual, atol=1e-5, rtol=0)
    assert not torch.allclose(_fp32(s1, a, stage2_tta=n).run_clip(clip), _fp32(s1, a).run_clip(clip), atol=1e-3)


def test_stage2_tta_refusals(random_model):
    s1 = random_model("basicvsrpp_c16n2_x1")
    with pytest.raises(VrestoreError, match="takes 1, 2, 4, 8 transforms"):
        _fp32(s1, random_model("swinir_e24_color_dn"), stage2_tta=3)
    with pytest.raises(VrestoreError, match="not both"):
        _fp32(s1, random_model("swinir_e24_color_dn"), tta=True, stage2_tta=2)


def test_chunked_stream_matches_whole_sequence(small_frames, random_model):
    m = random_model("basicvsrpp_c16n2_x1")
    frames = np.concatenate([small_frames, small_frames[::-1]])  # 24 real frames
    whole = _fp32(m, chunk=100).restore_frames(frames)
    chunked = _fp32(m, chunk=10, overlap=4).restore_frames(frames)
    assert chunked.shape == whole.shape
    per_frame = [psnr(a, b) for a, b in zip(whole, chunked, strict=True)]
    assert min(per_frame) > 40, per_frame  # random weights; a trained model is measured in benchmarks/


class _Counting(nn.Module):
    """Wraps a stage 2 and counts the frames it is given."""

    scale = 1

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.frames = inner, 0

    def forward(self, x):
        self.frames += x.shape[0]
        return self.inner(x)


def test_stream_runs_stage2_once_per_frame(small_frames, random_model):
    """Windows share ``overlap`` frames; they are blended after stage 1 and stage 2 then runs once per frame
    (it ran on every shared frame twice, 4/3 of the frames at chunk 32, overlap 8). x8 TTA pairs each
    transform's two stages, so there the windows' final outputs are blended, as before."""
    s1, s2 = random_model("basicvsrpp_c16n2_x1"), _Counting(random_model("swinir_e24_color_dn", seed=1))
    frames = np.concatenate([small_frames, small_frames[::-1]])[:, :32, :32]  # 24 frames: 4 windows of 10
    out = _fp32(s1, s2, chunk=10, overlap=4).restore_frames(frames)
    assert s2.frames == len(frames) == len(out)
    # the same as stage 1's blended stream followed by stage 2 frame by frame (up to stage 1's 8-bit rounding)
    first = _fp32(s1, chunk=10, overlap=4).restore_frames(frames)
    with torch.no_grad():
        x = torch.from_numpy(first).permute(0, 3, 1, 2).float() / 255
        then = (s2.inner(x).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert min(psnr(a, b) for a, b in zip(out, then, strict=True)) > 45
    s2.frames = 0
    _fp32(s1, s2, chunk=4, overlap=2, tta=True).restore_frames(frames[:5])  # windows of 4 + 1 (back over 3)
    assert s2.frames == 8 * (4 + 4)
    with pytest.raises(VrestoreError, match="spans both stages"):
        _fp32(s1, s2, tta=True).run_clip(torch.zeros(2, 3, 8, 8), stage2=False)


def test_greyscale_frames_stay_grey(small_frames, random_model):
    """A black-and-white input (R = G = B) comes out exactly grey, the luma of what the models made of it;
    colour frames beside it are untouched, with either stage and under x8 TTA."""
    f = small_frames[:6].copy()
    grey = np.round(f.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    f[[1, 4]] = np.repeat(grey[[1, 4], ..., None], 3, axis=-1)
    s2 = random_model("swinir_e24_color_dn", seed=1)
    alone = _fp32(None, s2)
    out = alone.restore_frames(f)
    for i in (1, 4):
        assert np.array_equal(out[i, ..., 0], out[i, ..., 1]) and np.array_equal(out[i, ..., 1], out[i, ..., 2])
        raw = alone.run_clip(torch.from_numpy(f[i: i + 1]).permute(0, 3, 1, 2).float() / 255)[0]
        luma = (raw.clamp(0, 1) * torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)).sum(0) * 255
        assert np.abs(out[i, ..., 0].astype(float) - luma.numpy()).max() <= 1
        assert not torch.equal(raw[0], raw[1])  # the model alone did colour it
    colour = [0, 2, 3, 5]
    assert np.array_equal(out[colour], alone.restore_frames(f[colour]))  # frames are independent without stage 1
    both = _fp32(random_model("basicvsrpp_c16n2_x1"), s2, chunk=6, overlap=0)
    for r in (both, _fp32(random_model("basicvsrpp_c16n2_x1"), tta=True, chunk=6, overlap=0)):
        o = r.restore_frames(f)
        assert all(np.array_equal(o[i, ..., 0], o[i, ..., 2]) for i in (1, 4))
        assert not any(np.array_equal(o[i, ..., 0], o[i, ..., 2]) for i in colour)


def test_stage2_alone(small_frames, random_model):
    """No stage 1 (``None`` or ``"none"``): stage 2 on each compressed frame, once, in windows that share no
    frames; at least one stage is needed."""
    s2 = _Counting(random_model("swinir_e24_color_dn", seed=1))
    frames = small_frames[:, :32, :40]
    r = _fp32(None, s2, chunk=5, overlap=2)
    assert r.overlap == 0 and r.scale == 1 and r.stage1 == []
    out = r.restore_frames(frames)
    assert s2.frames == len(frames)
    with torch.no_grad():
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        want = (s2.inner(x).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(int) - want).max() <= 1
    assert np.array_equal(_fp32("none", s2.inner).restore_frames(frames[:3]), out[:3])
    s2.frames = 0
    _fp32(None, s2, chunk=5, tta=True).restore_frames(frames[:7])  # the last window reaches back over nothing
    assert s2.frames == 8 * 7
    with pytest.raises(VrestoreError, match="nothing to run"):
        _fp32(None)


def test_spatial_tiles_match_untiled(small_frames, random_model):
    m = random_model("basicvsrpp_c16n2_x4")
    clip = torch.from_numpy(small_frames[:3]).permute(0, 3, 1, 2).float() / 255
    full = _fp32(m).run_clip(clip)
    tiled = _fp32(m, tile=48, tile_overlap=24).run_clip(clip)
    assert tiled.shape == full.shape
    assert float((tiled - full).abs().mean()) < 2e-3


def test_window_buffers_are_reused_and_callers_tensors_kept(small_frames, random_model):
    """The stream's stage 2 writes each output over its own input frame (one window of float frames less,
    ``inplace``), with the same values; the public ``run_clip`` never writes into the caller's clip, even for
    stage 2 alone, whose stage-1 output is the clip itself."""
    s2 = random_model("swinir_e24_color_dn", 1)
    r = _fp32(None, s2)
    clip = torch.from_numpy(small_frames[:2, :24, :24]).permute(0, 3, 1, 2).float() / 255
    kept = clip.clone()
    with torch.inference_mode():
        want = r._stage2(clip)
        assert torch.equal(clip, kept)
        work = clip.clone()
        got = r._stage2(work, inplace=True)
    assert got is work and torch.equal(got, want)
    for tta in (False, True):
        _fp32(None, s2, tta=tta).run_clip(clip)
        assert torch.equal(clip, kept)
    # the stream (uint8 inputs until a window runs, outputs converted in place) gives run_clip's frames
    frames = small_frames[:5, :24, :24]
    streamed = _fp32(None, s2, chunk=3).restore_frames(frames)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    direct = (r.run_clip(x).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(streamed, direct)


def test_uint8_clips_become_float_tile_by_tile_with_the_same_result(small_frames, random_model):
    """The stream hands run_clip its window as uint8 (a tiled run then never holds it as float): the result
    is run_clip's on the float frames, with tiles, without, with x8 TTA; stage 1's output for stage 2 alone
    is a new tensor, not the caller's clip."""
    s1, s2 = random_model("basicvsrpp_c16n2_x4"), random_model("swinir_e24_color_dn", seed=1)
    u8 = torch.from_numpy(small_frames[:3, :40, :48]).permute(0, 3, 1, 2).contiguous()
    x = u8.float() / 255
    for kw in ({}, {"tile": 24, "tile_overlap": 8}, {"tta": True}):
        r = _fp32(s1, s2, **kw)
        assert torch.equal(r.run_clip(u8), r.run_clip(x)), kw
    alone = _fp32(None, s2)
    assert torch.equal(alone.run_clip(u8, stage2=False), x)
    out = alone.run_clip(x, stage2=False)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert tta_forward(x, 0) is x and tta_inverse(x, 0) is x  # no copy of a window for the identity


def test_tiles_are_few_and_even():
    """Each axis gets the fewest tiles of at most ``size`` that share ``overlap`` pixels, all of one length and
    spread evenly: the old placement (tiles of ``size`` from the start, the last flush with the end) gave 1080
    rows two 1024-row tiles, 1.9x the work; now two of 560."""
    from vrestore.infer.restorer import _tiling

    assert _tiling(1080, 1024, 32) == (560, [0, 520])
    assert _tiling(100, 128, 32) == (100, [0])
    for total in (33, 100, 257, 480, 1080, 2160, 3840):
        for size in (24, 40, 64, 256, 1000, 1024):
            for overlap in (0, 8, 32):
                length, starts = _tiling(total, size, overlap)
                if total <= size:
                    assert (length, starts) == (total, [0])
                    continue
                ov = min(overlap, size // 2)
                n = len(starts)
                assert length <= size and starts[0] == 0 and starts[-1] + length == total
                assert all(a + length - b >= ov for a, b in zip(starts, starts[1:], strict=False))
                assert (n - 1) * size - (n - 2) * ov < total  # one tile fewer could not cover the axis
                steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
                assert steps[:-1] == [steps[0]] * (n - 2) and 0 < steps[-1] <= steps[0]  # even, the last clamped


def test_tiles_reach_stage2_in_its_own_pixels(small_frames, random_model):
    """`--tile` bounds both stages' memory: stage 2 gets tiles of at most the same area, in output pixels (tile
    x the scale), and blends them close to the untiled result; ``stage2_tile=0`` keeps whole frames for stage 2."""
    s1, s2 = random_model("basicvsrpp_c16n2_x4"), random_model("swinir_e24_color_dn", 1)
    clip = torch.from_numpy(small_frames[:2, :40, :40]).permute(0, 3, 1, 2).float() / 255
    seen: list[tuple[int, int]] = []
    s2.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[-2:])))
    full = _fp32(s1, s2).run_clip(clip)
    assert set(seen) == {(160, 160)}
    seen.clear()
    tiled = _fp32(s1, s2, tile=24, tile_overlap=8).run_clip(clip)
    # 2 frames, 2 x 2 tiles of at most 24 input pixels (96 output): 160 output pixels take two of 88
    assert set(seen) == {(88, 88)} and len(seen) == 2 * 4
    assert tiled.shape == full.shape
    assert float((tiled - full).abs().mean()) < 5e-3
    seen.clear()
    _fp32(s1, s2, tile=24, tile_overlap=8, stage2_tile=0).run_clip(clip)
    assert set(seen) == {(160, 160)}


def test_default_tiles_only_frames_above_the_threshold(small_frames, random_model, monkeypatch):
    """``tile=None`` (``restore``'s default) tiles both stages where stage 1's features have more than
    ``AUTO_TILE_ABOVE`` pixels, with ``AUTO_TILE`` feature pixels a side, and leaves smaller frames whole; an
    explicit 0 never tiles. The x4 model's features are at the input's size, the same-size model's at 1/4."""
    import vrestore.infer.restorer as rmod

    monkeypatch.setattr(rmod, "AUTO_TILE_ABOVE", 32 * 32)
    monkeypatch.setattr(rmod, "AUTO_TILE", 24)
    same = _fp32(random_model("basicvsrpp_c16n2_x1"), tile=None)
    assert (same.tile_for(160, 160), same.tile_for(128, 128)) == (96, 0)  # features 40x40 and 32x32
    alone = _fp32(None, random_model("swinir_e24_color_dn"), tile=None)  # counted as a same-size model
    assert (alone.tile_for(160, 160), alone.tile_for(128, 128)) == (96, 0)
    s1, s2 = random_model("basicvsrpp_c16n2_x4"), random_model("swinir_e24_color_dn", 1)
    seen: list[tuple[int, int]] = []
    s2.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[-2:])))
    auto = _fp32(s1, s2, tile=None, tile_overlap=8)
    big = torch.from_numpy(small_frames[:2, :40, :40]).permute(0, 3, 1, 2).float() / 255
    auto.run_clip(big)
    assert set(seen) == {(88, 88)} and auto.tile_for(40, 40) == 24  # two tiles of 88 output pixels a side
    seen.clear()
    auto.run_clip(big[..., :32, :32])  # 32 x 32: not above the threshold
    assert set(seen) == {(128, 128)} and auto.tile_for(32, 32) == 0
    seen.clear()
    _fp32(s1, s2, tile=0).run_clip(big)
    assert set(seen) == {(160, 160)}


def test_dedup_repeats_outputs(small_frames, random_model):
    m = random_model("basicvsrpp_c16n2_x1")
    f = small_frames
    clip = np.stack([f[0], f[1], f[1], f[1], f[2], f[3], f[3], f[4]])
    out = _fp32(m, dedup=True, chunk=3, overlap=1).restore_frames(clip)
    assert len(out) == 8
    assert np.array_equal(out[1], out[2]) and np.array_equal(out[2], out[3]) and np.array_equal(out[5], out[6])
    assert not np.array_equal(out[0], out[1])
    plain = _fp32(m, chunk=100).restore_frames(np.stack([f[0], f[1], f[2], f[3], f[4]]))
    assert psnr(out[4], plain[2]) > 40


def test_long_videos_compile_the_dcn_sampler(tmp_path, small_frames, random_model, monkeypatch):
    """``restore_video`` compiles stage 1's deformable sampling for a video long enough to repay it (stage-1
    feature pixels x frames), and only there; the output is the default path's within a grey level."""
    from vrestore.infer import restorer as rmod
    from vrestore.models import dcn
    from vrestore.video.io import VideoWriter

    monkeypatch.delenv("VRESTORE_DCN_SAMPLER", raising=False)
    same, x4 = random_model("basicvsrpp_c16n2_x1"), random_model("basicvsrpp_c16n2_x4")
    frames_at = -(-rmod.COMPILED_DCN_FROM // (856 * 480 // 16))  # same size: features at 1/4 per side
    many = 10 * frames_at
    with monkeypatch.context() as mp:  # no C++ compiler (or a GPU): nothing to compile
        mp.setattr(dcn, "_have_compiler", lambda: False)
        assert _fp32(same).dcn_sampler_for(856, 480, many) is None
    if not dcn.can_compile_on("cpu"):
        pytest.skip("no C++ compiler here: the compiled path cannot run")
    assert _fp32(same).dcn_sampler_for(856, 480, frames_at) == "auto"
    assert _fp32(same).dcn_sampler_for(856, 480, frames_at - 1) is None
    assert _fp32(x4).dcn_sampler_for(214, 120, frames_at) == "auto"  # x4: features at the input's size
    assert _fp32(same).dcn_sampler_for(214, 120, frames_at) is None
    assert _fp32(same).dcn_sampler_for(856, 480, None) is None  # length unknown
    with monkeypatch.context() as mp:  # the user's choice wins, and the report must not claim otherwise
        mp.setenv("VRESTORE_DCN_SAMPLER", "grid_sample")
        assert _fp32(same).dcn_sampler_for(856, 480, many) is None
    assert _fp32(same, tile=64).dcn_sampler_for(856, 480, many) is None  # each tile size would compile
    assert _fp32(same, compile=True).dcn_sampler_for(856, 480, many) is None  # already set on its layers
    assert _fp32(None, random_model("swinir_e24_color_dn")).dcn_sampler_for(856, 480, many) is None

    src = tmp_path / "in.mkv"
    with VideoWriter(src, fps=25, codec="ffv1") as w:
        for f in small_frames[:6]:
            w.write(f)
    gathered = []
    real = dcn._by_gather

    def spy(*a, **kw):
        gathered.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(dcn, "_by_gather", spy)
    plain = _fp32(same, chunk=6, overlap=0).restore_video(src, tmp_path / "plain.mkv")
    assert plain.extra["dcn_sampler"] == "default" and not gathered
    monkeypatch.setattr(rmod, "COMPILED_DCN_FROM", 1)
    long = _fp32(same, chunk=6, overlap=0).restore_video(src, tmp_path / "long.mkv")
    assert long.extra["dcn_sampler"] == "auto" and gathered  # the compiled sampler ran
    a = np.stack([f.rgb for f in VideoReader(tmp_path / "plain.mkv")]).astype(int)
    b = np.stack([f.rgb for f in VideoReader(tmp_path / "long.mkv")]).astype(int)
    assert a.shape == b.shape == small_frames[:6].shape and np.abs(a - b).max() <= 1
    assert {m.sampler for m in same.modules() if isinstance(m, dcn.ModulatedDeformConv2d)} == {None}

    def broken(*a, **kw):
        raise RuntimeError("no cc1plus")
    monkeypatch.setattr(dcn, "_COMPILED_OK", True)  # restored after the test: the failure below clears it
    monkeypatch.setattr(dcn, "_by_gather", broken)
    failed = _fp32(same, chunk=6, overlap=0).restore_video(src, tmp_path / "failed.mkv")
    assert failed.extra["dcn_sampler"] == "grid_sample (compiling failed)" and not dcn._COMPILED_OK
    c = np.stack([f.rgb for f in VideoReader(tmp_path / "failed.mkv")]).astype(int)
    assert np.array_equal(a, c)  # the default path's frames


def test_restore_video_keeps_count_rate_colour_and_audio(tmp_path, bbb, random_model):
    from vrestore.video.io import VideoWriter

    src = tmp_path / "in.mkv"
    r = VideoReader(bbb, max_frames=9)
    with VideoWriter(src, fps=r.info.fps, time_base=r.info.time_base, codec="x264", colour=r.info.colour,
                     audio_from=bbb) as w:
        for fr in r:
            w.write(np.ascontiguousarray(fr.rgb[::8, ::8]), fr.pts)
    m = random_model("basicvsrpp_c16n2_x4")
    save(m, tmp_path / "m.safetensors")
    rep = _fp32(str(tmp_path / "m.safetensors"), chunk=4, overlap=1).restore_video(src, tmp_path / "out.mkv")
    a, b = probe(src), probe(tmp_path / "out.mkv")
    assert rep.frames == 9 == sum(1 for _ in VideoReader(tmp_path / "out.mkv"))
    assert (b.width, b.height) == (a.width * 4, a.height * 4)
    assert b.fps == a.fps and b.colour.matrix == a.colour.matrix
    with av.open(str(tmp_path / "out.mkv")) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
    with pytest.raises(VrestoreError, match="already exists"):
        _fp32(m).restore_video(src, tmp_path / "out.mkv")

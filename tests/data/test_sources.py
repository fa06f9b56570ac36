import numpy as np
import pytest

from vrestore.data.sources import (
    EXTRA_PHOTOS,
    PHOTOS,
    VALIDATION_PHOTOS,
    camera_path,
    cartoon_video,
    flatten,
    photo,
    recolour,
    write_clean_sources,
)
from vrestore.video.io import VideoReader

pytest.importorskip("skimage", reason="the photographs come with scikit-image")


def _saturation(img: np.ndarray) -> float:
    from skimage.color import rgb2hsv

    return float(rgb2hsv(img)[..., 1].mean())


def _variation(img: np.ndarray) -> float:
    f = img.astype(np.float64)
    return float(np.abs(np.diff(f, axis=0)).mean() + np.abs(np.diff(f, axis=1)).mean())


def test_extra_photos_are_new_real_pictures_that_fill_a_view():
    """The extra images must not repeat a training or validation photograph, and each must be at least as large as
    write_clean_sources' default 256x320 view, so that no view is mostly a mirrored seam."""
    assert not set(EXTRA_PHOTOS) & (set(PHOTOS) | set(VALIDATION_PHOTOS))
    seen = [photo(n) for n in (*PHOTOS, *VALIDATION_PHOTOS)]
    for name in EXTRA_PHOTOS:
        img = photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert img.shape[0] >= 256 and img.shape[1] >= 320, (name, img.shape)
        assert img.std() > 10, name  # a picture, not a blank
        assert not any(o.shape == img.shape and np.array_equal(o, img) for o in seen), name
    grace = photo("grace_hopper")  # matplotlib's colour photograph: colour, unlike the greyscale scikit-image ones
    assert np.abs(grace[..., 0].astype(int) - grace[..., 2]).mean() > 5


def test_recolour_moves_hue_and_raises_saturation():
    img = photo("coffee")[::4, ::4]
    out = recolour(img, np.random.default_rng(0))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert _saturation(out) > 1.2 * _saturation(img)
    # a different colour, not a brightness change: the channel means are reordered or shifted
    assert np.abs(out.mean((0, 1)) - img.mean((0, 1))).max() > 10
    np.testing.assert_array_equal(out, recolour(img, np.random.default_rng(0)))  # seeded


def test_flatten_leaves_flat_regions():
    img = photo("astronaut")[::4, ::4]
    out = flatten(img, np.random.default_rng(1))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert _variation(out) < 0.8 * _variation(img)


def test_variants_are_written_next_to_each_photo(tmp_path):
    paths = write_clean_sources(tmp_path, n_frames=3, size=(32, 48), photos=("astronaut",), clips=(), variants=2)
    assert [p.name for p in paths] == ["photo_astronaut.mkv", "photo_astronaut_v1.mkv", "photo_astronaut_v2.mkv"]
    clips = [np.stack([f.rgb for f in VideoReader(p)]) for p in paths]
    assert all(c.shape == (3, 32, 48, 3) for c in clips)
    assert np.abs(clips[0].astype(int) - clips[1]).mean() > 10  # recoloured, and another camera path
    assert np.abs(clips[1].astype(int) - clips[2]).mean() > 10


def test_a_camera_path_with_holds_stops_and_moves_and_leaves_the_plain_path_unchanged():
    from itertools import groupby

    plain = camera_path(60, seed=3)
    assert camera_path(60, seed=3, holds=False) == plain  # the data sets made before holds existed
    held = camera_path(60, seed=3, holds=True)
    # while the camera moves, it moves along the plain path (the same positions, with a clock that stops)
    assert set(held) <= set(plain) and len(set(held)) > 10
    runs = [len(list(g)) for _, g in groupby(held)]
    stops = [n for n in runs[:-1] if n > 1]  # the last run may be cut by the clip's end
    assert stops and min(stops) >= 7  # a stop of 6 to 15 frames holds the position 7 to 16 times


def test_cartoons_are_flat_and_their_objects_move_under_a_still_camera():
    """Rendered-animation stand-ins: mostly flat colour, and shapes that move on their own, so that while the
    camera holds, a few pixels change and most stay."""
    clip = cartoon_video(30, (64, 80), seed=4, holds=True)
    assert clip.shape == (30, 64, 80, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, cartoon_video(30, (64, 80), seed=4, holds=True))
    assert np.abs(clip.astype(int) - cartoon_video(30, (64, 80), seed=5, holds=True)).mean() > 10
    smooth = np.abs(np.diff(clip.astype(int), axis=2)).max(-1) <= 3
    assert smooth.mean() > 0.6
    cams = camera_path(30, seed=4, holds=True)
    held = [t for t in range(1, 30) if cams[t] == cams[t - 1]]
    assert held
    changed = np.mean([(np.abs(clip[t].astype(int) - clip[t - 1]).max(-1) > 8).mean() for t in held])
    assert 0.001 < changed < 0.5


def test_cartoons_are_written_after_the_photographs(tmp_path):
    paths = write_clean_sources(tmp_path, n_frames=2, size=(32, 48), photos=(), clips=(), cartoons=2)
    assert [p.name for p in paths] == ["cartoon_000.mkv", "cartoon_001.mkv"]
    first = np.stack([f.rgb for f in VideoReader(paths[0])])
    assert first.shape == (2, 32, 48, 3)

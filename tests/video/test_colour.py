import numpy as np
import pytest

from vrestore.video.colour import ColourInfo, planes_to_rgb, rgb_to_planes, rgb_to_yuv444, yuv444_to_rgb


@pytest.mark.parametrize("matrix", ["bt601", "bt709", "bt2020"])
@pytest.mark.parametrize("full", [False, True])
def test_matrix_inverse(matrix, full):
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    back = yuv444_to_rgb(rgb_to_yuv444(rgb, matrix, full), matrix, full)
    assert np.abs(back - rgb).max() < 1e-5


def test_known_values_bt709_limited():
    # White -> Y 235, C 128; pure red in BT.709 limited: Y = 16 + 219 * 0.2126.
    yuv = rgb_to_yuv444(np.array([[[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]], np.float32), "bt709", False)
    assert np.allclose(yuv[:, 0, 0], [235, 128, 128], atol=1e-3)
    assert yuv[0, 0, 1] == pytest.approx(16 + 219 * 0.2126, abs=1e-3)
    assert yuv[2, 0, 1] == pytest.approx(240, abs=1e-3)  # Cr of pure red is the maximum


@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
@pytest.mark.parametrize("full", [False, True])
def test_yuv420_round_trip_keeps_colours(matrix, full):
    colour = ColourInfo(matrix, full)
    # Flat colour patches (8x8 blocks) survive 4:2:0 up to rounding.
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    y, u, v = rgb_to_planes(img, colour, 8, (2, 2))
    back = planes_to_rgb(y, u, v, colour, 8)
    inner = (slice(None), slice(None))
    err = np.abs(back.astype(int) - img)[inner]
    interior = np.zeros(img.shape[:2], bool)
    for by in range(4):
        for bx in range(4):
            interior[by * 8 + 2: by * 8 + 6, bx * 8 + 2: bx * 8 + 6] = True
    assert err[interior].max() <= 2 if not full else err[interior].max() <= 1
    # No global colour shift on a natural-ish image.
    nat = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    back = planes_to_rgb(*rgb_to_planes(nat, colour, 8, (2, 2)), colour, 8)
    assert abs(back.astype(float).mean() - nat.astype(float).mean()) < 0.5


def test_ten_bit_planes_give_uint16():
    colour = ColourInfo("bt709", False)
    img = np.full((4, 4, 3), 40000, np.uint16)
    y, u, v = rgb_to_planes(img, colour, 10, (2, 2))
    assert y.dtype == np.uint16 and y.max() <= 1023
    back = planes_to_rgb(y, u, v, colour, 10)
    assert back.dtype == np.uint16
    assert np.abs(back.astype(int) - 40000).max() < 200


def test_untagged_streams_are_guessed_like_players():
    assert ColourInfo.from_tags(2, 0, 2, 2, 1080).matrix == "bt709"
    assert ColourInfo.from_tags(2, 0, 2, 2, 480).matrix == "bt601"
    assert ColourInfo.from_tags(1, 2, 1, 1, 480).full_range
    assert ColourInfo.from_tags(None, None, None, None, 480, "yuvj420p").full_range

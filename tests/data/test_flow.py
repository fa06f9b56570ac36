import math

import numpy as np
import pytest
import torch

from vrestore.data.flow import KnownFlowPairs, _rotation, affine_flow
from vrestore.data.sources import VALIDATION_PHOTOS
from vrestore.models.spynet import flow_warp

pytest.importorskip("skimage", reason="the photographs come with scikit-image")


def _mse(a: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean(1)[inside].mean())


def _inside(flow: torch.Tensor) -> torch.Tensor:
    """Pixels whose flow points inside the second frame (the others see zero padding)."""
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def test_affine_flow_of_a_shift_and_of_a_rotation():
    c, eye = np.array([100.0, 80.0]), _rotation(0.0)
    still = affine_flow(16, (c, 1.0, eye), (c, 1.0, eye))
    assert np.abs(still).max() == 0
    # the second camera looks 3 px right, 2 px down: content moves by (-3, -2) in it
    moved = affine_flow(16, (c, 2.0, eye), (c + 2.0 * np.array([3.0, 2.0]), 2.0, eye))
    np.testing.assert_allclose(moved[0], -3.0, atol=1e-12)
    np.testing.assert_allclose(moved[1], -2.0, atol=1e-12)
    # a pure rotation about the centre: zero flow at the centre pixel, |flow| = 2 r sin(a/2) elsewhere
    rot = affine_flow(17, (c, 1.0, eye), (c, 1.0, _rotation(0.1)))
    assert np.abs(rot[:, 8, 8]).max() < 1e-12
    np.testing.assert_allclose(np.hypot(*rot[:, 8, 16]), 2 * 8 * math.sin(0.05), rtol=1e-9)


def test_the_known_flow_aligns_the_second_view_onto_the_first():
    data = KnownFlowPairs(48, noise=0.0)
    frames, flow = data.sample(12, np.random.default_rng(3))
    assert frames.shape == (12, 2, 3, 48, 48) and flow.shape == (12, 2, 48, 48)
    better = 0
    for i in range(12):
        if float(flow[i].abs().max()) < 0.25:
            continue  # (almost) no motion: nothing to tell apart
        f, ref, supp = flow[i: i + 1], frames[i: i + 1, 0], frames[i: i + 1, 1]
        inside = _inside(f) & _inside(f + 0.5)
        exact = _mse(flow_warp(supp, f), ref, inside)
        off = _mse(flow_warp(supp, f + 0.5), ref, inside)
        none = _mse(supp, ref, inside)
        assert exact < off and exact < none, i
        better += 1
    assert better >= 6


def test_flow_pairs_are_seeded_and_leave_out_the_validation_photographs():
    a = KnownFlowPairs(32).sample(3, np.random.default_rng(0))
    b = KnownFlowPairs(32).sample(3, np.random.default_rng(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    from vrestore.data.sources import photo

    only_val = KnownFlowPairs(32, photos=VALIDATION_PHOTOS)
    default = KnownFlowPairs(32)
    val_sizes = {tuple(photo(n).shape[:2]) for n in VALIDATION_PHOTOS}
    assert len(default.levels) > len(only_val.levels)
    # no level of the default set is a validation photograph (compare the full-size images)
    full = [lev for lev in default.levels if tuple(lev.shape[1:]) in val_sizes]
    for n in VALIDATION_PHOTOS:
        img = torch.from_numpy(photo(n)).permute(2, 0, 1).float() / 255
        assert not any(torch.equal(img, lev) for lev in full), n

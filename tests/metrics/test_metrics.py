import numpy as np
import pytest

from vrestore import metrics

skm = pytest.importorskip("skimage.metrics")


def _pair(seed=0, shape=(48, 64, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    noise = rng.normal(0, 12, shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    return a, b


def test_psnr_matches_scikit_image():
    a, b = _pair()
    assert metrics.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert metrics.psnr(a, a) == float("inf")


def test_ssim_matches_scikit_image_rgb_and_y(small_frames):
    a = small_frames[0]
    b = np.clip(a.astype(int) + np.random.default_rng(1).normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    ref = skm.structural_similarity(a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
    assert metrics.ssim(a, b) == pytest.approx(ref, abs=1e-6)
    ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
    ref_y = skm.structural_similarity(ya, yb, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert metrics.ssim(a, b, y_channel=True) == pytest.approx(ref_y, abs=1e-6)


def test_y_is_basicsr_bt601():
    px = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0]]], np.uint8)
    assert metrics.rgb_to_y(px)[0].tolist() == pytest.approx([235.0, 16.0, 16 + 65.481])


def test_ntire_protocol_skips_identical_frames_and_subsamples():
    a, b = _pair()
    frames_a = [a] * 25
    frames_b = [a if i == 10 else b for i in range(25)]
    s = metrics.score_video(frames_a, frames_b, with_ssim=False)
    assert s.skipped == 1 and len(s.frames) == 24
    s10 = metrics.score_video(frames_a, frames_b, every=10, with_ssim=False)
    assert s10.frames == [0, 20] and s10.skipped == 1
    with pytest.raises(ValueError, match="frame counts differ"):
        metrics.score_video(frames_a, frames_b[:5], with_ssim=False)
    avg = metrics.average([s, s10])
    assert avg["psnr_rgb"] == pytest.approx(metrics.psnr(a, b))

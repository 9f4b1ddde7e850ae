"""PSNR / SSIM: scikit-image equality on RGB, the BasicSR Y convention, edge cases, torch-numpy agreement."""

import math

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from clearair.metrics import (
    METRIC_CONVENTIONS,
    convention,
    psnr,
    psnr_torch,
    rgb_to_y,
    rgb_to_y_torch,
    ssim,
    ssim_torch,
)


def _pair(seed: int, shape=(40, 52, 3), noise=0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    pred = np.clip(target + rng.normal(0, noise, shape), 0, 1)
    return pred, target


def _photo_pair() -> tuple[np.ndarray, np.ndarray]:
    """A real photograph and a noisy, quantised copy of it (uint8)."""
    clean = skdata.astronaut()[100:196, 150:262]  # (96, 112, 3) uint8
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 15, clean.shape), 0, 255).round().astype(np.uint8)
    return noisy, clean


def _to_batch(*imgs: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1) for i in imgs])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rgb_metrics_equal_skimage_on_random_pairs(seed):
    pred, target = _pair(seed)
    assert psnr(pred, target) == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=1.0), abs=1e-10)
    ref = structural_similarity(pred, target, channel_axis=-1, data_range=1.0)
    assert ssim(pred, target) == pytest.approx(ref, abs=1e-10)


def test_rgb_metrics_equal_skimage_on_a_photo_in_uint8_and_float():
    noisy, clean = _photo_pair()
    n, c = noisy / 255.0, clean / 255.0
    assert psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(c, n, data_range=1.0), abs=1e-10)
    assert ssim(noisy, clean) == pytest.approx(structural_similarity(n, c, channel_axis=-1, data_range=1.0), abs=1e-10)
    assert psnr(noisy, clean) == pytest.approx(psnr(n, c), abs=1e-10)


def test_psnr_of_a_known_pair_matches_closed_form_mse():
    target = np.full((16, 16, 3), 0.5)
    pred = target.copy()
    pred[::2] += 0.1  # half the pixels off by 0.1 -> MSE = 0.005
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-9)
    assert float(psnr_torch(_to_batch(pred), _to_batch(target))[0]) == pytest.approx(10 * math.log10(200), abs=1e-9)


def test_identical_images_give_inf_psnr_and_unit_ssim():
    img = _pair(3)[1]
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert ssim(img, img, y_channel=True) == pytest.approx(1.0, abs=1e-12)
    t = _to_batch(img)
    assert torch.isinf(psnr_torch(t, t)).all()
    assert torch.allclose(ssim_torch(t, t), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(ssim_torch(t, t, y_channel=True), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize(
    "rgb, expected",
    [
        ((1, 0, 0), (16 + 65.481) / 255),
        ((0, 1, 0), (16 + 128.553) / 255),
        ((0, 0, 1), (16 + 24.966) / 255),
        ((1, 1, 1), 235 / 255),
        ((0, 0, 0), 16 / 255),
    ],
)
def test_y_of_pure_colours_follows_bt601(rgb, expected):
    img = np.broadcast_to(np.asarray(rgb, dtype=np.float64), (4, 4, 3))
    assert np.allclose(rgb_to_y(img), expected, atol=1e-12)
    y_t = rgb_to_y_torch(_to_batch(img))
    assert y_t.shape == (1, 1, 4, 4)
    assert torch.allclose(y_t, torch.full_like(y_t, expected), atol=1e-12)


def test_y_psnr_is_rgb_psnr_of_the_luma_image():
    pred, target = _pair(4)
    y_p, y_t = rgb_to_y(pred), rgb_to_y(target)
    assert psnr(pred, target, y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(y_t, y_p, data_range=1.0), abs=1e-10
    )


def test_y_ssim_is_gaussian_population_ssim_of_the_luma_image():
    # BasicSR's SSIM = skimage's with an 11x11 sigma-1.5 Gaussian window and population covariance.
    noisy, clean = _photo_pair()
    ref = structural_similarity(
        rgb_to_y(noisy),
        rgb_to_y(clean),
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(noisy, clean, y_channel=True) == pytest.approx(ref, abs=1e-10)
    assert ssim(noisy, clean, y_channel=True) != pytest.approx(ssim(noisy, clean), abs=1e-4)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_torch_batch_agrees_with_numpy_per_image(y_channel, crop_border):
    pairs = [_pair(s, noise=0.05 * (s + 1)) for s in range(3)]
    preds, targets = _to_batch(*[p for p, _ in pairs]), _to_batch(*[t for _, t in pairs])
    p_t = psnr_torch(preds, targets, crop_border=crop_border, y_channel=y_channel)
    s_t = ssim_torch(preds.float(), targets.float(), crop_border=crop_border, y_channel=y_channel)
    assert p_t.shape == s_t.shape == (3,)
    for i, (p, t) in enumerate(pairs):
        assert float(p_t[i]) == pytest.approx(psnr(p, t, crop_border=crop_border, y_channel=y_channel), abs=1e-9)
        # the float32 copy differs from the float64 images by rounding only
        assert float(s_t[i]) == pytest.approx(ssim(p, t, crop_border=crop_border, y_channel=y_channel), abs=1e-6)


def test_torch_accepts_uint8_like_numpy():
    noisy, clean = _photo_pair()
    assert float(psnr_torch(_to_batch(noisy), _to_batch(clean))[0]) == pytest.approx(psnr(noisy, clean), abs=1e-9)
    assert float(ssim_torch(_to_batch(noisy), _to_batch(clean))[0]) == pytest.approx(ssim(noisy, clean), abs=1e-9)


def test_crop_border_ignores_the_border():
    pred, target = _pair(5)
    pred[:3] = 1 - target[:3]  # damage only a 3-pixel strip
    assert psnr(pred, target, crop_border=3) > psnr(pred, target) + 3


def test_bad_inputs_are_refused():
    pred, target = _pair(6)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(pred, target[:-1])
    with pytest.raises(ValueError, match="at least"):
        ssim(pred[:5, :5], target[:5, :5])
    with pytest.raises(TypeError):
        psnr(pred.astype(np.int32), target.astype(np.int32))


def test_every_convention_is_named():
    assert {convention(False), convention(True)} == {"rgb", "y"}
    for name in ("rgb", "y"):
        for metric in ("psnr", "ssim"):
            assert METRIC_CONVENTIONS[f"{metric}_{name}"]

"""Physical and statistical checks of every degradation model, and of the public degrade/apply_steps API."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from synth.degradations import (  # noqa: E402
    DEGRADATIONS,
    PHYSICAL_ORDER,
    SEVERITIES,
    Context,
    apply_steps,
    degrade,
    to_float,
    to_uint8,
)
from synth.degradations.base import srgb_to_linear, standard_normal  # noqa: E402

NAMES = sorted(DEGRADATIONS)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph (scikit-image's astronaut), 96x96 uint8 RGB."""
    return cv2.resize(data.astronaut(), (96, 96), interpolation=cv2.INTER_AREA)


def flat(value: int, size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def high_frequency_energy(img: np.ndarray) -> float:
    return float(np.mean(cv2.Laplacian(img.astype(np.float32), cv2.CV_32F) ** 2))


def linear_mean(img: np.ndarray) -> float:
    return float(srgb_to_linear(to_float(img)).mean())


# ---- every degradation ---------------------------------------------------------------------------------------


def test_registry_and_physical_order_agree():
    assert sorted(PHYSICAL_ORDER) == NAMES and len(set(PHYSICAL_ORDER)) == len(PHYSICAL_ORDER)
    assert PHYSICAL_ORDER[-1] == "jpeg" and PHYSICAL_ORDER[0] == "haze"
    for name, degradation in DEGRADATIONS.items():
        assert degradation.name == name
        assert set(degradation.params) == set(SEVERITIES)
        assert all(set(degradation.params[s]) == set(degradation.param_names) for s in SEVERITIES)


@pytest.mark.parametrize("name", NAMES)
def test_every_severity_on_odd_sizes_is_valid_and_json(name):
    img = cv2.resize(data.chelsea(), (53, 37), interpolation=cv2.INTER_AREA)  # (37, 53, 3)
    for severity in SEVERITIES:
        out, params = degrade(img, name, seed=3, severity=severity)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert params["severity"] == severity and set(DEGRADATIONS[name].param_names) <= set(params)
        assert json.loads(json.dumps(params)) == params
    small = img[:16, :16].copy()
    assert degrade(small, name, seed=0)[0].shape == (16, 16, 3)


@pytest.mark.parametrize("name", NAMES)
def test_seed_determines_output_and_params_replay_it(name, photo):
    a, params = degrade(photo, name, seed=11, severity="heavy")
    b, _ = degrade(photo, name, seed=11, severity="heavy")
    c, _ = degrade(photo, name, seed=12, severity="heavy")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, photo)
    replayed, again = degrade(photo, name, 11, **params)
    assert np.array_equal(replayed, a) and again == params


@pytest.mark.parametrize("name", NAMES)
def test_sample_rejects_unknown_fixed_keys(name):
    degradation = DEGRADATIONS[name]
    with pytest.raises(ValueError, match="not_a_param") as err:
        degradation.sample(np.random.default_rng(0), "medium", {"not_a_param": 1.0})
    assert degradation.param_names[0] in str(err.value)
    with pytest.raises(ValueError, match="severity"):
        degradation.sample(np.random.default_rng(0), "extreme", {})


def test_fixed_values_are_checked_and_do_not_shift_other_draws():
    noise = DEGRADATIONS["gaussian_noise"]
    with pytest.raises(ValueError, match="mode"):
        noise.sample(np.random.default_rng(0), "light", {"mode": "salt"})
    with pytest.raises(ValueError, match="quality"):
        DEGRADATIONS["jpeg"].sample(np.random.default_rng(0), "light", {"quality": 50.5})
    with pytest.raises(ValueError, match="sigma"):
        noise.sample(np.random.default_rng(0), "light", {"sigma": -3})
    haze = DEGRADATIONS["haze"]
    free = haze.sample(np.random.default_rng(5), "medium", {})
    pinned = haze.sample(np.random.default_rng(5), "medium", {"beta": 0.1})
    assert pinned["beta"] == 0.1 and pinned["A"] == free["A"]


def test_severities_are_ordered_and_mostly_disjoint(photo):
    """Heavier severities degrade more: noise std grows, blur removes more detail, light falls, quality drops."""
    grey = flat(128, 64)

    def mean_over_seeds(name, severity, measure, img):
        return np.mean([measure(degrade(img, name, s, severity)[0], img) for s in range(6)])

    measures = {
        "gaussian_noise": (lambda lq, gt: np.std(lq.astype(float) - gt), grey, 1),
        "poisson_noise": (lambda lq, gt: np.std(lq.astype(float) - gt), grey, 1),
        "motion_blur": (lambda lq, gt: -high_frequency_energy(lq), photo, 1),
        "defocus_blur": (lambda lq, gt: -high_frequency_energy(lq), photo, 1),
        "gaussian_blur": (lambda lq, gt: -high_frequency_energy(lq), photo, 1),
        "low_light": (lambda lq, gt: -linear_mean(lq), photo, 1),
        "haze": (lambda lq, gt: -np.std(lq.astype(float)), photo, 1),
        "jpeg": (lambda lq, gt: np.abs(lq.astype(float) - gt).mean(), photo, 1),
        "rain": (lambda lq, gt: lq.astype(float).mean(), photo, 1),
        "snow": (lambda lq, gt: lq.astype(float).mean(), photo, 1),
    }
    assert set(measures) == set(NAMES)
    for name, (measure, img, _) in measures.items():
        levels = [mean_over_seeds(name, s, measure, img) for s in SEVERITIES]
        assert levels[0] < levels[1] < levels[2], (name, levels)


# ---- noise ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_sigma_matches_drawn_sigma(severity):
    gt = flat(128, 192)
    lq, params = degrade(gt, "gaussian_noise", seed=1, severity=severity)
    measured = np.std(lq.astype(np.float64) - gt)
    expected = np.sqrt(params["sigma"] ** 2 + 1 / 12)  # plus the uniform rounding error of uint8
    assert abs(measured / expected - 1) < 0.05, (measured, params)
    assert abs(np.mean(lq.astype(np.float64) - gt)) < 0.05 * params["sigma"]


def test_gray_noise_is_shared_across_channels():
    lq, _ = degrade(flat(128, 64), "gaussian_noise", seed=2, gray=1)
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])
    colour, _ = degrade(flat(128, 64), "gaussian_noise", seed=2)
    assert not np.array_equal(colour[..., 0], colour[..., 1])


@pytest.mark.parametrize("sigma", [15, 25, 50])
def test_promptir_mode_floors_clipped_noise_on_uint8(sigma, photo):
    """The PromptIR model: floor(clip(x + n * sigma, 0, 255)), recomputed from the same noise draw."""
    seed = 21
    lq, params = degrade(photo, "gaussian_noise", seed, mode="promptir", sigma=sigma)
    assert params["mode"] == "promptir" and params["sigma"] == sigma
    rng = np.random.default_rng(seed)
    DEGRADATIONS["gaussian_noise"].sample(rng, "medium", {"mode": "promptir", "sigma": sigma})
    n = standard_normal(rng, photo.shape)
    noisy = photo.astype(np.float64) + n.astype(np.float64) * sigma
    assert np.array_equal(lq, np.floor(np.clip(noisy, 0, 255)).astype(np.uint8))
    rounded = np.rint(np.clip(noisy, 0, 255)).astype(np.uint8)
    assert not np.array_equal(lq, rounded)


def test_standard_normal_is_standard():
    z = standard_normal(np.random.default_rng(0), (400, 500))
    assert z.dtype == np.float32 and z.shape == (400, 500)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003  # the tails are Gaussian, too


def test_poisson_noise_variance_is_mean_over_photon_count():
    """Shot noise in linear light: Var(y) = x / peak for a flat patch of linear intensity x."""
    for value, peak in [(128, 50.0), (200, 200.0), (40, 20.0)]:
        gt = flat(value, 192)
        lq, params = degrade(gt, "poisson_noise", seed=4, peak=peak)
        x = srgb_to_linear(to_float(gt)).astype(np.float64)
        y = srgb_to_linear(to_float(lq)).astype(np.float64)
        assert abs(y.var() / (x.mean() / peak) - 1) < 0.08, (value, peak, y.var(), x.mean() / peak)
        assert abs(y.mean() / x.mean() - 1) < 0.03


# ---- haze -----------------------------------------------------------------------------------------------------


def test_haze_contrast_falls_with_beta_and_airlight(photo):
    depth = np.tile(np.linspace(1.0, 10.0, photo.shape[1], dtype=np.float32), (photo.shape[0], 1))
    stds = [degrade(photo, "haze", 0, depth=depth, beta=b, A=0.9)[0].std() for b in (0.2, 0.6, 1.2, 2.0, 3.0)]
    assert all(a > b for a, b in zip(stds, stds[1:], strict=False)), stds
    uniform = np.ones(photo.shape[:2], np.float32)
    hazy = [degrade(photo, "haze", 0, depth=uniform, beta=1.0, A=a)[0].astype(float) for a in (0.6, 0.8, 1.0)]
    contrast = [h.std() / h.mean() for h in hazy]
    assert contrast[0] > contrast[1] > contrast[2], contrast
    assert hazy[0].mean() < hazy[1].mean() < hazy[2].mean()


def test_haze_follows_given_depth_and_records_its_source(photo):
    depth = np.ones(photo.shape[:2], np.float32)
    depth[:, 48:] = 20.0  # right half far
    lq, params = degrade(photo, "haze", 1, depth=depth, beta=2.0, A=0.95)
    assert params["depth_source"] == "given"
    distance_to_air = np.abs(lq.astype(float) / 255 - 0.95)
    assert distance_to_air[:, 56:].mean() < 0.5 * distance_to_air[:, :40].mean()
    _, fallback = degrade(photo, "haze", 1)
    assert fallback["depth_source"] == "fallback"
    with pytest.raises(ValueError, match="shape"):
        degrade(photo, "haze", 1, depth=depth[:10])


def test_haze_fallback_depth_makes_the_top_hazier():
    sky_and_ground = cv2.resize(data.chelsea(), (96, 96))
    lq, _ = degrade(sky_and_ground, "haze", 2, beta=2.5, A=1.0)
    whiteness = 1.0 - lq.astype(float) / 255
    assert whiteness[:24].mean() < whiteness[-24:].mean()


# ---- low light ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.5, 0.2, 0.08])
def test_low_light_scales_linear_mean_as_configured(scale, photo):
    lq, params = degrade(photo, "low_light", 9, severity="light", scale=scale, gamma=1.0)
    ratio = linear_mean(lq) / linear_mean(photo)
    assert abs(ratio / params["scale"] - 1) < 0.1, (ratio, params)


def test_low_light_gamma_darkens_shadows_more(photo):
    lq, _ = degrade(photo, "low_light", 9, scale=0.5, gamma=1.8, peak=1e6, read=0.0)
    x, y = srgb_to_linear(to_float(photo)), srgb_to_linear(to_float(lq))
    dark, bright = x < np.quantile(x, 0.25), x > np.quantile(x, 0.75)
    assert (y[dark] / np.maximum(x[dark], 1e-4)).mean() < (y[bright] / x[bright]).mean()


# ---- JPEG -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_quality_in_params_is_the_real_quality(severity, photo):
    lq, params = degrade(photo, "jpeg", 5, severity=severity)
    q = params["quality"]
    assert isinstance(q, int) and 10 <= q <= 95

    def pil_roundtrip(quality: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    assert np.array_equal(lq, pil_roundtrip(q))
    assert not np.array_equal(lq, pil_roundtrip(q + 5 if q < 90 else q - 5))


# ---- blur -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["motion_blur", "defocus_blur", "gaussian_blur"])
@pytest.mark.parametrize("severity", SEVERITIES)
def test_blur_removes_detail_and_keeps_mean(name, severity, photo):
    lq, _ = degrade(photo, name, 6, severity=severity)
    assert high_frequency_energy(lq) < 0.6 * high_frequency_energy(photo)
    assert abs(lq.astype(float).mean() - photo.astype(float).mean()) < 1.5


def test_anisotropic_gaussian_blur_follows_its_axes():
    dots = np.zeros((64, 64, 3), np.uint8)
    dots[32, 32] = 255
    lq, params = degrade(dots, "gaussian_blur", 0, sigma_x=4.0, sigma_y=1.0, theta=0.0)
    assert params["isotropic"] == 0
    spot = lq[..., 0].astype(float)
    assert spot[32, 24:41].sum() > 2 * spot[24:41, 32].sum()  # spread along x, not y


def test_large_and_small_kernels_agree_on_a_constant_image():
    """The direct and the FFT convolution paths both keep a flat image flat (kernels sum to 1, borders reflect)."""
    grey = flat(90, 40)
    for name, fixed in [("defocus_blur", {"radius": 1.5}), ("defocus_blur", {"radius": 7.5}), ("motion_blur", {})]:
        lq, _ = degrade(grey, name, 0, severity="heavy", **fixed)
        assert np.abs(lq.astype(int) - 90).max() <= 1


# ---- weather --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rain", "snow"])
@pytest.mark.parametrize("severity", SEVERITIES)
def test_weather_only_adds_light(name, severity, photo):
    lq, _ = degrade(photo, name, 8, severity=severity)
    assert lq.shape == photo.shape
    assert lq.astype(float).mean() > photo.astype(float).mean() + 0.5
    assert (lq.astype(int) >= photo.astype(int) - 1).mean() > 0.99  # screen blends never darken


def test_light_rain_streaks_follow_the_angle():
    black = np.zeros((128, 128, 3), np.uint8)
    vertical, _ = degrade(black, "rain", 3, severity="light", angle=0.0, density=0.003)
    streaks = vertical[..., 0].astype(float)
    along, across = np.abs(np.diff(streaks, axis=0)).sum(), np.abs(np.diff(streaks, axis=1)).sum()
    assert along < 0.5 * across
    slanted, _ = degrade(black, "rain", 3, severity="light", angle=30.0, density=0.003)
    assert not np.array_equal(slanted, vertical)


def test_heavy_rain_has_more_layers_than_light():
    light = DEGRADATIONS["rain"].params["light"]["layers"]
    heavy = DEGRADATIONS["rain"].params["heavy"]["layers"]
    assert light == (1, 1) and heavy[0] >= 2


# ---- composites -----------------------------------------------------------------------------------------------


def test_apply_steps_applies_in_order_and_records_everything(photo):
    steps = [
        {"degradation": "haze", "severity": "light", "params": {"beta": 0.5}},
        {"degradation": "gaussian_noise", "severity": "heavy", "params": {}},
        {"degradation": "jpeg", "severity": "medium", "params": {"quality": 30}},
    ]
    out, records = apply_steps(photo, steps, np.random.default_rng(4), Context())
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert [r["degradation"] for r in records] == ["haze", "gaussian_noise", "jpeg"]
    assert [r["severity"] for r in records] == ["light", "heavy", "medium"]
    assert records[0]["params"]["beta"] == 0.5 and records[2]["params"]["quality"] == 30
    assert json.loads(json.dumps(records)) == records
    again, _ = apply_steps(photo, steps, np.random.default_rng(4), Context())
    assert np.array_equal(out, again)
    # JPEG last: the output is exactly a JPEG decode at the recorded quality
    buffer = io.BytesIO()
    Image.fromarray(out).save(buffer, format="JPEG", quality=30)
    assert np.abs(np.asarray(Image.open(buffer)).astype(int) - out).mean() < 2.0
    with pytest.raises(ValueError, match="valid"):
        apply_steps(
            photo, [{"degradation": "fog", "severity": "light", "params": {}}], np.random.default_rng(0), Context()
        )


def test_public_api_rejects_bad_images(photo):
    with pytest.raises(ValueError, match="uint8"):
        degrade(photo.astype(np.float32), "haze", 0)
    with pytest.raises(ValueError, match="uint8"):
        degrade(photo[..., 0], "haze", 0)


def test_float_uint8_round_trip_is_exact():
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(to_uint8(to_float(every)), every)
    assert to_uint8(np.array([[[-0.5, 0.2 / 255, 2.0]]], np.float32)).tolist() == [[[0, 0, 255]]]

"""Whole-image and tiled restoration: sizes, padding, tiled == whole image, memory budget; image file helpers."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clearair.inference import (
    blend_window,
    estimate_memory_mb,
    pad_to_multiple,
    restore_image,
    save_image,
    tile_starts,
    to_numpy,
    to_tensor,
)
from clearair.models.factory import build_model
from synth.imageio import load_rgb

# Tiled Restormer output differs from the whole-image pass: MDTA normalises q and k over each tile, and the U-Net's
# receptive field is wider than the blending margin. On the tiny random-init model and a uniform-noise image of
# 64x112 the max |tiled - whole| measured 2.0e-2 (tile 48, overlap 16), 4.8e-3 (64, 32), 2.5e-3 (96, 32), against
# a residual (|out - lq|) of up to 0.5. Natural photos differ more (up to ~0.2 on a random-init net).
RESTORMER_TILE_ATOL = 3e-2


class ConvNet(nn.Module):
    """Translation-equivariant: three 3x3 convs (receptive radius 3), zero padding, residual. Needs multiples of 8."""

    size_multiple = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(8, 3, 3, padding=1)
        self.seen: list[tuple[int, int]] = []

    def forward(self, lq: torch.Tensor, priors: dict | None = None) -> torch.Tensor:
        assert lq.shape[-2] % 8 == 0 and lq.shape[-1] % 8 == 0, "input not padded to the size multiple"
        self.seen.append(tuple(lq.shape[-2:]))
        shift = priors["shift"] if priors else 0.0
        return lq + 0.1 * self.out(self.body(lq)) + shift


def _image(h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def restormer() -> nn.Module:
    torch.manual_seed(0)
    return build_model("restormer", preset="tiny").eval()


@pytest.mark.parametrize("h, w", [(37, 71), (64, 64), (5, 9)])
def test_output_has_the_input_size(h, w):
    out = restore_image(ConvNet(), _image(h, w, b=2))
    assert out.shape == (2, 3, h, w)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1


def test_pad_to_multiple_reflects_and_keeps_the_original():
    x = _image(37, 71)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (40, 72)
    assert torch.equal(p[..., :37, :71], x)
    assert torch.equal(p[..., 37, :71], x[..., 35, :])  # reflection, edge row not repeated
    assert pad_to_multiple(_image(2, 3), 16).shape[-2:] == (16, 16)  # more padding than the side


def test_tiled_equals_whole_image_for_a_conv_net():
    net, x = ConvNet(), _image(150, 221)
    whole = restore_image(net, x, clamp=False)
    tiled = restore_image(net, x, tile=64, overlap=32, clamp=False)
    assert torch.allclose(tiled, whole, atol=1e-5), (tiled - whole).abs().max()


def test_tiled_matches_whole_image_for_tiny_restormer(restormer):
    x = _image(64, 112, seed=1)
    whole = restore_image(restormer, x, clamp=False)
    diffs = {}
    # tiles smaller than the image on both sides, then larger than it on one side (height 64 < 96)
    for tile, overlap in [(48, 16), (64, 32), (96, 32)]:
        tiled = restore_image(restormer, x, tile=tile, overlap=overlap, clamp=False)
        assert tiled.shape == x.shape
        diffs[tile] = (tiled - whole).abs().max().item()
        logging.getLogger(__name__).info("tiny Restormer tile %d: max |tiled - whole| = %.2e", tile, diffs[tile])
    assert max(diffs.values()) < RESTORMER_TILE_ATOL
    assert diffs[96] < diffs[48]  # larger tiles come closer to the whole-image result


def test_tile_larger_than_image_is_one_whole_pass():
    net, x = ConvNet(), _image(37, 41)
    out = restore_image(net, x, tile=256)
    assert net.seen == [(40, 48)]
    assert torch.allclose(out, restore_image(ConvNet(), x), atol=1e-6)


def test_tiles_cover_with_the_requested_overlap():
    starts = tile_starts(200, 64, 16)
    assert starts[0] == 0 and starts[-1] == 200 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(starts, starts[1:], strict=False))
    assert tile_starts(50, 64, 16) == [0]


def test_blend_window_is_flat_at_image_borders_and_ramps_between_tiles():
    win = blend_window(64, 64, 32, (False, True, False, True))  # tile at the top-left corner
    assert win[:32, :32].eq(1).all()
    assert win[-8:].eq(0).all() and win[:, -8:].eq(0).all()  # margin next to the neighbouring tiles
    assert (win[:, :56].diff(dim=1) <= 0).all()


def test_priors_are_computed_per_tile():
    net, x = ConvNet(), _image(96, 96)
    calls = []

    def priors_fn(t: torch.Tensor) -> dict:
        calls.append(tuple(t.shape[-2:]))
        return {"shift": torch.zeros(())}

    restore_image(net, x, priors_fn=priors_fn, tile=48, overlap=16)
    assert calls == net.seen and calls and all(c == (48, 48) for c in calls)


def test_memory_budget_triggers_tiling():
    net, x = ConvNet(), _image(160, 160)
    need = estimate_memory_mb(net, 1, 160, 160, torch.device("cpu"))
    restore_image(net, x, memory_budget_mb=need * 2)
    assert net.seen == [(160, 160)]
    net.seen.clear()
    out = restore_image(net, x, memory_budget_mb=need / 8)
    assert len(net.seen) > 1 and max(max(s) for s in net.seen) < 160
    assert torch.allclose(out, restore_image(ConvNet(), x), atol=1e-5)


def test_bfloat16_autocast_and_channels_last_stay_close(restormer):
    x = _image(32, 40)
    ref = restore_image(restormer, x)
    out = restore_image(restormer, x, dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.1


def test_bad_tile_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        restore_image(ConvNet(), _image(64, 64), tile=50)


def test_saved_images_read_back_as_written_and_exif_orientation_applies(tmp_path):
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    save_image(tmp_path / "a.png", arr)
    assert np.array_equal(load_rgb(tmp_path / "a.png")[0], arr)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.png", exif=exif)
    img, notes = load_rgb(tmp_path / "r.png")
    assert img.shape == (30, 20, 3) and any("EXIF" in n for n in notes)


def test_every_mode_reads_as_8_bit_rgb(tmp_path):
    Image.fromarray(np.full((4, 5), 128, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / "d.png")
    Image.fromarray(np.full((4, 5), 0.5, np.float32), "F").save(tmp_path / "f.tif")  # float TIFF in [0, 1]
    for name, value in [("g.png", 128), ("d.png", 255), ("f.tif", 128)]:
        img, _ = load_rgb(tmp_path / name)
        assert img.shape == (4, 5, 3) and img.dtype == np.uint8 and (img == value).all(), name


def test_tensor_numpy_round_trip():
    arr = (np.random.default_rng(1).random((7, 9, 3)) * 255).astype(np.uint8)
    t = to_tensor(arr)
    assert t.shape == (3, 7, 9) and t.dtype == torch.float32 and t.max() <= 1
    assert np.array_equal(to_numpy(t), arr)
    assert np.array_equal(to_numpy(restore_image(nn.Identity(), t[None])), arr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_budget_with_the_image_in_host_memory(restormer):
    net, x = ConvNet().cuda(), _image(256, 256)  # the image stays on the CPU, tiles travel
    need = estimate_memory_mb(net, 1, 256, 256, torch.device("cuda"))  # probes once, then cached
    assert need > 0
    net.seen.clear()
    out = restore_image(net, x, memory_budget_mb=need / 4)
    assert out.device == x.device and len(net.seen) > 1
    assert torch.allclose(out, restore_image(net, x.cuda()).cpu(), atol=1e-3)
    gpu_restormer = build_model("restormer", preset="tiny").cuda()
    gpu_restormer.load_state_dict(restormer.state_dict())
    out = restore_image(gpu_restormer, x[..., :72, :104], tile=48, overlap=16, dtype=torch.bfloat16)
    ref = restore_image(restormer, x[..., :72, :104], tile=48, overlap=16)
    assert (out - ref).abs().max() < 0.1

"""The evaluation protocol: metrics on the float output (or rounded, by name), whole images within the memory
budget and tiles beyond it (counted), PromptIR's mod-crop, and the papers' Average row over benchmarks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clearair.export import export_model
from clearair.metrics import mod_crop, psnr, ssim
from clearair.models.factory import build_model
from clearair.restorer import load_restorer
from tests.conftest import textured
from workflows.config import EvaluateConfig
from workflows.evaluation import AVERAGE, Protocol, evaluate_model, protocol_for, summarise, write_tables

SIZES = {"a": (37, 45), "b": (50, 34)}  # neither a multiple of 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_model(build_model("restormer", preset="tiny"), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A benchmark folder in the input/target layout: textured targets, noisy inputs."""
    root = tmp_path_factory.mktemp("bench")
    for sub in ("input", "target"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        gt = textured(h, w, seed=i)
        lq = np.clip(gt + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
        Image.fromarray(gt).save(root / "target" / f"{name}.png")
        Image.fromarray(lq).save(root / "input" / f"{name}.png")
    return root


def _rows(model_dir: Path, bench: Path, protocol: Protocol) -> dict[str, dict]:
    results = evaluate_model(model_dir, {}, [{"name": "b1", "path": str(bench)}], protocol, None, seed=0)
    return {r["key"]: r for r in results["rows"]}


@pytest.mark.parametrize("round_uint8", [False, True])
def test_reported_metrics_are_the_metrics_of_the_float_or_the_rounded_output(model_dir, bench, round_uint8):
    rows = _rows(model_dir, bench, Protocol(tile=None, round_uint8=round_uint8))
    restorer = load_restorer(model_dir, device="cpu", precision="fp32")
    for name in SIZES:
        lq = np.asarray(Image.open(bench / "input" / f"{name}.png"))
        gt = np.asarray(Image.open(bench / "target" / f"{name}.png"))
        out = restorer.restore(lq.astype(np.float32) / 255.0)
        out = np.round(out * 255.0).astype(np.uint8) if round_uint8 else out
        assert rows[name]["psnr_rgb"] == pytest.approx(psnr(out, gt), abs=1e-6)
        assert rows[name]["ssim_rgb"] == pytest.approx(ssim(out, gt), abs=1e-6)
        assert rows[name]["psnr_y"] == pytest.approx(psnr(out, gt, y_channel=True), abs=1e-6)
    float_rows = _rows(model_dir, bench, Protocol(tile=None))
    assert (rows["a"]["psnr_rgb"] != float_rows["a"]["psnr_rgb"]) == round_uint8  # rounding is a real difference


def test_images_are_whole_within_the_budget_and_tiled_beyond_it(model_dir, bench):
    whole = _rows(model_dir, bench, Protocol(tile=16, overlap=4, memory_budget_mb=1e6))
    assert not any(r["tiled"] for r in whole.values())
    assert _rows(model_dir, bench, Protocol(tile=None))["a"]["psnr_rgb"] == whole["a"]["psnr_rgb"]
    tiled = _rows(model_dir, bench, Protocol(tile=16, overlap=4, memory_budget_mb=1e-3))
    assert all(r["tiled"] for r in tiled.values())
    assert tiled["a"]["psnr_rgb"] != whole["a"]["psnr_rgb"]  # tiles of 16 really ran
    summary = summarise(list(tiled.values()))
    assert summary[0]["tiled"] == 2 and summary[0]["images"] == 2


def test_promptir_protocol_crops_input_and_target_to_multiples_of_16(model_dir, bench):
    cfg = EvaluateConfig(protocol="promptir", benchmarks=[{"name": "b1", "path": str(bench)}])
    protocol = protocol_for(cfg)
    assert protocol.mod_crop == 16 and not protocol.round_uint8 and protocol.memory_budget_mb is not None
    results = evaluate_model(model_dir, {}, [b.model_dump() for b in cfg.benchmarks], protocol, None, seed=0)
    ((lq, out, gt),) = results["examples"].values()
    assert lq.shape == out.shape == gt.shape and lq.shape[0] % 16 == 0 and lq.shape[1] % 16 == 0
    assert "multiples of 16" in results["protocol"]


def test_mod_crop_keeps_the_centre_with_the_odd_pixel_after():
    img = np.arange(37 * 45).reshape(37, 45)
    out = mod_crop(img, 16)
    assert out.shape == (32, 32)
    assert out[0, 0] == img[2, 6] and out[-1, -1] == img[33, 37]  # 5 rows cut as 2 + 3, 13 columns as 6 + 7
    assert mod_crop(img[:32, :32], 16).shape == (32, 32)
    with pytest.raises(ValueError, match="smaller than"):
        mod_crop(img[:10], 16)


def _row(set_name: str, task: str, value: float, kind: str = "benchmark") -> dict:
    metrics = {m: value for m in ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")}
    return {"set": set_name, "kind": kind, "task": task, "key": "k", "tiled": False, **metrics,
            **{f"input_{m}": 1.0 for m in metrics}}  # fmt: skip


def test_average_row_is_the_unweighted_mean_over_benchmark_rows(tmp_path: Path):
    rows = [
        _row("CBSD68-sigma25", "denoise_25", 30.0),
        _row("Rain100L", "derain", 36.0),
        _row("Rain100L", "derain", 38.0),
    ]
    rows += [_row("synthetic-test", "dehaze", 10.0, kind="synthetic")]  # not a benchmark: not in the average
    summary = summarise(rows)
    average = next(r for r in summary if (r["set"], r["task"]) == AVERAGE)
    assert average["psnr_rgb"] == pytest.approx((30.0 + 37.0) / 2) and average["images"] == 3
    assert not any((r["set"], r["task"]) == AVERAGE for r in summarise(rows[:1] + rows[-1:]))  # one benchmark: none
    md, _, _ = write_tables({"summary": summary, "protocol": "whole images"}, tmp_path)
    assert "| average | benchmarks | 3 | 0 |" in md.read_text() and "Protocol: whole images." in md.read_text()


def test_the_per_image_table_holds_one_row_per_image_with_its_scores(model_dir, bench, tmp_path):
    import csv

    results = evaluate_model(model_dir, {}, [{"name": "b1", "path": str(bench)}], Protocol(tile=None), None, seed=0)
    _, _, images = write_tables(results, tmp_path)
    with open(images) as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(SIZES)
    for row in results["rows"]:
        assert float(rows[row["key"]]["psnr_rgb"]) == pytest.approx(row["psnr_rgb"], abs=1e-9)
        assert float(rows[row["key"]]["input_psnr_rgb"]) == pytest.approx(row["input_psnr_rgb"], abs=1e-9)
        assert rows[row["key"]]["set"] == "b1" and rows[row["key"]]["kind"] == "benchmark"

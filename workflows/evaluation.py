"""Evaluating an exported restorer on synthetic shards and on benchmark folders; tables and a figure."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")


class BenchmarkError(ValueError):
    """A benchmark folder that is missing or in no layout we know; raised before any work."""


def benchmark_items(bench: dict[str, Any]) -> list:
    """Source items of a benchmark folder: pairs, or clean images when ``noise_sigma`` is set."""
    from synth.config import SourceSpec
    from synth.sources import discover_folder

    skipped: list[dict] = []
    try:
        items = discover_folder(SourceSpec(path=bench["path"], layout=bench.get("layout", "auto")), skipped)
    except FileNotFoundError as err:
        raise BenchmarkError(f"benchmark {bench['name']}: {err}") from None
    pairs = [i for i in items if i.lq is not None]
    clean = [i for i in items if i.lq is None]
    if bench.get("noise_sigma") and clean:
        return clean
    if not pairs:
        raise BenchmarkError(
            f"benchmark {bench['name']}: no input/target pairs found in {bench['path']} (known "
            f"layouts: Rain100L, SOTS, GoPro, LOL, Snow100K, input/target; set noise_sigma for "
            f"clean images such as CBSD68)"
        )
    return pairs


def _benchmark_pairs(bench: dict[str, Any], seed: int) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    from synth.degradations import degrade
    from synth.imageio import load_rgb

    for item in benchmark_items(bench):
        gt, _ = load_rgb(item.gt)
        if item.lq is None:
            noise_seed = int(hashlib.sha256(f"{seed}:{item.gt_hash}".encode()).hexdigest()[:8], 16)
            lq, _ = degrade(gt, "gaussian_noise", seed=noise_seed, mode="promptir", sigma=bench["noise_sigma"])
            task = f"denoise_{bench['noise_sigma']}"
        else:
            lq, _ = load_rgb(item.lq)
            task = item.task or bench["name"]
        yield Path(item.lq or item.gt).stem, task, lq, gt


def _shard_pairs(urls: list[str]) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    from synth.read import iter_shard

    for url in urls:
        for s in iter_shard(url):
            yield s["key"], s["meta"]["task"], s["lq"], s["gt"]


def _scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    from clearair.metrics import psnr, ssim

    return {
        "psnr_rgb": psnr(pred, gt),
        "ssim_rgb": ssim(pred, gt),
        "psnr_y": psnr(pred, gt, y_channel=True),
        "ssim_y": ssim(pred, gt, y_channel=True),
    }


def evaluate_model(
    model_dir: Path,
    sets: dict[str, list[str]],
    benchmarks: list[dict[str, Any]],
    tile: int | None,
    overlap: int,
    max_images: int | None,
    seed: int,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Per-image rows, per-(set, task) summaries with the input's scores beside, flat metrics, example images;
    ``progress``: a bar per set on stderr."""
    from tqdm import tqdm

    from clearair.restorer import load_restorer

    restorer = load_restorer(model_dir, device=device, precision="fp32")  # metrics in float32 on any device
    sources = {name: _shard_pairs(urls) for name, urls in sets.items()}
    sources |= {b["name"]: _benchmark_pairs(b, seed) for b in benchmarks}
    rows, examples = [], {}
    for set_name, pairs in sources.items():
        bar = tqdm(pairs, desc=f"evaluate {set_name}", unit="image", total=max_images, disable=not progress)
        for n, (key, task, lq, gt) in enumerate(bar):
            if max_images is not None and n >= max_images:
                break
            out = restorer.restore(lq, tile=tile, overlap=overlap)
            rows.append(
                {
                    "set": set_name,
                    "task": task,
                    "key": key,
                    **_scores(out, gt),
                    **{f"input_{k}": v for k, v in _scores(lq, gt).items()},
                }
            )
            examples.setdefault(f"{set_name}/{task}", (lq, out, gt))
    summary = summarise(rows)
    return {"rows": rows, "summary": summary, "metrics": flat_metrics(summary), "examples": examples}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["set"], r["task"])].append(r)
    out = []
    for (set_name, task), rs in sorted(groups.items()):
        row = {"set": set_name, "task": task, "images": len(rs)}
        for m in METRICS:
            row[m] = float(np.mean([r[m] for r in rs]))
            row[f"input_{m}"] = float(np.mean([r[f"input_{m}"] for r in rs]))
        out.append(row)
    for set_name in sorted({r["set"] for r in out}):
        part = [r for r in out if r["set"] == set_name and r["task"] != "macro"]
        macro = {"set": set_name, "task": "macro", "images": sum(r["images"] for r in part)}
        for m in METRICS:
            macro[m] = float(np.mean([r[m] for r in part]))
            macro[f"input_{m}"] = float(np.mean([r[f"input_{m}"] for r in part]))
        out.append(macro)
    return out


def flat_metrics(summary: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{r['set']}.{r['task']}.{m}": r[m] for r in summary for m in ("psnr_rgb", "ssim_rgb", "psnr_y")}


def write_tables(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``results.md`` and ``results.csv``: per set and task, restored vs input, RGB and Y conventions named."""
    out.mkdir(parents=True, exist_ok=True)
    cols = ["set", "task", "images", "input_psnr_rgb", "psnr_rgb", "input_ssim_rgb", "ssim_rgb", "psnr_y", "ssim_y"]
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["summary"])
    lines = [
        "PSNR/SSIM RGB: scikit-image on [0,1] RGB (PromptIR convention); Y: BT.601 luma (BasicSR convention). "
        "Means are image-weighted per task; `macro` is the mean over tasks.",
        "",
        "| set | task | images | input PSNR (RGB) | PSNR (RGB) | input SSIM (RGB) | SSIM (RGB) | PSNR (Y) | SSIM (Y) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(
            f"| {r['set']} | {r['task']} | {r['images']} | {r['input_psnr_rgb']:.2f} | {r['psnr_rgb']:.2f} | "
            f"{r['input_ssim_rgb']:.4f} | {r['ssim_rgb']:.4f} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def write_figure(results: dict[str, Any], path: Path, crop: int) -> Path | None:
    """One row per (set, task): input | restored | target centre crops, columns titled."""
    from synth.figures import centre_crop, labelled_grid, png_bytes

    if not results["examples"]:
        return None
    rows = [
        (name.replace("/", "\n"), [centre_crop(img, crop) for img in images])
        for name, images in sorted(results["examples"].items())
    ]
    path.write_bytes(png_bytes(labelled_grid(rows, ["input", "restored", "target"])))
    return path

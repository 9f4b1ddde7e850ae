"""Evaluating an exported restorer on synthetic shards and on benchmark folders; tables and a figure.

The protocol (:class:`Protocol`): each image is restored whole when the estimated activation memory fits the
budget, in tiles beyond it (the table counts tiled images); metrics are taken on the float output clipped to
[0, 1], as PromptIR's ``compute_psnr_ssim`` does, unless ``round_uint8`` quantises it first (what a saved PNG
holds; clearair 0.1.0 did this); ``mod_crop`` centre-crops input and target to multiples of its base before
anything else (PromptIR's test-time crop, base 16).
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clearair.metrics import mod_crop as crop
from clearair.metrics import psnr, ssim
from clearair.restorer import load_restorer
from synth.config import SourceSpec
from synth.degradations import degrade
from synth.figures import centre_crop, labelled_grid, png_bytes
from synth.imageio import load_rgb
from synth.read import iter_shard
from synth.sources import discover_folder
from workflows.config import EvaluateConfig

METRICS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")
PROTOCOL_MOD_CROP = {"clearair": None, "promptir": 16}  # evaluate.protocol -> its test-time mod-crop base
AVERAGE = ("average", "benchmarks")  # the (set, task) of the mean over every benchmark row: the papers' headline


@dataclass(frozen=True)
class Protocol:
    """How an image is restored and measured (see the module docstring)."""

    tile: int | None = 512
    overlap: int = 32
    memory_budget_mb: float | None = None
    round_uint8: bool = False
    mod_crop: int | None = None

    def describe(self) -> str:
        if self.memory_budget_mb is not None:
            side = self.tile or "the largest side that fits"
            where = f"whole images up to {self.memory_budget_mb:g} MiB of estimated activations, tiles of {side} beyond"
        elif self.tile is not None:
            where = f"tiles of {self.tile} on images larger than that"
        else:
            where = "whole images"
        if self.tile is not None or self.memory_budget_mb is not None:
            where += f" (overlap {self.overlap})"
        crop = f"; input and target centre-cropped to multiples of {self.mod_crop}" if self.mod_crop else ""
        output = "the output rounded to uint8" if self.round_uint8 else "the float output clipped to [0, 1]"
        return f"{where}{crop}; metrics on {output}"


class BenchmarkError(ValueError):
    """A benchmark folder that is missing or in no layout we know; raised before any work."""


def protocol_for(evaluate: EvaluateConfig) -> Protocol:
    """The protocol an ``evaluate`` section asks for."""
    return Protocol(
        evaluate.tile, evaluate.overlap, evaluate.memory_budget_mb, evaluate.round_uint8,
        PROTOCOL_MOD_CROP[evaluate.protocol],
    )  # fmt: skip


def benchmark_items(bench: dict[str, Any]) -> list:
    """Source items of a benchmark folder: pairs, or clean images when ``noise_sigma`` is set."""
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


def _benchmark_pairs(
    bench: dict[str, Any], seed: int, mod_crop: int | None = None
) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    """(name, task, lq, gt) per image; clean images get seeded noise after the mod-crop, as PromptIR adds it."""
    for item in benchmark_items(bench):
        gt, _ = load_rgb(item.gt)
        gt = crop(gt, mod_crop) if mod_crop else gt
        if item.lq is None:
            noise_seed = int(hashlib.sha256(f"{seed}:{item.gt_hash}".encode()).hexdigest()[:8], 16)
            lq, _ = degrade(gt, "gaussian_noise", seed=noise_seed, mode="promptir", sigma=bench["noise_sigma"])
            task = f"denoise_{bench['noise_sigma']}"
        else:
            lq, _ = load_rgb(item.lq)
            lq = crop(lq, mod_crop) if mod_crop else lq
            task = item.task or bench["name"]
        yield Path(item.lq or item.gt).stem, task, lq, gt


def _shard_pairs(urls: list[str], mod_crop: int | None = None) -> Iterator[tuple[str, str, np.ndarray, np.ndarray]]:
    for url in urls:
        for s in iter_shard(url):
            lq, gt = (crop(s["lq"], mod_crop), crop(s["gt"], mod_crop)) if mod_crop else (s["lq"], s["gt"])
            yield s["key"], s["meta"]["task"], lq, gt


def _scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
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
    protocol: Protocol,
    max_images: int | None,
    seed: int,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Per-image rows, per-(set, task) summaries with the input's scores beside, flat metrics, example images and
    the protocol's description; ``progress``: a bar per set on stderr."""
    restorer = load_restorer(model_dir, device=device, precision="fp32")  # metrics in float32 on any device
    sources = {name: _shard_pairs(urls, protocol.mod_crop) for name, urls in sets.items()}
    sources |= {b["name"]: _benchmark_pairs(b, seed, protocol.mod_crop) for b in benchmarks}
    place = {"tile": protocol.tile, "overlap": protocol.overlap, "memory_budget_mb": protocol.memory_budget_mb}
    rows, examples = [], {}
    for set_name, pairs in sources.items():
        bar = tqdm(pairs, desc=f"evaluate {set_name}", unit="image", total=max_images, disable=not progress)
        for n, (key, task, lq, gt) in enumerate(bar):
            if max_images is not None and n >= max_images:
                break
            out = restorer.restore(lq.astype(np.float32) / 255.0, **place)  # float32 (H, W, 3) in [0, 1]
            if protocol.round_uint8:
                out = np.round(out * 255.0).astype(np.uint8)
            rows.append(
                {
                    "set": set_name,
                    "kind": "benchmark" if set_name in {b["name"] for b in benchmarks} else "synthetic",
                    "task": task,
                    "key": key,
                    "tiled": restorer.tile_for(*lq.shape[:2], **place) is not None,
                    **_scores(out, gt),
                    **{f"input_{k}": v for k, v in _scores(lq, gt).items()},
                }
            )
            shown = out if out.dtype == np.uint8 else np.round(out * 255.0).astype(np.uint8)
            examples.setdefault(f"{set_name}/{task}", (lq, shown, gt))
    summary = summarise(rows)
    return {
        "rows": rows,
        "summary": summary,
        "metrics": flat_metrics(summary),
        "examples": examples,
        "protocol": protocol.describe(),
    }


def _mean_row(set_name: str, task: str, part: list[dict[str, Any]]) -> dict[str, Any]:
    row = {
        "set": set_name,
        "task": task,
        "images": sum(r["images"] for r in part),
        "tiled": sum(r["tiled"] for r in part),
    }
    for m in METRICS:
        row[m] = float(np.mean([r[m] for r in part]))
        row[f"input_{m}"] = float(np.mean([r[f"input_{m}"] for r in part]))
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Image-weighted means per (set, task); per set a ``macro`` row (the mean of its task means); and when there
    are two or more benchmark rows, the ``average``/``benchmarks`` row: the unweighted mean over every benchmark
    (set, task), the papers' headline "Average" column (CBSD68 at three sigmas counts three times)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["set"], r["task"])].append(r)
    out = []
    for (set_name, task), rs in sorted(groups.items()):
        row = {"set": set_name, "task": task, "images": len(rs), "tiled": sum(bool(r["tiled"]) for r in rs)}
        for m in METRICS:
            row[m] = float(np.mean([r[m] for r in rs]))
            row[f"input_{m}"] = float(np.mean([r[f"input_{m}"] for r in rs]))
        out.append(row)
    per_task = list(out)
    for set_name in sorted({r["set"] for r in per_task}):
        out.append(_mean_row(set_name, "macro", [r for r in per_task if r["set"] == set_name]))
    benchmark_sets = {r["set"] for r in rows if r.get("kind") == "benchmark"}
    bench_rows = [r for r in per_task if r["set"] in benchmark_sets]
    if len(bench_rows) >= 2:
        out.append(_mean_row(*AVERAGE, bench_rows))
    return out


def flat_metrics(summary: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{r['set']}.{r['task']}.{m}": r[m] for r in summary for m in ("psnr_rgb", "ssim_rgb", "psnr_y")}


IMAGE_COLUMNS = ("set", "kind", "task", "key", "tiled", *METRICS, *(f"input_{m}" for m in METRICS))


def write_tables(results: dict[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """``results.md`` and ``results.csv``: per set and task, restored vs input, RGB and Y conventions named; and
    ``results_images.csv``: one row per image (:data:`IMAGE_COLUMNS`), to see what a mean hides."""
    out.mkdir(parents=True, exist_ok=True)
    images_path = out / "results_images.csv"
    with open(images_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=IMAGE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results.get("rows", []))
    cols = [
        "set",
        "task",
        "images",
        "tiled",
        "input_psnr_rgb",
        "psnr_rgb",
        "input_ssim_rgb",
        "ssim_rgb",
        "psnr_y",
        "ssim_y",
    ]
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["summary"])
    lines = [
        "PSNR/SSIM RGB: scikit-image on [0,1] RGB (PromptIR convention); Y: BT.601 luma (BasicSR convention). "
        "Means are image-weighted per task; `macro` is the mean over a set's tasks; `average` / `benchmarks` the "
        "mean over every benchmark row (the papers' Average). `tiled`: images restored in tiles, not whole.",
        f"Protocol: {results['protocol']}.",
        "",
        "| set | task | images | tiled | input PSNR (RGB) | PSNR (RGB) | input SSIM (RGB) | SSIM (RGB) | PSNR (Y) | "
        "SSIM (Y) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["summary"]:
        lines.append(
            f"| {r['set']} | {r['task']} | {r['images']} | {r['tiled']} | "
            f"{r['input_psnr_rgb']:.2f} | {r['psnr_rgb']:.2f} | "
            f"{r['input_ssim_rgb']:.4f} | {r['ssim_rgb']:.4f} | {r['psnr_y']:.2f} | {r['ssim_y']:.4f} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path, images_path


def write_figure(results: dict[str, Any], path: Path, crop: int) -> Path | None:
    """One row per (set, task): input | restored | target centre crops, columns titled."""
    if not results["examples"]:
        return None
    rows = [
        (name.replace("/", "\n"), [centre_crop(img, crop) for img in images])
        for name, images in sorted(results["examples"].items())
    ]
    path.write_bytes(png_bytes(labelled_grid(rows, ["input", "restored", "target"])))
    return path

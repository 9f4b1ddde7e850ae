"""Synthesis speed against its limit, in one run on the same images.

Prints samples/s at 256x256 for every degradation and for the mixed recipe (degrade + encode both PNGs + tar),
the *encode floor* (only PNG-encoding the same LQ/GT pairs with the shard settings and writing the tar), their
ratio, and the speed-up of 2 Ray workers over 1 on a whole `synthesize` run (Ray start excluded).

    python benchmarks/bench_synth.py [--n 200] [--skip-ray]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")



def demo_images(n: int, size: int = 256) -> list[np.ndarray]:
    """``n`` distinct ``size`` crops at seeded random positions of scikit-image's photos (long side 1024)."""
    import skimage

    from synth.imageio import fit_long_side, load_rgb
    from synth.sources import DEMO_PHOTOS

    photos = [fit_long_side(load_rgb(Path(skimage.data_dir) / p)[0], 1024)[0] for p in DEMO_PHOTOS]
    photos = [p for p in photos if min(p.shape[:2]) >= size]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size + 1), rng.integers(0, p.shape[1] - size + 1)
        out.append(np.ascontiguousarray(p[y : y + size, x : x + size]))
    return out


def timed(fn, items) -> float:
    t = time.perf_counter()
    for i, x in enumerate(items):
        fn(i, x)
    return len(items) / (time.perf_counter() - t)


def encode_floor(pairs: list[tuple[np.ndarray, np.ndarray]], level: int, tmp: Path) -> float:
    from synth.imageio import encode_png
    from synth.writer import write_tar

    t = time.perf_counter()
    members = []
    for i, (lq, gt) in enumerate(pairs):
        members += [
            (f"{i:06d}.gt.png", encode_png(gt, level)),
            (f"{i:06d}.json", b"{}"),
            (f"{i:06d}.lq.png", encode_png(lq, level)),
        ]
    write_tar(tmp / "floor.tar", members)
    return len(pairs) / (time.perf_counter() - t)


def full_synthesis(images, steps_for, level: int, tmp: Path) -> tuple[float, list]:
    """Degrade + encode + tar, exactly what a shard task does per sample (minus reading the source file)."""
    from synth.degradations import Context, apply_steps
    from synth.imageio import encode_png
    from synth.plan import sample_rng
    from synth.writer import write_tar

    t = time.perf_counter()
    members, pairs = [], []
    for i, gt in enumerate(images):
        rng = sample_rng(0, f"{i:016x}", 0)
        lq, _ = apply_steps(gt, steps_for(rng), rng, Context())
        pairs.append((lq, gt))
        members += [
            (f"{i:06d}.gt.png", encode_png(gt, level)),
            (f"{i:06d}.json", b"{}"),
            (f"{i:06d}.lq.png", encode_png(lq, level)),
        ]
    write_tar(tmp / "synth.tar", members)
    return len(images) / (time.perf_counter() - t), pairs


def ray_scaling(n: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """Samples/s with 1 and 2 workers: of the shard phase alone (Ray tasks writing shards) and of whole
    ``synthesize`` runs (plus discovery, planning, manifest and contact sheet on the driver), after a warm-up run
    has started the workers (process start and imports are paid once per worker, not per shard)."""
    import ray
    from PIL import Image

    from synth.config import validate_config
    from synth.distribute import WORKER_ENV, run_shards
    from synth.recipes import load_recipe
    from synth.run import RunOptions, check_writable, plan, synthesize

    src = tmp / "src"
    src.mkdir()
    for i, img in enumerate(demo_images(n)):
        Image.fromarray(img).save(src / f"{i:04d}.png", compress_level=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    recipe = load_recipe("mixed")
    rates: dict[str, list[float]] = {"shards": [], "whole": []}
    for i, workers in enumerate((2, 1, 2, 1, 2)):
        cfg = validate_config({"sources": [{"path": str(src)}], "recipe": "mixed", "out": str(tmp / f"w{i}"),
                               "samples_per_shard": 16, "patch_size": 128, "max_side": None})
        options = RunOptions(num_workers=workers, progress=False)
        if i < 3:  # warm-up, then whole runs
            t = time.perf_counter()
            samples = synthesize(cfg, options)["samples"]
            rates["whole"].append(samples / (time.perf_counter() - t))
            continue
        out = Path(cfg.out)
        check_writable(out)
        pending, _ = plan(cfg, recipe, out, {})
        t = time.perf_counter()
        samples = sum(s["samples"] for s in run_shards(pending, cfg, recipe, str(out), options))
        rates["shards"].append(samples / (time.perf_counter() - t))
    ray.shutdown()
    return {"whole": (rates["whole"][1], rates["whole"][2]), "shards": (rates["shards"][0], rates["shards"][1])}


def main() -> None:
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # glibc reads these at start: re-exec with the workers' settings
        os.environ.update({"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "268435456"})
        os.execv(sys.executable, [sys.executable, *sys.argv])
    import cv2

    from synth.degradations import DEGRADATIONS
    from synth.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--level", type=int, default=1, help="PNG zlib level (the shard default is 1)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--ray-n", type=int, default=640, help="images of the Ray scaling runs")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    images = demo_images(args.n)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.n} images 256x256; "
        f"PNG level {args.level}; one process"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("| workload | samples/s | vs encode floor |\n|---|---|---|")
        mixed = load_recipe("mixed")
        rate, pairs = full_synthesis(images, lambda rng: mixed.resolve(mixed.tasks[0], rng), args.level, tmp)
        floor = encode_floor(pairs, args.level, tmp)
        print(f"| encode floor (PNG x2 + tar) | {floor:.1f} | 1.00 |")
        print(f"| mixed recipe (degrade + encode + tar) | {rate:.1f} | {rate / floor:.2f} |")
        for name in DEGRADATIONS:
            r, _ = full_synthesis(
                images, lambda rng, n=name: [{"degradation": n, "severity": "medium", "params": {}}], args.level, tmp
            )
            print(f"| {name} | {r:.1f} | {r / floor:.2f} |")
        if not args.skip_ray:
            for phase, (one, two) in ray_scaling(args.ray_n, tmp).items():
                what = "shard phase (Ray tasks)" if phase == "shards" else "whole synthesize() run"
                print(f"Ray, mixed recipe, {args.ray_n} images, {what}: 1 worker {one:.1f} samples/s, "
                      f"2 workers {two:.1f} samples/s, speed-up {two / one:.2f}x")

if __name__ == "__main__":
    main()

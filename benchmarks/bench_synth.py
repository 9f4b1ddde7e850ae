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


def timed_synthesis(cfg, options, shards_only: bool = False) -> tuple[float, int, int]:
    """Seconds, samples and shards of one run into a fresh ``cfg.out``: a whole ``synthesize`` (discovery, planning,
    shards, manifest and contact sheet) or, with ``shards_only``, its shard phase alone (the Ray tasks)."""
    from synth.distribute import run_shards
    from synth.recipes import load_recipe
    from synth.run import check_writable, plan, synthesize

    if not shards_only:
        t = time.perf_counter()
        manifest = synthesize(cfg, options)
        return time.perf_counter() - t, manifest["samples"], len(manifest["shards"])
    recipe, out = load_recipe(cfg.recipe), str(Path(cfg.out).resolve())
    check_writable(out)
    pending, _ = plan(cfg, recipe, out, {})
    t = time.perf_counter()
    states = list(run_shards(pending, cfg, recipe, out, options))
    return time.perf_counter() - t, sum(s["samples"] for s in states), len(states)


def ray_scaling(n: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """Samples/s with 1 and 2 workers: of the shard phase alone (Ray tasks writing shards) and of whole
    ``synthesize`` runs (plus discovery, planning, manifest and contact sheet on the driver), after a warm-up run
    has started the workers (process start and imports are paid once per worker, not per shard)."""
    import ray
    from PIL import Image

    from synth.config import validate_config
    from synth.distribute import WORKER_ENV
    from synth.run import RunOptions

    src = tmp / "src"
    src.mkdir()
    for i, img in enumerate(demo_images(n)):
        Image.fromarray(img).save(src / f"{i:04d}.png", compress_level=1)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV}
    )
    rates: dict[str, list[float]] = {"shards": [], "whole": []}
    for i, workers in enumerate((2, 1, 2, 1, 2)):
        source = {"sources": [{"path": str(src)}], "max_side": None}
        cfg = validate_config({**source, "recipe": "mixed", "out": str(tmp / f"w{i}"), "samples_per_shard": 16})
        phase = "whole" if i < 3 else "shards"  # warm-up, then whole runs, then shard phases
        seconds, samples, _ = timed_synthesis(cfg, RunOptions(num_workers=workers, progress=False), phase == "shards")
        rates[phase].append(samples / seconds)
    ray.shutdown()
    return {"whole": (rates["whole"][1], rates["whole"][2]), "shards": (rates["shards"][0], rates["shards"][1])}


def reexec_with_worker_malloc() -> None:
    """glibc reads its malloc settings at start: re-exec this script with those of the Ray workers."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        os.environ.update({"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "268435456"})
        os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    reexec_with_worker_malloc()
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
                print(
                    f"Ray, mixed recipe, {args.ray_n} images, {what}: 1 worker {one:.1f} samples/s, "
                    f"2 workers {two:.1f} samples/s, speed-up {two / one:.2f}x"
                )


if __name__ == "__main__":
    main()

"""The quickstart-size ablation of the papers' losses, on the shards, tiers and prompts of a quickstart run.

Trains the quickstart's restorer in one process (no Ray; the same spec, RestorerModule, loaders and schedule as the
train stage) with

    (a) Perceive-IR, L1 only                (b) + InfoNCE on CFE        (c) + InfoNCE + CLIP-aware
    (d) ClearAIR, L1 only                   (e) + internal clue reuse

over several seeds, evaluates each on the quickstart's test images (RGB PSNR, whole images as the evaluate stage
restores them), and prints per-task and macro PSNR as mean +- std over seeds, and the paired difference of each
variant to its family's L1 baseline (same seeds, same batches). The difficulty-adaptive perceptual loss is left
out: it needs a pretrained VGG16, which cannot be had offline.

    clearair run quickstart --workdir runs/quickstart          # once, for the shards, tiers and prompts
    python benchmarks/ablation_quickstart.py runs/quickstart [--seeds 0 1 2] [--steps 1500] [--variants a b c d e]

About 1.5-2 hours on 2 CPU cores for all variants and three seeds (107 min on 2026-12-06, cores partly shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from synth.portable import use_portable_cpu

use_portable_cpu()  # the kernels the pipeline's stages run with, before NumPy or Torch loads

import numpy as np  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLEARAIR_MODEL = {"arch": "clearair", "preset": "tiny", "config": {"quality_dim": 64, "degradation_dim": 19}}


def variants(perceiver: dict) -> dict[str, dict]:
    """Variant -> overrides of the quickstart's train section."""
    regions = {"kind": "dino_cluster", "n_regions": 4, "image_size": 56,
               "source": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 14,
                          "image_size": 56}}  # fmt: skip
    clearair_priors = {
        "kind": "clearair",
        "assessor": {"kind": "perceiver", **perceiver},
        "regions": regions,
        "degradation": {"kind": "cfe_perceiver", "cfe": {"channels": [8, 8, 16, 16], "out_dim": 16}},
    }
    clearair = {"model": CLEARAIR_MODEL, "loss": "clearair", "priors": clearair_priors}
    return {
        "a": {"loss_weights": {"con": 0.0, "clip": 0.0, "dpl": 0.0}},
        "b": {"loss_weights": {"clip": 0.0, "dpl": 0.0}},
        "c": {"loss_weights": {"dpl": 0.0}},
        "d": {**clearair, "loss_weights": {"inter": 0.0}},
        "e": {**clearair, "loss_weights": {}},
    }


BASELINE = {"a": "a", "b": "a", "c": "a", "d": "d", "e": "d"}
LABELS = {"a": "PIR L1", "b": "PIR +con", "c": "PIR +con+clip", "d": "CAIR L1", "e": "CAIR +clue"}


def train_and_evaluate(workdir: str, variant: dict, seed: int, steps: int, extra: dict) -> dict[str, float]:
    import lightning.pytorch as L
    import torch

    from clearair.data import TaskIndex, restoration_loader
    from clearair.export import export_model
    from clearair.lightning import build_restorer_module
    from synth.read import shard_paths
    from workflows.config import load_pipeline
    from workflows.context import Workdir
    from workflows.evaluation import evaluate_model, protocol_for
    from workflows.pipeline import stage_keys
    from workflows.restorer_job import restorer_spec, training_data

    overrides = {"seed": seed, "train.fit.steps": steps, **{f"train.{k}": v for k, v in variant.items()}, **extra}
    cfg = load_pipeline("quickstart", overrides)
    wd, keys = Workdir(workdir), stage_keys(load_pipeline("quickstart"))
    inputs = {s: wd.cached(s, keys[s]) for s in ("synth", "crossval", "perceiver", "priors")}
    if None in inputs.values():
        raise SystemExit(f"{workdir} holds no complete quickstart run: `clearair run quickstart --workdir {workdir}`")
    spec, data = restorer_spec(cfg, inputs), training_data(cfg, inputs)
    if cfg.train.loss != "perceive_ir":  # ClearAIR reads the synthetic shards; tiers are Perceive-IR's
        data = replace(data, train=shard_paths(inputs["synth"].outputs["data"], "train"), tiers=False)
    torch.manual_seed(seed)
    module = build_restorer_module(spec)
    fit = cfg.train.fit
    loader = restoration_loader(data.train, fit.crop, fit.global_batch, TaskIndex(data.tasks), seed=seed,
                                tiers=data.tiers, steps_per_epoch=fit.val_every,
                                resample=data.resample, augment=fit.augment,
                                fresh_noise=fit.fresh_noise)  # fmt: skip
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"priors": spec.priors, "allow_random_frozen": True}
        export_model(module.exported.eval(), Path(tmp), extra=extra)
        sets = {"test": shard_paths(inputs["synth"].outputs["data"], "test")}
        results = evaluate_model(Path(tmp), sets, [], protocol_for(cfg.evaluate), max_images=None, seed=seed)
    out = {r["task"]: r["psnr_rgb"] for r in results["summary"]}
    out["input_macro"] = next(r["input_psnr_rgb"] for r in results["summary"] if r["task"] == "macro")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--variants", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline override")
    args = parser.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}
    import torch

    from workflows.config import load_pipeline
    from workflows.context import Workdir
    from workflows.pipeline import stage_keys
    from workflows.stages.common import learned_perceiver

    torch.set_num_threads(2)
    keys = stage_keys(load_pipeline("quickstart"))
    perceiver = learned_perceiver({"perceiver": Workdir(args.workdir).cached("perceiver", keys["perceiver"])})
    table = variants(perceiver)
    started = time.time()
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for v in args.variants:
        for seed in args.seeds:
            t = time.time()
            runs.setdefault(v, {})[seed] = train_and_evaluate(args.workdir, table[v], seed, args.steps, extra)
            print(f"  ({v}) {LABELS[v]} seed {seed}: macro {runs[v][seed]['macro']:.2f} dB in {time.time() - t:.0f} s",
                  flush=True)  # fmt: skip
    print(f"\nQuickstart ablation: {args.steps} steps, seeds {args.seeds}, overrides {extra or 'none'}, test split,")
    print("RGB PSNR (dB), mean +- std;")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {time.time() - started:.0f} s in all\n")
    tasks = sorted(k for k in next(iter(next(iter(runs.values())).values())) if k not in ("macro", "input_macro"))
    print("| variant | " + " | ".join(tasks) + " | macro | macro - baseline (paired) |")
    print("|---" * (len(tasks) + 3) + "|")
    for v, by_seed in runs.items():
        cells = []
        for task in [*tasks, "macro"]:
            vals = np.array([r[task] for r in by_seed.values()])
            cells.append(f"{vals.mean():.2f} +- {vals.std():.2f}")
        base = runs.get(BASELINE[v], {})
        diffs = np.array([by_seed[s]["macro"] - base[s]["macro"] for s in by_seed if s in base])
        delta = f"{diffs.mean():+.2f} +- {diffs.std():.2f}" if v != BASELINE[v] and len(diffs) else "-"
        print(f"| ({v}) {LABELS[v]} | " + " | ".join(cells) + f" | {delta} |")
    macro_in = next(iter(next(iter(runs.values())).values()))["input_macro"]
    print(f"\ninput (degraded) macro PSNR: {macro_in:.2f} dB")


if __name__ == "__main__":
    main()

"""``clearair synth``: synthesise shards from a config, flags and ``--set`` overrides, or rebuild one sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from workflows.commands import parse_set


def add_synth_parser(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="synthesise degraded/clean pairs into webdataset shards",
        description="Synthesise multi-degradation training pairs into deterministic shards on Ray.",
    )
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of images, `demo`, or LAYOUT:DIR (layouts: auto folder paired rain100l sots "
        "gopro lol snow100k promptir); repeatable",
    )
    p.add_argument("--recipe", help="bundled recipe name or YAML file (see --list-recipes)")
    p.add_argument("--out", help="output dataset directory")
    p.add_argument("--config", help="a YAML synth config; flags override its fields")
    p.add_argument("--seed", type=int)
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--patch-size", type=int, help="training crop size; smaller images are skipped")
    p.add_argument("--max-side", type=int, help="downscale longer images to this long side")
    p.add_argument("--variants", type=int, help="degraded variants drawn per clean source image")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--folds", type=int, help="cross-validation folds K of the training split")
    p.add_argument("--mode", choices=["materialized", "on_the_fly"])
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. splits.val_fraction=0.2"
    )
    p.add_argument("--num-workers", type=int, help="concurrent shard tasks (default: all CPUs Ray offers)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--overwrite", action="store_true", help="delete an output made with another config")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list-recipes", action="store_true", help="list the bundled recipes and exit")
    p.add_argument("--regenerate", metavar="KEY", help="rebuild one sample of --out from its source and compare")
    p.add_argument("--to", metavar="DIR", help="with --regenerate: also write the rebuilt PNGs here")


FLAG_FIELDS = {
    "seed": "seed",
    "samples_per_shard": "samples_per_shard",
    "patch_size": "patch_size",
    "max_side": "max_side",
    "variants": "variants",
    "max_samples": "max_samples",
    "mode": "mode",
    "folds": "splits.folds",
    "recipe": "recipe",
    "out": "out",
}


def synth_config(args: argparse.Namespace):
    from synth.config import SourceSpec, read_config_file, set_dotted, validate_config

    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    if args.source:
        data["sources"] = [SourceSpec.parse(s).model_dump(exclude_defaults=True) for s in args.source]
    for flag, field in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            set_dotted(data, field, value)
    for key, value in parse_set(args.set).items():
        set_dotted(data, key, value)
    return validate_config(data, origin=args.config or "command line")


def cmd_synth(args: argparse.Namespace) -> int:
    from synth.config import ConfigError
    from synth.recipes import RecipeError, list_recipes, load_recipe
    from synth.run import RunOptions, SynthError, synthesize

    if args.list_recipes:
        for name, description in list_recipes():
            print(f"{name:12s} {description}")
        return 0
    if args.regenerate:
        return _regenerate(args)
    try:
        cfg = synth_config(args)
        load_recipe(cfg.recipe)
        options = RunOptions(
            args.num_workers, args.ray_address, args.overwrite, not args.no_progress, worker_output=not args.quiet
        )
        manifest = synthesize(cfg, options)
    except (ConfigError, RecipeError, SynthError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _summary(manifest, cfg.out)
    return 0


def _summary(manifest: dict, out: str) -> None:
    print(f"{manifest['samples']} samples in {len(manifest['shards'])} shards -> {out}")
    for kind in ("split", "task", "severity"):
        counts = ", ".join(f"{k}: {v}" for k, v in manifest["counts"][kind].items())
        print(f"  by {kind}: {counts}")
    if manifest["skipped"]:
        print(f"  skipped {len(manifest['skipped'])} files:")
        for s in manifest["skipped"][:20]:
            print(f"    {s['path']}: {s['reason']}")
        if len(manifest["skipped"]) > 20:
            print(f"    ... and {len(manifest['skipped']) - 20} more (see manifest.json)")


def _regenerate(args: argparse.Namespace) -> int:
    from synth.imageio import encode_png
    from synth.replay import replay
    from synth.run import SynthError

    if not args.out:
        print("error: --regenerate needs --out (the dataset directory)", file=sys.stderr)
        return 2
    try:
        r = replay(args.out, args.regenerate)
    except SynthError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.to:
        to = Path(args.to)
        to.mkdir(parents=True, exist_ok=True)
        for part in ("gt", "lq"):
            if r.regenerated[part] is not None:
                (to / f"{r.key}.{part}.png").write_bytes(encode_png(r.regenerated[part]))
    print(f"{r.key} in {r.shard}: {'identical' if r.identical else 'DIFFERENT'} to the stored sample")
    return 0 if r.identical else 1

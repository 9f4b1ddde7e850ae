"""The ``clearair`` command line. Each subcommand validates its whole configuration before doing any work."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


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
    for key, value in _parse_set(args.set).items():
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


def add_run_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a pipeline: synth, crossval, perceiver, priors, train, evaluate",
        description="Run a pipeline end to end (cached, resumable, tracked in MLflow).",
    )
    p.add_argument(
        "pipeline",
        help="a bundled pipeline (quickstart, perceive_ir_3task, perceive_ir_5task, "
        "clearair_allweather) or a YAML path",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.fit.steps=100"
    )
    p.add_argument("--from", dest="start_from", metavar="STAGE", help="rerun this stage and every later one")
    p.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be cached)")
    p.add_argument("--dry-run", action="store_true", help="print stages, cache state and resources; run nothing")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a sqlite store inside the workdir)",
    )
    p.add_argument(
        "--workdir",
        default="runs/default",
        help="where stage outputs are cached: a directory or s3://BUCKET/PREFIX (default: runs/default)",
    )
    p.add_argument("--no-progress", action="store_true")


def cmd_run(args: argparse.Namespace) -> int:
    from synth.config import ConfigError
    from synth.run import SynthError
    from workflows.config import load_pipeline
    from workflows.context import StaleOutput, WorkdirLocked
    from workflows.doctor import preflight
    from workflows.evaluation import BenchmarkError
    from workflows.faults import storage_fault
    from workflows.pipeline import Options, PipelineError, plan, run_pipeline
    from workflows.tracking import TrackingUnavailable

    options = Options(
        args.workdir,
        args.tracking_uri,
        args.ray_address,
        args.start_from,
        args.only,
        args.dry_run,
        not args.no_progress,
        worker_output=not args.quiet,
    )
    try:
        cfg = load_pipeline(args.pipeline, _parse_set(args.set))
        rows = plan(cfg, options)
        if args.dry_run:
            _print_plan(cfg, rows, options)
        missing = preflight(cfg, {r["stage"] for r in rows if r["runs"]})  # what the stages to run need
        for check in missing:
            print(f"error: {check.what}: {check.detail}", file=sys.stderr)
        if missing or args.dry_run:
            return 2 if missing else 0
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        t0 = time.time()
        results = run_pipeline(cfg, options, text)
    except (
        ConfigError,
        PipelineError,
        WorkdirLocked,
        TrackingUnavailable,
        BenchmarkError,
        StaleOutput,
        SynthError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or read-only mount, wherever it surfaced: one line, not a traceback
        store = options.tracking_uri or str(Path(options.workdir).expanduser().resolve() / "mlflow.db")
        fault = storage_fault(err, str(options.workdir), store)
        if fault is None:
            raise
        print(
            f"error: {fault}. Free space there (or fix the mount) and rerun the same command: finished stages "
            f"are kept and it resumes",
            file=sys.stderr,
        )
        return 2
    print(f"pipeline {cfg.name} done in {time.time() - t0:.0f} s; workdir {options.workdir}")
    for stage, result in results.items():
        note = f" (skipped: {result.skipped})" if result.skipped else ""
        took = "cached" if result.seconds is None else f"{result.seconds:.0f} s"
        print(f"  {stage:10s} {took:>7s}  {json.dumps(result.metrics)[:130]}{note}")
    if "evaluate" in results:
        from synth import storage

        print(storage.read_text(results["evaluate"].outputs["table_md"]))
    return 0


def _print_plan(cfg, rows: list[dict], options) -> None:
    print(f"pipeline {cfg.name}: {cfg.description}\nworkdir {options.workdir}\n")
    print(f"{'stage':10s} {'key':12s} {'cached':7s} {'action':7s} resources")
    for r in rows:
        action = "run" if r["runs"] else "skip"
        print(f"{r['stage']:10s} {r['key']:12s} {'yes' if r['cached'] else 'no':7s} {action:7s} {r['resources']}")


def add_workdir_parser(sub) -> None:
    p = sub.add_parser("workdir", help="list or drop cached stage outputs of a workdir")
    p.add_argument("action", choices=["list", "drop"])
    p.add_argument("name", nargs="?", help="with drop: a stage name or stage directory prefix")
    p.add_argument("--workdir", default="runs/default", help="the workdir to read (default: runs/default)")


def cmd_workdir(args: argparse.Namespace) -> int:
    from synth import storage
    from workflows.context import Workdir, WorkdirLocked

    wd = Workdir(args.workdir)
    if not storage.is_remote(wd.root) and not storage.exists(wd.root):  # an s3:// prefix exists once written
        print(f"error: workdir {wd.root} does not exist (pass --workdir; `clearair run` creates it)", file=sys.stderr)
        return 2
    if args.action == "list":
        entries = wd.entries()
        print(f"workdir {wd.root}: {len(entries) or 'no'} stage output{'' if len(entries) == 1 else 's'}")
        for e in entries:
            print(f"  {e['dir']:28s} {'complete' if e['complete'] else 'partial':9s} {e['bytes'] / 1e6:10.1f} MB")
        return 0
    if not args.name:
        print("error: drop needs a stage name (e.g. train)", file=sys.stderr)
        return 2
    try:
        wd.lock()
    except WorkdirLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    removed = wd.drop(args.name)
    wd.unlock()
    print("\n".join(f"removed {r}" for r in removed) or "nothing matched")
    return 0


def add_restore_parser(sub) -> None:
    p = sub.add_parser(
        "restore",
        help="restore images or folders with a trained model (tiled, any size)",
        description="Restore images with a trained model into --out as PNG. An image in a given folder keeps its "
        "path relative to that folder; a file given by name becomes <stem>.png; sources that would share an output "
        "keep their suffix (a.jpg.png, a.png.png). The model, the inputs and the output folder are checked before "
        "the first image (exit status 2); an image that cannot be read or restored is listed at the end and the "
        "others go on (exit status 1).",
    )
    p.add_argument(
        "model",
        help="an exported model directory (model.safetensors + config.json) or a logged MLflow model holding one, "
        "a training checkpoint (.ckpt), an s3:// URI of an export, or models:/NAME@ALIAS (or /VERSION)",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--tile", type=int, default=512, help="tile size (0: whole image)")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--tracking-uri", help="the MLflow store of a models:/ model (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--skip-existing", action="store_true", help="leave outputs already written (resume a run)")
    p.add_argument("--no-progress", action="store_true")


def cmd_restore(args: argparse.Namespace) -> int:
    from workflows.restore import RestoreError, restore_paths

    try:
        report = restore_paths(
            args.model,
            [Path(p) for p in args.inputs],
            Path(args.out),
            args.tile or None,
            args.overlap,
            device=args.device,
            precision=args.precision,
            tracking_uri=args.tracking_uri,
            skip_existing=args.skip_existing,
            progress=not args.no_progress,
        )
    except RestoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for src, dst in report.done:
        print(f"{src} -> {dst}")
    for src, dst in report.skipped:
        print(f"{src} -> {dst} (already there)")
    for path, reason in report.failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if report.failed:
        total = len(report.done) + len(report.skipped) + len(report.failed)
        print(f"{len(report.failed)} of {total} inputs could not be restored", file=sys.stderr)
    return 1 if report.failed else 0


def add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="no-reference quality of images by the learned perceiver: P(excellent) and the three tiers",
        description="Score images with learned quality prompts. One line per image: the quality score "
        "P(excellent), the most likely tier (low/medium/high) and the three probabilities, averaged over a fixed "
        "grid of crops of the view the prompts were learned on. Unreadable files are listed at the end "
        "(exit status 1).",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--prompts", required=True, help="prompts.safetensors from the perceiver stage")
    p.add_argument("--format", choices=["text", "csv", "json"], default="text", help="json: one object per line")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true")


def cmd_score(args: argparse.Namespace) -> int:
    from workflows.restore import RestoreError, score_paths

    try:
        rows, failed = score_paths(
            args.prompts, [Path(p) for p in args.inputs], device=args.device, progress=not args.no_progress
        )
    except RestoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "csv":
        print("path,score,tier,p_low,p_medium,p_high")
    for r in rows:
        p = r.probs
        if args.format == "csv":
            print(f"{r.path},{r.score:.4f},{r.tier},{p['low']:.4f},{p['medium']:.4f},{p['high']:.4f}")
        elif args.format == "json":
            print(json.dumps({"path": str(r.path), "score": round(r.score, 4), "tier": r.tier,
                              "probabilities": {k: round(v, 4) for k, v in p.items()}}))  # fmt: skip
        else:
            print(f"{r.path}\tscore {r.score:.3f}\t{r.tier}\t" + " ".join(f"{k}={v:.3f}" for k, v in p.items()))
    for path, reason in failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(rows) + len(failed)} inputs could not be scored", file=sys.stderr)
    return 1 if failed else 0


def add_doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check weights, datasets, Ray, tracking and disk for a pipeline")
    p.add_argument("pipeline", nargs="?", default="quickstart")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--ray-address")
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="the MLflow store to check (default: $MLFLOW_TRACKING_URI, else the workdir's sqlite store)",
    )
    p.add_argument("--workdir", default="runs/default")


def cmd_doctor(args: argparse.Namespace) -> int:
    from synth.config import ConfigError
    from workflows.config import load_pipeline
    from workflows.doctor import diagnose

    try:
        cfg = load_pipeline(args.pipeline, _parse_set(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    for check in diagnose(cfg, args.workdir, args.tracking_uri, args.ray_address):
        ok &= check.ok
        print(f"[{'ok' if check.ok else 'MISSING'}] {check.what}: {check.detail}")
    return 0 if ok else 1


def add_pretrain_clip_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain-clip",
        help="regenerate the small quality-aware CLIP that ships with clearair (CPU, minutes)",
        description="Pretrain the quickstart's tiny quality-aware CLIP on the demo's training photos "
        "(workflows/qclip.py).",
    )
    p.add_argument("--out", required=True, help="the open_clip folder to write (clearair/models/weights/qclip-tiny)")
    p.add_argument("--steps", type=int, help="training steps (default: the shipped model's)")
    p.add_argument("--seed", type=int, help="seed of every draw (default: the shipped model's)")


def cmd_pretrain_clip(args: argparse.Namespace) -> int:
    import dataclasses

    from workflows.qclip import PretrainConfig, pretrain

    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if args.steps is not None and args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    card = pretrain(dataclasses.replace(PretrainConfig(), **overrides), args.out)
    held = ", ".join(f"{k} {v}" for k, v in card["held_out"].items())
    print(f"{card['name']}: {card['parameters']:,} parameters in {card['train_seconds']:.0f} s -> {args.out}")
    print(f"  weights sha256 {card['weights_sha256']}; held-out photos: {held}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from workflows.provenance import version_line

    parser = argparse.ArgumentParser(prog="clearair", description=__doc__)
    _add_verbosity(parser, False)
    parser.add_argument("--version", action="version", version=version_line(), help="print version and commit")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_synth_parser,
        add_run_parser,
        add_doctor_parser,
        add_restore_parser,
        add_score_parser,
        add_workdir_parser,
        add_pretrain_clip_parser,
    ):
        add(sub)
    for subparser in sub.choices.values():  # -v/-q after the subcommand too; unset there, the top level's stand
        _add_verbosity(subparser, argparse.SUPPRESS)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="log details (INFO)")
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="errors and results only: no progress lines, bars or Ray worker output",
    )


COMMANDS = {
    "synth": cmd_synth,
    "run": cmd_run,
    "doctor": cmd_doctor,
    "restore": cmd_restore,
    "score": cmd_score,
    "workdir": cmd_workdir,
    "pretrain-clip": cmd_pretrain_clip,
}


def main(argv: list[str] | None = None) -> int:
    from synth.portable import use_portable_cpu

    use_portable_cpu()  # before NumPy, OpenCV or Torch loads: the same kernels, so the same figures, on every machine
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

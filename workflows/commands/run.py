"""``clearair run`` and ``clearair doctor``: the two commands that take a pipeline (bundled name or YAML path)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from workflows.commands import parse_set


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
        cfg = load_pipeline(args.pipeline, parse_set(args.set))
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
        cfg = load_pipeline(args.pipeline, parse_set(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = True
    for check in diagnose(cfg, args.workdir, args.tracking_uri, args.ray_address):
        ok &= check.ok
        print(f"[{'ok' if check.ok else 'MISSING'}] {check.what}: {check.detail}")
    return 0 if ok else 1

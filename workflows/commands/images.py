"""``clearair restore`` and ``clearair score``: a trained restorer or learned quality prompts on image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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

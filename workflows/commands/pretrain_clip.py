"""``clearair pretrain-clip``: regenerate the small quality-aware CLIP that ships with clearair."""

from __future__ import annotations

import argparse
import dataclasses
import sys


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

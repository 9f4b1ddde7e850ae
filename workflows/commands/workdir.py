"""``clearair workdir``: list a workdir's cached stage outputs, or drop some under its lock."""

from __future__ import annotations

import argparse
import sys


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

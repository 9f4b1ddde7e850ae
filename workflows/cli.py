"""The ``clearair`` command line. Each subcommand validates its whole configuration before doing any work."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from synth.portable import use_portable_cpu
from workflows.commands.images import add_restore_parser, add_score_parser, cmd_restore, cmd_score
from workflows.commands.pretrain_clip import add_pretrain_clip_parser, cmd_pretrain_clip
from workflows.commands.run import add_doctor_parser, add_run_parser, cmd_doctor, cmd_run
from workflows.commands.synth import add_synth_parser, cmd_synth
from workflows.commands.workdir import add_workdir_parser, cmd_workdir


class _Version(argparse.Action):
    """``--version``: the version and commit, looked up only when asked (finding them loads the model library)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from workflows.provenance import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clearair", description=__doc__)
    _add_verbosity(parser, False)
    parser.add_argument("--version", action=_Version, help="print version and commit")
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
    use_portable_cpu()  # before NumPy, OpenCV or Torch loads: the same kernels, so the same figures, on every machine
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

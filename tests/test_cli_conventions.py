"""The command line follows its ecosystem's conventions: -v/-q anywhere, MLFLOW_TRACKING_URI, MLflow's standard
user and source tags, `hf download` advice, and a `workdir list` that says what it read."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import sys
from pathlib import Path

import mlflow
import pytest

from workflows import cli
from workflows.cli import build_parser, main
from workflows.context import StageResult, Workdir
from workflows.provenance import stamp
from workflows.tracking import Tracker, default_tracking_uri

SUBCOMMANDS = {
    "synth": ["synth", "--list-recipes"],
    "run": ["run", "quickstart"],
    "doctor": ["doctor"],
    "restore": ["restore", "m", "x.png", "--out", "o"],
    "score": ["score", "x.png", "--prompts", "p"],
    "workdir": ["workdir", "list"],
    "pretrain-clip": ["pretrain-clip", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_verbosity_flags_are_accepted_before_and_after_the_subcommand(command):
    assert set(build_parser()._subparsers._group_actions[0].choices) == set(SUBCOMMANDS)  # none left untested
    argv = SUBCOMMANDS[command]
    parse = build_parser().parse_args
    assert (parse(argv).verbose, parse(argv).quiet) == (False, False)
    assert parse([*argv, "-v"]).verbose and parse(["-v", *argv]).verbose
    assert parse([*argv, "-q"]).quiet and parse(["--quiet", *argv]).quiet
    assert not parse(["-v", *argv]).quiet  # a flag before the subcommand is not reset by the subcommand's default
    with pytest.raises(SystemExit):
        parse([*argv, "-v", "-q"])  # one or the other


def test_quiet_logs_errors_only_and_turns_progress_off(monkeypatch):
    seen: list = []
    monkeypatch.setitem(cli.COMMANDS, "score", lambda args: seen.append(args) or 0)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    for argv, level in (
        (["score", "x", "--prompts", "p", "-q"], logging.ERROR),
        (["-v", "score", "x", "--prompts", "p"], logging.INFO),
    ):
        monkeypatch.setattr(root, "handlers", [])  # as in a fresh process, so basicConfig configures the root
        assert main(argv) == 0
        assert root.level == level
    assert seen[0].no_progress and not seen[1].no_progress  # -q: no bars either


def test_tracking_uri_defaults_to_the_mlflow_environment_variable(monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for argv in (["run", "quickstart"], ["doctor"]):
        assert build_parser().parse_args(argv).tracking_uri == uri
        assert (
            build_parser()
            .parse_args([*argv, "--tracking-uri", "http://127.0.0.1:1"])
            .tracking_uri.startswith("http://")
        )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert build_parser().parse_args(["run", "quickstart"]).tracking_uri is None  # the workdir's own store


def test_runs_are_owned_by_the_user_and_name_their_source(tmp_path: Path):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "conventions")
    parent = tracker.start_run("pipeline")
    child = tracker.start_run("train", parent_run_id=parent)
    me = pwd.getpwuid(os.getuid()).pw_name
    client = mlflow.MlflowClient(uri)
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert run.info.user_id == me != "unknown"
        assert run.data.tags["mlflow.user"] == me
        assert run.data.tags["mlflow.source.name"] == "clearair"
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.git.commit"] == stamp()["commit"].removesuffix("-dirty")


def test_missing_weights_advise_the_hub_cli_that_is_installed(tmp_path):
    from clearair.models.pretrained import MissingWeightsError, load_dinov2

    with pytest.raises(MissingWeightsError) as err:
        load_dinov2(str(tmp_path / "no-such-model"))
    assert "hf download" in str(err.value) and "huggingface-cli" not in str(err.value)
    assert shutil.which("hf") or (Path(sys.executable).parent / "hf").exists()  # the command the message names


def test_workdir_list_says_which_workdir_it_read(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["workdir", "list", "--workdir", str(missing)]) == 2
    assert f"workdir {missing} does not exist" in capsys.readouterr().err
    wd = Workdir(tmp_path / "w")
    Path(wd.root).mkdir()
    assert main(["workdir", "list", "--workdir", wd.root]) == 0
    assert capsys.readouterr().out.strip() == f"workdir {wd.root}: no stage outputs"
    Path(wd.stage_dir("synth", "a" * 64)).mkdir(parents=True)
    wd.publish(StageResult("synth", "a" * 64, {}))
    Path(wd.stage_dir("train", "b" * 64)).mkdir(parents=True)
    assert main(["workdir", "list", "--workdir", wd.root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"workdir {wd.root}: 2 stage outputs"
    assert sorted(line.split()[:2] for line in out[1:]) == [
        ["synth-aaaaaaaaaaaa", "complete"],
        ["train-bbbbbbbbbbbb", "partial"],
    ]

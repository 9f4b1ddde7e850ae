"""Faults of `clearair run` that a user meets: a moved or copied workdir, runs a killed run left RUNNING, a full
disk or read-only mount. Real workdirs, a real sqlite MLflow store, a real tmpfs (mounted when the tests run as
root; skipped otherwise)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.test_cache_keys import RELEASE
from workflows.cli import main
from workflows.context import WORKDIR_TOKEN, StageResult, StaleOutput, Workdir
from workflows.faults import storage_fault
from workflows.pipeline import WORKDIR_TAG
from workflows.tracking import Tracker, TrackingUnavailable, default_tracking_uri

TINY = str(Path(__file__).parent / "pipelines" / "tiny.yaml")
KEY = "c" * 64


def _publish(root: Path) -> tuple[Workdir, str]:
    wd = Workdir(root)
    out = wd.stage_dir("priors", KEY)
    Path(out, "shards").mkdir(parents=True)
    shards = [f"{out}/shards/a.tar", f"{out}/shards/b.tar"]
    outputs = {"data": out, "train_shards": shards, "sha": "ab" * 32, "elsewhere": "/data/photos"}
    wd.publish(StageResult("priors", KEY, outputs))
    return wd, out


def test_result_json_names_workdir_locations_relative_so_a_moved_workdir_stays_cached(tmp_path):
    wd, out = _publish(tmp_path / "a")
    raw = json.loads(Path(out, "result.json").read_text())["outputs"]
    assert raw["data"] == f"{WORKDIR_TOKEN}/stages/priors-cccccccccccc" and str(tmp_path) not in json.dumps(raw)
    assert raw["elsewhere"] == "/data/photos" and raw["sha"] == "ab" * 32  # not a workdir location: kept as is
    moved = Workdir(shutil.move(wd.root, tmp_path / "b"))
    result = moved.cached("priors", KEY)
    assert result.outputs["data"] == moved.stage_dir("priors", KEY)
    assert result.outputs["train_shards"] == [f"{moved.root}/stages/priors-cccccccccccc/shards/{n}.tar"
                                                          for n in "ab"]  # fmt: skip
    assert result.outputs["elsewhere"] == "/data/photos"


def test_lists_and_records_written_as_json_strings_by_earlier_releases_read_back_as_values(tmp_path):
    wd, out = _publish(tmp_path / "a")
    path = Path(out, "result.json")
    record = json.loads(path.read_text())
    shards = [f"{WORKDIR_TOKEN}/stages/priors-cccccccccccc/shards/{n}.tar" for n in "ab"]
    record["outputs"].update(train_shards=json.dumps(shards), perceiver_config=json.dumps({"embed_dim": 8}))
    path.write_text(json.dumps(record))  # as clearair 0.2 wrote them: JSON inside a string
    outputs = wd.cached("priors", KEY).outputs
    assert outputs["train_shards"] == [f"{wd.root}/stages/priors-cccccccccccc/shards/{n}.tar" for n in "ab"]
    assert outputs["perceiver_config"] == {"embed_dim": 8} and outputs["data"] == out
    wd.publish(wd.cached("priors", KEY))  # written back as plain JSON values
    assert json.loads(path.read_text())["outputs"]["train_shards"] == shards


def test_an_old_absolute_result_is_rebased_when_its_output_moved_with_it(tmp_path):
    wd, out = _publish(tmp_path / "a")
    path = Path(out, "result.json")
    record = json.loads(path.read_text())
    record["outputs"]["data"] = out  # as clearair 0.2 wrote it: absolute
    path.write_text(json.dumps(record))
    moved = Workdir(shutil.move(wd.root, tmp_path / "b"))
    assert moved.cached("priors", KEY).outputs["data"] == moved.stage_dir("priors", KEY)
    shutil.rmtree(Path(moved.stage_dir("priors", KEY), "shards"))
    record["outputs"]["data"] = f"{out}/shards"  # its output did not come along
    Path(moved.stage_dir("priors", KEY), "result.json").write_text(json.dumps(record))
    with pytest.raises(StaleOutput, match=f"is {out}/shards, in another workdir .*{tmp_path / 'a'}") as err:
        moved.cached("priors", KEY)
    assert f"clearair workdir drop priors --workdir {moved.root}" in str(err.value)


def test_a_stale_cached_output_stops_the_run_before_any_stage(tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(RELEASE / "workdir", workdir)  # results of a real run elsewhere, without their data
    before = sorted(p.name for p in workdir.iterdir())
    pipeline = str(RELEASE / "pipelines" / "tiny.yaml")
    assert main(["run", pipeline, "--workdir", str(workdir), "--set", "train.clip_temperature=null"]) == 2
    err = capsys.readouterr().err
    assert "error: workdir" in err and "/tmp/rel/tiny/stages/synth-c200c2627664/data" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in workdir.iterdir() if p.name != ".lock") == before  # no store, nothing written
    assert not Path("/tmp/rel/tiny").exists() or not any(Path("/tmp/rel/tiny").glob("stages/*/ray"))


def test_a_moved_workdirs_own_store_refuses_to_write_artifacts_to_the_old_place(tmp_path):
    old = tmp_path / "old"
    Tracker(default_tracking_uri(old), "exp", old / "mlartifacts").check_artifact_location()  # no experiment yet
    t = Tracker(default_tracking_uri(old), "exp", old / "mlartifacts")
    t.end_run(t.start_run("x"))
    t.check_artifact_location()  # its own place: fine
    new = Path(shutil.move(old, tmp_path / "new"))
    moved = Tracker(default_tracking_uri(new), "exp", new / "mlartifacts")
    with pytest.raises(TrackingUnavailable, match=f"{old}/mlartifacts, not in .*{new}/mlartifacts") as err:
        moved.check_artifact_location()
    assert "--set tracking.experiment=NAME" in str(err.value)
    Tracker(default_tracking_uri(new), "exp2", new / "mlartifacts").check_artifact_location()  # the remedy


def test_runs_a_killed_run_left_running_are_marked_killed_and_nothing_else(tmp_path):
    uri = default_tracking_uri(tmp_path)
    t = Tracker(uri, "exp")
    parent = t.start_run("pipeline", tags={WORKDIR_TAG: "/w"})
    stage = t.start_run("crossval", parent_run_id=parent, tags={WORKDIR_TAG: "/w"})
    fold = t.start_run("crossval-fold0", parent_run_id=stage)  # made by a fold's process, without the tag
    other = t.start_run("pipeline", tags={WORKDIR_TAG: "/other"})  # another workdir's run, still going
    finished = t.start_run("pipeline", tags={WORKDIR_TAG: "/w"})
    t.end_run(finished)
    assert t.mark_killed(WORKDIR_TAG, "/w") == sorted([parent, stage, fold])
    status = {r: mlflow.MlflowClient(uri).get_run(r).info.status for r in (parent, stage, fold, other, finished)}
    assert status == {parent: "KILLED", stage: "KILLED", fold: "KILLED", other: "RUNNING", finished: "FINISHED"}
    assert t.mark_killed(WORKDIR_TAG, "/w") == []


def test_storage_faults_are_found_through_wrapping_and_named(ray_session):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/w/stages/x/part.tar")

    try:
        ray_session.get(ray_session.remote(full).remote())
    except Exception as err:  # a RayTaskError from the worker
        assert storage_fault(err, "/mnt/w") == "no space left on device: /mnt/w/stages/x/part.tar"
    try:
        try:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")
        except RuntimeError:
            raise ValueError("while ending the run") from None  # raised in a handler: only __context__ links
    except ValueError as err:
        assert storage_fault(err, "/w", "sqlite:////w/mlflow.db") == "no space left on device: the tracking store " \
                                                                       "sqlite:////w/mlflow.db"  # fmt: skip
    assert storage_fault(OSError(errno.EROFS, "Read-only file system"), "/w") == "read-only file system: /w"
    assert storage_fault(OSError(errno.ENOENT, "gone", "/w/x"), "/w") is None
    assert storage_fault(KeyError("x"), "/w") is None


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (a real filesystem that fills up), mounted for the test; needs root."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_kb: int) -> None:
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.truncate(max(0, free - leave_kb * 1024))
    with open(mount / "filler", "r+b") as f:  # tmpfs counts written pages: write them
        f.write(b"\0" * max(0, free - leave_kb * 1024))


def _run(workdir: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "workflows.cli", "run", TINY, "--workdir", str(workdir), "--no-progress"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "leave_kb, named",
    [
        (0, "no space left on device: "),  # not even the workdir's lock file
        (650, "no space left on device: the tracking store /"),  # room for part of MLflow's schema (~590 KB)
        (1300, "cannot write shard "),  # the store fits, the synthesised shards do not
    ],
    ids=["disk-full", "store-full", "shards-full"],
)
def test_a_full_disk_ends_the_run_with_one_line_naming_where(small_disk, leave_kb, named):
    _fill(small_disk, leave_kb)
    res = _run(small_disk / "w")
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-3000:]  # MLflow's INFO lines aside
    assert errors[0].startswith(f"error: {named}") and str(small_disk) in errors[0]
    assert "rerun the same command" in errors[0]
    assert not list((small_disk / "w").glob("stages/*/result.json"))  # nothing claims to be finished


def test_a_read_only_workdir_is_refused_before_work(small_disk):
    (small_disk / "w").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = _run(small_disk / "w")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (error,) = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert str(small_disk / "w") in error and "not a writable directory" in error

"""Pipeline configuration, planning, cache keys, the workdir lock: fast checks without running stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth.config import ConfigError
from workflows.cli import main
from workflows.config import bundled_pipelines, load_pipeline
from workflows.context import StageResult, Workdir, WorkdirLocked
from workflows.pipeline import Options, PipelineError, plan, stage_keys
from workflows.training import batch_plan

TINY = str(Path(__file__).parent / "pipelines" / "tiny.yaml")


def test_bundled_pipelines_validate():
    assert {"quickstart", "perceive_ir_3task", "perceive_ir_5task", "clearair_allweather"} <= set(bundled_pipelines())
    for name in bundled_pipelines():
        assert load_pipeline(name).name == name


def test_paper_pipelines_test_on_data_that_never_picked_a_checkpoint():
    for name in ("perceive_ir_3task", "perceive_ir_5task", "clearair_allweather"):
        cfg = load_pipeline(name)
        assert "val" not in cfg.evaluate.splits and cfg.evaluate.benchmarks, name
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_pipeline(TINY, {"evaluate.splits": [], "evaluate.benchmarks": []})


def test_unknown_key_names_field_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_pipeline(TINY, {"train.fit.stepz": 3})
    assert "train.fit.stepz" in str(err.value) and "steps" in str(err.value) and "global_batch" in str(err.value)
    with pytest.raises(ConfigError, match="train.loss"):
        load_pipeline(TINY, {"train.loss": "l2"})
    with pytest.raises(ConfigError, match="unknown pipeline 'nope'"):
        load_pipeline("nope")


def test_free_form_sections_are_checked_against_their_schemas_all_at_once(tmp_path, capsys):
    bad = {
        "train.loss_weights.cn": "1",
        "train.model.config.dimm": "8",
        "crossval.model.arch": "nosucharch",
        "synth.recipe": "nonexist",
        "train.priors.source.hidden_sizee": "8",
        "perceiver.perceiver.clipmodel": "x",
    }
    args = [a for k, v in bad.items() for a in ("--set", f"{k}={v}")]
    assert main(["run", TINY, "--workdir", str(tmp_path / "w"), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert "unknown loss_weights ['cn'] for loss 'perceive_ir'; valid: l1, con, clip, dpl" in err
    assert "train.model: unknown field(s) ['dimm']" in err
    assert "crossval.model: unknown architecture 'nosucharch'" in err
    assert "synth.recipe: no bundled recipe 'nonexist'" in err and "Traceback" not in err
    assert "train.priors.source: unknown Dinov2Config fields ['hidden_sizee']; its fields: " in err
    assert "perceiver.perceiver: unknown perceiver config fields ['clipmodel']" in err
    assert not (tmp_path / "w" / "stages").exists()  # refused before any stage
    with pytest.raises(ConfigError, match="evaluate.tile"):
        load_pipeline(TINY, {"evaluate.tile": -3})
    with pytest.raises(ConfigError, match="train.priors kind 'dinoo' is not one of none, dino, clearair"):
        load_pipeline(TINY, {"train.priors.kind": "dinoo"})
    with pytest.raises(ConfigError, match=r"train.priors.regions \(dino_cluster\): unknown keys \['nregions'\]"):
        load_pipeline("clearair_allweather", {"train.priors.regions.nregions": 4})


def test_further_crossval_models_must_be_plain_restorers_that_build():
    models = [{"arch": "nafnet", "preset": "tiny"}, {"arch": "perceive_ir", "preset": "tiny"}, {"arch": "nafnett"}]
    with pytest.raises(ConfigError) as err:
        load_pipeline(TINY, {"crossval.models": models})
    problems = str(err.value)
    assert "crossval.models[0]" not in problems
    assert "crossval.models[1]: 'perceive_ir' needs priors ['dino_cls']; further fold restorers are trained without " \
           "priors: restormer, nafnet" in problems  # fmt: skip
    assert "crossval.models[2]: unknown architecture 'nafnett'" in problems
    cfg = load_pipeline(TINY, {"crossval.models": models[:1]})
    assert stage_keys(cfg)["crossval"] != stage_keys(load_pipeline(TINY, {"crossval.models": []}))["crossval"]


def test_no_further_crossval_models_keep_the_release_crossval_keys():
    release = Path(__file__).parent / "fixtures" / "release-0.1.0"
    for name, keys in json.loads((release / "keys.json").read_text())["keys"].items():
        cfg = load_pipeline(str(release / "pipelines" / f"{name}.yaml"), {"crossval.models": []})
        assert {s: stage_keys(cfg)[s] for s in ("synth", "crossval", "perceiver")} == {
            s: keys[s] for s in ("synth", "crossval", "perceiver")
        }, name


def test_changed_setting_rekeys_that_stage_and_downstream_only():
    a = stage_keys(load_pipeline(TINY))
    b = stage_keys(load_pipeline(TINY, {"perceiver.steps": 7}))
    assert [s for s in a if a[s] != b[s]] == ["perceiver", "priors", "train", "evaluate"]


def test_set_on_a_section_sharing_a_yaml_anchor_changes_that_section_only():
    """The quickstart's crossval and train share `resample` and `priors` through YAML anchors."""
    base = load_pipeline("quickstart")
    cfg = load_pipeline("quickstart", {"train.resample.dehaze": 1, "train.priors.image_size": 28})
    assert cfg.train.resample["dehaze"] == 1 and cfg.train.priors["image_size"] == 28
    assert cfg.crossval.resample == base.crossval.resample and cfg.crossval.priors == base.crossval.priors
    a, b = stage_keys(base), stage_keys(cfg)
    assert [s for s in a if a[s] != b[s]] == ["train", "evaluate"]


def test_dry_run_prints_plan_and_runs_nothing(tmp_path, capsys):
    assert main(["run", TINY, "--dry-run", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in ("synth", "crossval", "perceiver", "priors", "train", "evaluate"))
    assert "2 folds x 1 worker(s)" in out and not (tmp_path / "w" / "stages").exists()


def test_plan_marks_cached_stages_and_from(tmp_path):
    cfg = load_pipeline(TINY)
    wd, keys = Workdir(tmp_path), stage_keys(cfg)
    wd.publish(StageResult("synth", keys["synth"], {"data": "x"}))
    rows = {r["stage"]: r for r in plan(cfg, Options(tmp_path))}
    assert rows["synth"]["cached"] and not rows["synth"]["runs"] and rows["crossval"]["runs"]
    rows = {r["stage"]: r for r in plan(cfg, Options(tmp_path, start_from="synth"))}
    assert rows["synth"]["runs"]
    with pytest.raises(PipelineError, match="unknown stage"):
        plan(cfg, Options(tmp_path, only="bogus"))


def test_second_run_on_a_workdir_is_refused(tmp_path):
    first, second = Workdir(tmp_path), Workdir(tmp_path)
    first.lock()
    try:
        with pytest.raises(WorkdirLocked, match="in use by clearair run pid"):
            second.lock()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


@pytest.mark.parametrize(
    "global_batch,workers,max_worker,expected",
    [
        (8, 4, 8, (2, 1, 1.0)),
        (8, 1, 4, (4, 2, 1.0)),
        (8, 1, 8, (8, 1, 1.0)),
        (4, 16, 8, (1, 1, 4.0)),
        (8, 2, 2, (2, 2, 1.0)),
    ],
)
def test_batch_plan_keeps_global_batch(global_batch, workers, max_worker, expected):
    p = batch_plan(global_batch, workers, max_worker)
    assert (p.per_worker, p.accumulation, p.lr_scale) == expected
    if workers <= global_batch:
        assert p.per_worker * workers * p.accumulation == global_batch


def test_missing_benchmark_layout_fails_before_work(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.txt").write_text("no images")
    code = main(
        [
            "run",
            TINY,
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            f"evaluate.benchmarks=[{{name: b, path: {tmp_path / 'bench'}}}]",
        ]
    )
    assert code == 2 and "benchmark b" in capsys.readouterr().err
    assert not (tmp_path / "w" / "stages").exists()


def test_dead_tracking_server_fails_before_work(tmp_path, capsys):
    code = main(["run", TINY, "--workdir", str(tmp_path / "w"), "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2 and "127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "w" / "stages").exists()


def test_dry_run_prints_each_tasks_share_of_draws_and_the_data_epoch(tmp_path, capsys):
    overrides = ["--set", "train.resample={derain: 3, denoise_15: 0.5}"]
    cfg = load_pipeline(TINY, {"train.resample": {"derain": 3, "denoise_15": 0.5}})
    wd, keys = Workdir(tmp_path), stage_keys(cfg)
    data = tmp_path / "data"
    data.mkdir()
    counts = {"denoise_15": 20, "dehaze": 10, "derain": 10}
    (data / "manifest.json").write_text(json.dumps({"counts": {"task_by_split": {"train": counts}}}))
    wd.publish(StageResult("synth", keys["synth"], {"data": str(data)}))
    assert main(["run", TINY, "--workdir", str(tmp_path), "--dry-run", *overrides]) == 0
    train_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train"))
    # drawn: denoise_15 20 x 0.5 = 10, dehaze 10, derain 10 x 3 = 30 -> 20%, 20%, 60% of a 50-sample data epoch
    assert "dehaze 20%" in train_line and "denoise_15 20%" in train_line and "derain 60%" in train_line
    assert "data epoch 50 samples" in train_line


def test_missing_weights_and_datasets_stop_a_run_before_any_stage_all_listed(tmp_path, capsys):
    workdir = tmp_path / "w"
    bad = ["--set", "synth.sources.0.path=/nope/photos", "--set", "synth.sources.0.layout=folder",
           "--set", "perceiver.perceiver.pretrained=/nope/clip.safetensors"]  # fmt: skip
    for dry in ([], ["--dry-run"]):
        assert main(["run", TINY, "--workdir", str(workdir), *dry, *bad]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 2 and all(line.startswith("error: ") for line in lines) and "Traceback" not in err
        assert "source /nope/photos (--set synth.sources.0.path=DIR): /nope/photos is not a directory" in err
        assert "--set perceiver.perceiver.clip_model=..., perceiver.perceiver.pretrained=...)" in err
        assert "/nope/clip.safetensors" in err
        assert not (workdir / "stages").exists()


def test_a_stage_that_will_not_run_needs_nothing():
    from workflows.doctor import preflight

    cfg = load_pipeline(TINY, {"synth.sources.0.path": "/nope", "synth.sources.0.layout": "folder"})
    assert [c.what for c in preflight(cfg, {"synth"})] == ["source /nope (--set synth.sources.0.path=DIR)"]
    assert preflight(cfg, {"train", "evaluate"}) == []  # synth is cached: its sources are not needed


def test_set_indexes_lists_and_names_a_bad_key():
    cfg = load_pipeline(TINY, {"evaluate.splits.0": "val"})
    assert cfg.evaluate.splits == ["val"]
    with pytest.raises(ConfigError, match="--set evaluate.splits.5: no such place"):
        load_pipeline(TINY, {"evaluate.splits.5": "val"})

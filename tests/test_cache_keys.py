"""Stage cache keys change exactly when a stage's output changes: workdirs made by a release stay cached.

``tests/fixtures/release-0.1.0`` was made by clearair 0.1.0 (before fields could be added without re-keying):
the bundled pipelines as they were then, the stage keys that release computed for them, and the ``result.json``
files of a real run of the tiny test pipeline. Later fields whose defaults keep the old behaviour must leave
all of them valid.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import BaseModel

from synth.config import Strict, added_field, config_digest, digest_dump
from workflows.cli import main
from workflows.config import load_pipeline
from workflows.pipeline import stage_keys

RELEASE = Path(__file__).parent / "fixtures" / "release-0.1.0"
RELEASE_KEYS = json.loads((RELEASE / "keys.json").read_text())["keys"]


# Defaults changed on purpose since the release, each with the override that restores the release's behaviour:
# the stages they feed must re-key at the new default and keep the release's keys under the override.
CHANGED_DEFAULTS = {
    "train.clip_temperature": None,  # raw cosines, as the authors' code (was: CLIP's logit scale)
    "train.select_by": "image_mean",  # the best checkpoint by the task-mean validation PSNR (was: image-weighted)
    "train.con_labels": "task",  # InfoNCE labels by degradation family (was: by task, noise levels repelling)
    "train.con_gather": False,  # InfoNCE negatives from every worker (was: each worker's own batch)
    "train.perceptual.taps": ["relu1_2", "relu2_2", "relu3_3", "relu4_3"],  # the authors' VGG16 taps (was: deeper)
    "train.perceptual.probe_per_task": 0,  # a fixed 24-crop probe per task (was: the first validation batch)
    "train.perceptual.negative_psnr": "image",  # a negative's PSNR on its crop (was: its whole image's)
    "evaluate.memory_budget_mb": None,  # whole images when they fit (was: always tiles of evaluate.tile)
    "evaluate.round_uint8": True,  # metrics on the float output (was: rounded to uint8)
}
DOWNSTREAM = {
    "train": {"train", "evaluate"}, "priors": {"priors", "train", "evaluate"}, "evaluate": {"evaluate"}
}  # fmt: skip
# Keys that were wrong in the release and re-key once: a priors stage that precomputes (clearair_allweather)
# did not hash the train stage's priors spec it computes, so a changed train.priors reused the old priors.
FIXED_KEYS = {"clearair_allweather": DOWNSTREAM["priors"]}


def _release(pipeline: str, overrides: dict | None = None):
    return load_pipeline(str(RELEASE / "pipelines" / f"{pipeline}.yaml"), overrides)


@pytest.mark.parametrize("pipeline", sorted(RELEASE_KEYS))
def test_release_pipelines_keep_their_stage_keys(pipeline: str) -> None:
    fixed = FIXED_KEYS.get(pipeline, set())
    kept = stage_keys(_release(pipeline, CHANGED_DEFAULTS))
    assert {s for s, key in kept.items() if key != RELEASE_KEYS[pipeline][s]} == fixed
    for name in CHANGED_DEFAULTS:  # each new default alone re-keys the stages it feeds, and only those
        keys = stage_keys(_release(pipeline, {k: v for k, v in CHANGED_DEFAULTS.items() if k != name}))
        changed = {stage for stage, key in keys.items() if key != RELEASE_KEYS[pipeline][stage]}
        section, field = name.split(".")[:2]
        acts = field not in getattr(_release(pipeline), section).inert_fields() if section == "train" else True
        assert changed == (DOWNSTREAM[section] if acts else set()) | fixed, (name, changed)


@pytest.mark.parametrize(
    ("pipeline", "override", "stages"),
    [
        ("clearair_allweather", {"train.priors.regions.n_regions": 4}, DOWNSTREAM["priors"]),  # precomputed there
        ("tiny", {"train.priors.image_size": 56}, DOWNSTREAM["train"]),  # on the fly: the priors stage is empty
        ("quickstart", {"train.fit.crop": 64}, {"perceiver", "priors", "train", "evaluate"}),  # its train_crop view
    ],
)
def test_a_setting_another_stage_reads_re_keys_that_stage(pipeline: str, override: dict, stages: set[str]) -> None:
    """The perceiver's ``train_crop`` view reads the training crop and the priors stage computes the train stage's
    priors spec: changing those re-keys the stage that reads them and everything after it, nothing before."""
    name = str(Path(__file__).parent / "pipelines" / "tiny.yaml") if pipeline == "tiny" else pipeline
    before, after = stage_keys(load_pipeline(name)), stage_keys(load_pipeline(name, override))
    assert {s for s in before if before[s] != after[s]} == stages


def test_a_workdir_made_by_the_release_is_fully_cached(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    workdir = tmp_path / "w"
    shutil.copytree(RELEASE / "workdir", workdir)
    pipeline = str(RELEASE / "pipelines" / "tiny.yaml")
    stages = ("synth", "crossval", "perceiver", "priors", "train", "evaluate")

    def dry_run(*overrides: str) -> dict[str, list[str]]:
        assert main(["run", pipeline, "--workdir", str(workdir), "--dry-run", *overrides]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        return {row[0]: row for row in rows if row[:1] and row[0] in stages}

    def sets(prefix: str) -> list[str]:
        pairs = [(k, v) for k, v in CHANGED_DEFAULTS.items() if k.startswith(prefix)]
        return [arg for k, v in pairs for arg in ("--set", f"{k}={'null' if v is None else v}")]

    release = sets("")
    rows = dry_run(*release)
    assert len(rows) == 6 and all(row[2:4] == ["yes", "skip"] for row in rows.values()), rows
    rows = dry_run(*sets("train."))  # the new evaluation defaults evaluate again, and nothing else
    assert {name for name, row in rows.items() if row[2:4] != ["yes", "skip"]} == DOWNSTREAM["evaluate"], rows
    rows = dry_run()  # the new training defaults train again, and only what that feeds
    assert {name for name, row in rows.items() if row[2:4] != ["yes", "skip"]} == DOWNSTREAM["train"], rows


class _Before(Strict):
    steps: int = 10
    inner: dict = {}


class _Inner(Strict):
    factor: float = added_field(1.0)


class _After(Strict):
    steps: int = 10
    inner: dict = {}
    mode: str = added_field("old")
    nested: _Inner = added_field(_Inner())  # a whole section added later
    later_default: str = added_field("new", neutral="old")  # its default changed after it was added


def _key(model: BaseModel) -> str:
    return config_digest(digest_dump(model))


def test_added_fields_enter_the_key_only_away_from_their_neutral_value() -> None:
    before = _key(_Before())
    assert _key(_After(later_default="old")) == before
    assert _key(_After(later_default="old", nested=_Inner(factor=1.0))) == before  # nested neutral values drop too
    assert _key(_After()) != before  # relying on a default that no longer reproduces the old behaviour re-keys
    assert _key(_After(later_default="old", mode="new")) != before
    assert _key(_After(later_default="old", nested=_Inner(factor=2.0))) != before
    assert _key(_After(later_default="old", steps=11)) != _key(_After(later_default="old"))

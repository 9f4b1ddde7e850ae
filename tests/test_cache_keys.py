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


@pytest.mark.parametrize("pipeline", sorted(RELEASE_KEYS))
def test_release_pipelines_keep_their_stage_keys(pipeline: str) -> None:
    cfg = load_pipeline(str(RELEASE / "pipelines" / f"{pipeline}.yaml"))
    assert stage_keys(cfg) == RELEASE_KEYS[pipeline]


def test_a_workdir_made_by_the_release_is_fully_cached(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    workdir = tmp_path / "w"
    shutil.copytree(RELEASE / "workdir", workdir)
    assert main(["run", str(RELEASE / "pipelines" / "tiny.yaml"), "--workdir", str(workdir), "--dry-run"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] and line.split()[0]
            in ("synth", "crossval", "perceiver", "priors", "train", "evaluate")]
    assert len(rows) == 6
    assert all(row[2:4] == ["yes", "skip"] for row in rows), rows


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

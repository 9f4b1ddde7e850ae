"""Quality scores (clearair.scoring) and ``clearair score``: one line per image, bad files named, none lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clearair.models.perceiver import PerceiverConfig, build_perceiver
from clearair.scoring import Scored, grid_crops, grid_origins, tier_report
from tests.conftest import textured
from workflows.cli import main


def test_the_crop_grid_covers_the_image_evenly() -> None:
    assert grid_origins(100, 48, 2) == [0, 52]
    img = np.zeros((100, 300, 3), np.uint8)
    crops = grid_crops(img, 48)
    assert len(crops) == 2 * 4 and all(c.shape == (48, 48, 3) for c in crops)  # 2 rows; at most 4 columns
    assert [c.shape for c in grid_crops(np.zeros((30, 40, 3), np.uint8), 48)] == [(30, 30, 3)]


def _scored(task: str, key: str, p_high: list[float]) -> list[Scored]:
    """Three tier images of one sample whose P(high) are ``p_high`` (low, medium, high)."""
    return [Scored(task, key, t, np.array([(1 - p) / 2, (1 - p) / 2, p])) for t, p in enumerate(p_high)]


def test_tier_report_counts_wins_and_rank_correlation() -> None:
    scored = _scored("derain", "a", [0.1, 0.5, 0.9]) + _scored("derain", "b", [0.6, 0.3, 0.2])
    report = tier_report(scored)
    assert report["derain.win"] == 0.5  # sample a: clean above its input; sample b: not
    assert -1.0 <= report["derain.spearman"] < 1.0
    perfect = tier_report(_scored("x", "a", [0.1, 0.5, 0.9]) + _scored("x", "b", [0.2, 0.4, 0.8]))
    assert perfect["x.win"] == 1.0 and perfect["x.spearman"] > 0.95  # as high as tied tier ranks allow


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.qclip())
    return perceiver.save_prompts(tmp_path / "prompts.safetensors", view={"view": "train_crop", "crop": 48})


def test_score_prints_one_line_per_image_and_names_bad_files(prompts, tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray(textured(96, 120, len(name))).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    Image.fromarray(textured(64, 64, 9)).save(tmp_path / "c.png")
    code = main(["score", str(folder), str(tmp_path / "c.png"), str(tmp_path / "missing.png"), "--prompts",
                 str(prompts), "--format", "json"])  # fmt: skip
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert sorted(Path(r["path"]).name for r in rows) == ["a.png", "b.jpg", "c.png"]  # every readable file
    for r in rows:
        assert r["score"] == r["probabilities"]["high"] and abs(sum(r["probabilities"].values()) - 1) < 1e-3
    assert "broken.png" in err and "missing.png" in err and "2 of 5 inputs could not be scored" in err


def test_score_csv_has_a_header_and_a_row_per_image(prompts, tmp_path, capsys) -> None:
    Image.fromarray(textured(64, 80, 1)).save(tmp_path / "a.png")
    assert main(["score", str(tmp_path / "a.png"), "--prompts", str(prompts), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,score,tier,p_low,p_medium,p_high" and len(lines) == 2


def test_score_refuses_a_file_that_is_not_a_prompts_file(tmp_path, capsys) -> None:
    bad = tmp_path / "p.safetensors"
    bad.write_bytes(b"\x00" * 16)
    assert main(["score", str(tmp_path), "--prompts", str(bad)]) == 2
    assert "not a safetensors prompts file" in capsys.readouterr().err


def test_score_on_a_device_this_machine_lacks_fails_before_any_image(prompts, tmp_path, capsys) -> None:
    Image.fromarray(textured(64, 80, 1)).save(tmp_path / "a.png")
    device = "tpu" if torch.cuda.is_available() else "cuda"
    assert main(["score", str(tmp_path), "--prompts", str(prompts), "--device", device]) == 2
    captured = capsys.readouterr()
    assert f"device {device!r}" in captured.err and captured.out == ""


def test_the_wellposed_report_scores_exactly_the_tiers_whose_medium_beats_low(tmp_path) -> None:
    """``perceiver.wellposed_gain``: the held-out report adds the samples whose first medium tier is that many dB
    above the low one, and nothing else changes."""
    from clearair.data import whole_images
    from clearair.scoring import score_tier_samples
    from synth.tiers import medium_gains, write_tier_shard
    from workflows.prompts import heldout_report

    rng = np.random.default_rng(0)
    gains = {"a": -2.0, "b": 0.4, "c": 1.0, "d": 3.5}  # a restoration worse than its input, barely better, ...
    samples = []
    for i, (key, gain) in enumerate(gains.items()):
        low, medium, high = (rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3))
        psnr = {"low": 20.0, "medium": 20.0 + gain, "medium1": 19.0}  # the second medium is not what counts
        samples.append((low, [medium, low], high, {"key": key, "task": ("derain", "dehaze")[i % 2], "psnr": psnr}))
    url = str(tmp_path / "test-000000.tar")
    write_tier_shard(url, samples)
    assert sum((medium_gains(s[3]) for s in samples), []) == pytest.approx([x for g in gains.values() for x in (g, -1)])
    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.tiny()).eval()

    plain = heldout_report(perceiver, [url], None, tmp_path)
    assert plain and not any(k.startswith("heldout_wellposed/") for k in plain)
    report = heldout_report(perceiver, [url], None, tmp_path, min_gain=1.0)
    assert report["heldout_wellposed/samples"] == 2.0  # c (exactly 1 dB) and d
    posed = [s for s in score_tier_samples(perceiver, list(whole_images([url])), None) if s.key in "cd"]
    expected = tier_report(posed)
    assert {k.removeprefix("heldout_wellposed/"): v for k, v in report.items() if k.startswith("heldout_wellposed/")
            and k != "heldout_wellposed/samples"} == expected  # fmt: skip
    assert {k: v for k, v in report.items() if not k.startswith("heldout_wellposed/")} == plain

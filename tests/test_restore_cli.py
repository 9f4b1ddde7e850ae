"""``clearair restore`` on folders of user images: naming, one bad file, resuming, and refusals before any work."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clearair.export import export_model
from clearair.models.factory import build_model
from synth.imageio import load_rgb
from workflows.cli import main
from workflows.restore import RestoreError, plan_outputs


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_model(build_model("restormer", preset="tiny"), tmp_path_factory.mktemp("m") / "model")


def _photo(path: Path, seed: int, size=(24, 40)) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def test_outputs_keep_subfolders_and_colliding_names_keep_their_suffix(tmp_path):
    photos = tmp_path / "photos"
    for rel in ("a.png", "a.jpg", "sub/b.png", "sub/c.tif", "notes.txt"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"x")
    out = tmp_path / "out"
    planned, missing = plan_outputs([photos, tmp_path / "elsewhere" / "b.png", tmp_path / "nope.png"], out)
    got = {str(src.relative_to(tmp_path)): str(dst.relative_to(out)) for src, dst in planned}
    assert got == {
        "photos/a.jpg": "a.jpg.png",
        "photos/a.png": "a.png.png",
        "photos/sub/b.png": "sub/b.png",
        "photos/sub/c.tif": "sub/c.png",
        "elsewhere/b.png": "b.png",
    }
    assert missing == [(tmp_path / "nope.png", "no such file or folder")]
    twice, _ = plan_outputs([photos / "a.png", photos / "a.png"], out)  # the same name given twice: two outputs
    assert [d.name for _, d in twice] == ["a.png.png", "a.png.2.png"]


def test_an_output_that_would_replace_an_input_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(RestoreError, match=r"overwrite the input .*a\.png"):
        plan_outputs([tmp_path], tmp_path)
    (tmp_path / "restored").mkdir()
    (tmp_path / "restored" / "a.png").write_bytes(b"x")  # an earlier run's output inside the input folder
    planned, _ = plan_outputs([tmp_path], tmp_path / "restored")
    assert planned == [(tmp_path / "a.png", tmp_path / "restored" / "a.png")]


def test_one_bad_image_is_listed_and_the_others_are_restored_then_resumed(model, tmp_path, capsys):
    photos, out = tmp_path / "photos", tmp_path / "out"
    good = _photo(photos / "good.png", 0)
    _photo(photos / "deep" / "other.jpg", 1, size=(33, 17))
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc = main(["restore", str(model), str(photos), "--out", str(out), "--tile", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.png" in captured.err and "1 of 3 inputs could not be restored" in captured.err
    restored, _ = load_rgb(out / "good.png")
    assert restored.shape == good.shape and not np.array_equal(restored, good)  # the model ran on it
    assert load_rgb(out / "deep" / "other.png")[0].shape == (33, 17, 3)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["good.png", "other.png"]  # no temp files

    os.utime(out / "good.png", (1, 1))
    (photos / "broken.png").unlink()
    rc = main(["restore", str(model), str(photos), "--out", str(out), "--skip-existing", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.count("(already there)") == 2
    assert (out / "good.png").stat().st_mtime == 1  # left as it was


@pytest.mark.parametrize("blocker", ["out_is_a_file", "parent_is_a_file"])
def test_an_unwritable_output_folder_fails_before_any_image(model, tmp_path, capsys, blocker):
    _photo(tmp_path / "in" / "a.png", 0)
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / "file" if blocker == "out_is_a_file" else tmp_path / "file" / "out"
    rc = main(["restore", str(model), str(tmp_path / "in"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot write to the output folder {out}" in err
    assert ("not a folder" in err) and (tmp_path / "file").read_text() == "in the way"


def test_a_bad_model_device_or_empty_input_fails_before_the_output_folder_is_made(model, tmp_path, capsys):
    _photo(tmp_path / "in" / "a.png", 0)
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "in"), "--device", "tpu"], "device 'tpu'"),
        ([str(tmp_path / "in"), "--device", "cuda:7"] if not torch.cuda.is_available() else None, "CUDA"),
        ([str(tmp_path / "nothing-here")], "no image files among the inputs"),
    ]
    for args, message in [c for c in cases if c[0]]:
        rc = main(["restore", str(model), *args, "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
    rc = main(["restore", str(tmp_path / "in"), str(tmp_path / "in"), "--out", str(out), "--no-progress"])
    assert rc == 2 and "is not a ClearAIR export (no config.json" in capsys.readouterr().err
    assert not out.exists()

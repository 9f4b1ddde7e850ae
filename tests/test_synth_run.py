"""Synthesis end to end on a real local Ray: determinism, resume, manifests, bad inputs, readers."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.config import validate_config
from synth.read import ShardFormatError, iter_shard, shard_paths
from synth.replay import replay
from synth.run import RunOptions, SynthError, synthesize
from tests.conftest import textured
from tests.test_sources import write_bad_inputs


def config(src: Path | list[Path], out: Path, **kw):
    sources = [{"path": str(s)} for s in (src if isinstance(src, list) else [src])]
    base = {
        "sources": sources,
        "recipe": "mixed",
        "out": str(out),
        "seed": 7,
        "samples_per_shard": 5,
        "patch_size": 48,
        "variants": 2,
        "splits": {"folds": 2, "val_fraction": 0.15, "test_fraction": 0.15},
    }
    base.update(kw)
    return validate_config(base)


def run(cfg, workers=2, **kw):
    return synthesize(cfg, RunOptions(num_workers=workers, progress=False, **kw))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_identical_shards_with_one_and_two_workers(ray_session, photo_dir, tmp_path):
    m1 = run(config(photo_dir, tmp_path / "a"), workers=1)
    m2 = run(config(photo_dir, tmp_path / "b"), workers=2)
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert a == b and len(a) >= 4
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert m1["samples"] == 24 and m1["format_version"] == 1 and m1["config_digest"]
    assert set(m1["counts"]["split"]) <= {"train", "val", "test"} and (tmp_path / "a" / "contact_sheet.png").exists()


def test_shards_grouped_by_split_and_fold_with_metadata(ray_session, photo_dir, tmp_path):
    out = tmp_path / "ds"
    manifest = run(config(photo_dir, out))
    names = [s["name"] for s in manifest["shards"]]
    assert any(n.startswith("train-f0-") for n in names) and any(n.startswith("train-f1-") for n in names)
    groups: dict[str, set] = {}
    for shard in manifest["shards"]:
        for s in iter_shard(out / "shards" / shard["name"]):
            meta = s["meta"]
            assert "." not in s["key"] and meta["split"] == shard["split"] and meta["fold"] == shard["fold"]
            assert s["lq"].shape == s["gt"].shape and meta["degradations"] and meta["recipe"] == "mixed"
            groups.setdefault(meta["source"]["gt_sha256"], set()).add((meta["split"], meta["fold"]))
    assert all(len(v) == 1 for v in groups.values())  # every variant of a photo in one split and fold


def test_rerun_skips_done_and_refuses_other_config(ray_session, photo_dir, tmp_path):
    out = tmp_path / "ds"
    run(config(photo_dir, out))
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    run(config(photo_dir, out))
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    with pytest.raises(SynthError, match="another config"):
        run(config(photo_dir, out, seed=8))
    m = run(config(photo_dir, out, seed=8), overwrite=True)
    assert m["config"]["seed"] == 8


def test_extend_with_new_source_keeps_existing_shards(ray_session, photo_dir, tmp_path):
    out = tmp_path / "ds"
    run(config(photo_dir, out))
    before = shard_bytes(out)
    extra = tmp_path / "extra"
    extra.mkdir()
    for p in sorted(photo_dir.glob("img0[3-5].*")):
        p.rename(extra / p.name)  # moved files are the same content: nothing is planned twice
    Image.fromarray(textured(128, 128, 99)).save(extra / "new.png")
    m = run(config([photo_dir, extra], out))
    after = shard_bytes(out)
    assert all(after[name] == data for name, data in before.items())
    assert m["samples"] == 24 + 2 and len(after) > len(before)


def test_bad_inputs_listed_and_run_completes(ray_session, tmp_path):
    write_bad_inputs(tmp_path / "bad")
    m = run(config(tmp_path / "bad", tmp_path / "ds", patch_size=32))
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert {"corrupt.png", "truncated.jpg", "notes.txt", "tiny.png", "grey_copy.png"} <= set(reasons)
    assert reasons["truncated.jpg"].startswith(("cannot decode", "cannot read image header"))
    assert m["samples"] == 2 * 6  # grey, alpha, sixteen, cmyk, rotated, full; two variants each


def test_replay_regenerates_identical_sample(ray_session, photo_dir, tmp_path):
    out = tmp_path / "ds"
    m = run(config(photo_dir, out))
    key = next(iter_shard(out / "shards" / m["shards"][-1]["name"]))["key"]
    r = replay(out, key)
    assert r.identical and np.array_equal(r.stored["lq"], r.regenerated["lq"])


def test_on_the_fly_equals_materialized_at_epoch_zero(ray_session, photo_dir, tmp_path):
    from synth.recipes import load_recipe

    run(config(photo_dir, tmp_path / "m"))
    run(config(photo_dir, tmp_path / "f", mode="on_the_fly"))
    recipe = load_recipe("mixed")
    mat = {s["key"]: s for p in shard_paths(tmp_path / "m", "train") for s in iter_shard(p)}
    fly = training_batches(tmp_path / "f", recipe=recipe, epoch=0)
    fly_mat = training_batches(tmp_path / "m", recipe=recipe, epoch=0)
    assert len(fly) == len(mat) and all(np.array_equal(a["lq"], b["lq"]) for a, b in zip(fly, fly_mat, strict=True))
    later = training_batches(tmp_path / "f", recipe=recipe, epoch=1)
    assert any(not np.array_equal(a["lq"], b["lq"]) for a, b in zip(fly, later, strict=True))


def training_batches(out: Path, **kw) -> list[dict]:
    """One-sample training batches of a dataset's train split, in shard order."""
    from clearair.data import TaskIndex, restoration_loader

    tasks = TaskIndex(json.loads((out / "manifest.json").read_text())["counts"]["task"])
    return list(restoration_loader(shard_paths(out, "train"), 48, 1, tasks, shuffle=0, **kw))


def test_training_reader_two_crops_and_no_pickle(ray_session, photo_dir, tmp_path):
    out = tmp_path / "ds"
    run(config(photo_dir, out))
    ex = training_batches(out)[0]
    assert ex["lq"].shape == ex["lq2"].shape == (1, 3, 48, 48) and not np.array_equal(ex["lq"], ex["lq2"])
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, data in (
            ("k.gt.png", (out / "contact_sheet.png").read_bytes()),
            ("k.json", b"{}"),
            ("k.pyd", b"cos\nsystem\n(S'echo pwned'\ntR."),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardFormatError, match="k.pyd|pyd"):
        list(iter_shard(evil))


def test_readonly_output_fails_before_work(tmp_path, photo_dir):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        with pytest.raises(SynthError, match="not writable"):
            run(config(photo_dir, mnt / "ds"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_stops_cleanly_then_resumes(ray_session, tmp_path, photo_dir):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        with pytest.raises(SynthError, match="No space left|free space"):
            run(config(photo_dir, mnt / "ds", variants=4))
        shards = list((mnt / "ds" / "shards").iterdir())
        assert not any(
            p.name.endswith(".tar") and not (mnt / "ds" / "state" / (p.stem + ".json")).exists() for p in shards
        )
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        m = run(config(photo_dir, mnt / "ds", variants=4))
        ref = run(config(photo_dir, tmp_path / "ref", variants=4))
        assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_manifest_is_valid_json_with_required_fields(ray_session, photo_dir, tmp_path):
    run(config(photo_dir, tmp_path / "ds"))
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert {"shards", "counts", "skipped", "config", "config_digest", "clearair_version", "format_version"} <= set(m)
    assert all({"name", "sha256", "samples"} <= set(s) for s in m["shards"])
    assert set(m["counts"]) >= {"degradation", "severity", "task"}


@pytest.mark.parametrize("case", ["unknown recipe", "python tag in config", "python tag in recipe", "config a list"])
def test_bad_synth_input_is_one_error_line_naming_it(case, tmp_path, capsys):
    from workflows.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(textured(64, 64, 0)).save(photos / "a.png")
    config, recipe = tmp_path / "synth.yaml", tmp_path / "recipe.yaml"
    config.write_text({"python tag in config": "recipe: !!python/object/apply:os.system [echo]\n",
                       "config a list": "- 1\n- 2\n"}.get(case, "seed: 1\n"))  # fmt: skip
    recipe.write_text("name: r\nsteps: !!python/name:os.system\n")
    name = {"unknown recipe": "nonexist", "python tag in recipe": str(recipe)}.get(case, "denoise")
    argv = ["synth", "--source", str(photos), "--recipe", name, "--out", str(tmp_path / "out"), "--config", str(config)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    named = {"unknown recipe": "no bundled recipe 'nonexist'", "python tag in recipe": str(recipe)}
    assert named.get(case, str(config)) in err
    assert not (tmp_path / "out" / "shards").exists()

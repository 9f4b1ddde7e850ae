"""Shard integrity on read: manifest sha256 checked once per shard and process, and every undecodable member named
by shard, sample and member. Real shards from the synth writer (no Ray) and real tier shards from crossval."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clearair.data import TaskIndex, restoration_loader, whole_images
from synth import read, storage
from synth.config import validate_config
from synth.read import ShardFormatError, ShardURL, iter_raw, iter_shard, shard_paths
from synth.recipes import load_recipe
from synth.run import build_manifest, check_writable, plan
from synth.tiers import tier_shard_paths
from synth.writer import write_shard, write_tar
from tests.conftest import textured
from tests.test_lightning import tier_sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A synthesised dataset (3 train shards of 2 samples), written by the synth writer and manifest code."""
    root = tmp_path_factory.mktemp("integrity")
    src, out = root / "photos", root / "ds"
    src.mkdir()
    for i in range(6):
        Image.fromarray(textured(64, 80, i)).save(src / f"p{i}.png")
    cfg = validate_config(
        {
            "sources": [{"path": str(src)}],
            "recipe": "mixed",
            "out": str(out),
            "seed": 3,
            "samples_per_shard": 2,
            "patch_size": 48,
            "variants": 1,
            "splits": {"folds": 1, "val_fraction": 0.0, "test_fraction": 0.0},
        }
    )
    recipe = load_recipe(cfg.recipe)
    check_writable(str(out))
    pending, skipped = plan(cfg, recipe, str(out), {})
    states = {s.name: write_shard(s, cfg, recipe, str(out)) for s in pending}
    storage.write_json(str(out / "manifest.json"), build_manifest(cfg, recipe, states, skipped))
    return out


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    """A fresh copy of the dataset per test: new locations, so the process memo starts empty for them."""
    return Path(shutil.copytree(dataset, tmp_path / "ds"))


def flip_byte(path: str, offset: int = 600) -> str:
    """Flip one byte inside the first member's data (past its 512-byte tar header); returns the new sha256."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    return hashlib.sha256(data).hexdigest()


def tasks_of(root: Path) -> TaskIndex:
    return TaskIndex(json.loads((root / "manifest.json").read_text())["counts"]["task"])


def test_a_flipped_byte_is_refused_naming_shard_hashes_and_manifest(copy):
    urls = shard_paths(copy, "train")
    assert len(urls) == 3 and all(isinstance(u, ShardURL) and len(u.sha256) == 64 for u in urls)
    actual = flip_byte(urls[0])
    with pytest.raises(ShardFormatError, match="sha256") as err:
        next(iter_raw(urls[0]))  # local: refused before the first sample
    for part in (str(urls[0]), urls[0].sha256, actual, str(copy / "manifest.json")):
        assert part in str(err.value)
    assert all(list(iter_shard(u)) for u in urls[1:])  # the other shards still read
    with pytest.raises(ShardFormatError, match=f"{urls[0]}: sha256 mismatch"):
        list(restoration_loader(urls, 32, 2, tasks_of(copy), shuffle=0))  # the training reader stops


def test_each_shard_is_hashed_once_per_process(copy):
    urls = shard_paths(copy, "train")
    loader = restoration_loader(urls, 32, 2, tasks_of(copy), shuffle=4)
    first, second = list(loader), list(loader)  # two epochs
    assert len(first) == len(second) == 3
    assert [read.shards_hashed[str(u)] for u in urls] == [1, 1, 1]
    other = ShardURL(str(urls[0]), "0" * 64, "elsewhere/manifest.json")  # the memo is per (url, sha256)
    with pytest.raises(ShardFormatError, match="elsewhere/manifest.json lists 0000"):
        next(iter_raw(other))


def test_the_hash_travels_with_the_url(copy):
    url = shard_paths(copy, "train")[0]
    again = pickle.loads(pickle.dumps(url))
    assert again == url and (again.sha256, again.manifest) == (url.sha256, url.manifest)
    loader = restoration_loader([url], 32, 1, tasks_of(copy))
    assert loader.dataset.urls[0].sha256 == url.sha256
    assert type(storage.name(url)) is str and json.loads(json.dumps([url])) == [str(url)]


def test_a_bare_tar_reads_unchecked(copy, tmp_path):
    bare = tmp_path / "bare.tar"
    shutil.copyfile(shard_paths(copy, "train")[1], bare)
    assert [s["shard"] for s in iter_shard(bare)] == [str(bare)] * 2
    flip_byte(str(bare), offset=bare.stat().st_size - 1)  # in the end-of-archive padding: no check, still a tar
    assert len(list(iter_raw(str(bare)))) == 2 and read.shards_hashed[str(bare)] == 0


def test_a_streamed_object_is_checked_before_its_last_sample(copy, s3_bucket):
    url = shard_paths(copy, "train")[0]
    remote = f"{s3_bucket}/ds/shards/{storage.name(url)}"
    flip_byte(url)
    storage.put_file(url, remote)
    samples = []
    with pytest.raises(ShardFormatError, match="sha256 mismatch.*1 of its samples were already read"):
        for raw in iter_raw(ShardURL(remote, url.sha256, f"{s3_bucket}/ds/manifest.json")):
            samples.append(raw["__key__"])
    assert len(samples) == 1  # the second (last) sample is held back until the hash is known


def test_tier_manifests_from_crossval_carry_hashes(copy, tmp_path):
    from workflows.folds import restore_fold
    from workflows.stages.crossval import fold_tier_manifest

    class Identity:
        def restore(self, img, tile=None, overlap=0):
            return img

    tiers = str(tmp_path / "tiers")
    shards = restore_fold([Identity()], shard_paths(copy, "train"), tiers, 0, None, 0)
    record = {"fold": 0, "trained_on": [], "restored": [], "psnr_low": 0, "psnr_medium": 0, "val_psnr": 0}
    manifest = fold_tier_manifest([{**record, "tier_shards": shards}], "digest", ["identity"])
    storage.write_json(storage.join(tiers, "manifest.json"), manifest)
    urls = tier_shard_paths(tiers)
    assert len(urls) == 3 and tier_shard_paths(tiers, heldout=True) == []
    assert [u.sha256 for u in urls] == [storage.sha256(u) for u in urls]
    flip_byte(urls[2])
    with pytest.raises(ShardFormatError, match=f"{urls[2]}: sha256 mismatch"):
        list(whole_images(urls))
    for entry in manifest["shards"]:
        del entry["sha256"]  # an old tier set without hashes is read unchecked
    storage.write_json(storage.join(tiers, "manifest.json"), manifest)
    assert all(u.sha256 is None for u in tier_shard_paths(tiers))
    assert len(list(iter_raw(tier_shard_paths(tiers)[2]))) == 2


def _npy(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)
    return buf.getvalue()


def _synth_sample(key: str) -> list[tuple[str, bytes]]:
    from synth.imageio import encode_png

    img = textured(48, 48, 0)
    return [(f"{key}.gt.png", encode_png(img, 1)), (f"{key}.json", b"{}"), (f"{key}.lq.png", encode_png(img, 1))]


BROKEN = {
    "pickled depth": ("k.depth.npy", _npy(np.array([{"a": 1}], dtype=object)), "pickled arrays are refused for safety"),
    "pickled prior": ("k.prior.clip.npy", pickle.dumps([1, 2]), "pickled arrays are refused for safety"),
    "corrupt png": ("k.gt.png", b"\x89PNG\r\n\x1a\nnot really", "not a decodable PNG"),
    "empty png": ("k.lq.png", b"", "not a decodable PNG"),
    "bad json": ("k.json", b'{"task": ', "not valid JSON"),
    "json not an object": ("k.json", b"[1, 2]", "is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_member_names_shard_key_and_member(case, tmp_path):
    member, data, reason = BROKEN[case]
    members = dict(_synth_sample("k")) | {member: data}
    path = tmp_path / "broken.tar"
    write_tar(path, sorted(members.items()))
    with pytest.raises(ShardFormatError, match=reason) as err:
        list(whole_images([str(path)]))
    assert str(path) in str(err.value) and "sample k" in str(err.value)
    if "not a JSON object" not in reason:
        assert repr(member.split(".", 1)[1]) in str(err.value)


def test_a_broken_tier_member_names_shard_key_and_member(tmp_path):
    members = dict(tier_sample("t0", "denoise", np.random.default_rng(0))) | {"t0.medium.png": b"junk"}
    path = tmp_path / "tiers.tar"
    write_tar(path, sorted(members.items()))
    with pytest.raises(ShardFormatError, match=rf"shard {path}: sample t0, member 'medium.png': not a decodable"):
        list(whole_images([str(path)]))


def test_an_image_smaller_than_the_crop_names_shard_and_key(copy):
    url = shard_paths(copy, "train")[0]
    key = next(iter_raw(url))["__key__"]
    with pytest.raises(ShardFormatError, match=rf"shard {url}: sample {key}: image \d+x\d+ is smaller than the crop"):
        list(restoration_loader([url], 512, 1, tasks_of(copy), shuffle=0))


def test_tier_shards_and_prior_members_round_trip_through_their_one_home(tmp_path):
    from synth.samples import decode, degraded, raw_members, with_priors
    from synth.tiers import tier_shard_name, write_tier_shard
    from synth.writer import publish_tar

    rng = np.random.default_rng(0)
    images = [tuple(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)) for _ in range(2)]
    samples = [(imgs[0], [imgs[1]], imgs[2], {"key": f"k{i}", "task": "derain", "psnr": {"low": 20.0, "medium": 25.0}})
               for i, imgs in enumerate(images)]  # fmt: skip
    name = tier_shard_name("s3://b/ds/shards/train-000007.tar", 1, "train")
    assert name == "f1-000007.tar" and tier_shard_name("/d/val-000000.tar", 0, "val") == "val-000000.tar"
    path = str(tmp_path / name)
    sha = write_tier_shard(path, iter(samples))
    assert sha == storage.sha256(path)
    raws = list(iter_raw(path))
    for raw, (low, (medium,), high, meta) in zip(raws, samples, strict=True):
        got = decode(raw, path)
        assert got["meta"] == meta and got["priors"] == {}
        assert all(np.array_equal(got[k], v) for k, v in (("lq", low), ("medium", medium), ("gt", high)))
        assert np.array_equal(degraded(raw, path), low)
    prior = np.arange(12, dtype=np.float64).reshape(3, 4)
    with_prior = [with_priors(raw, {"quality": prior}) for raw in raws]
    publish_tar(str(tmp_path / "p.tar"), [m for raw in with_prior for m in raw_members(raw)])
    again = [decode(raw, "p.tar") for raw in iter_raw(tmp_path / "p.tar")]
    assert all(s["priors"]["quality"].dtype == np.float32 and np.array_equal(s["priors"]["quality"], prior)
               for s in again)  # fmt: skip
    with pytest.raises(ValueError, match="prior names"):
        with_priors(raws[0], {"Bad-Name": prior})
    with pytest.raises(ShardFormatError, match="p.tar: sample k0 stores no degraded image"):
        degraded({"__key__": "k0", "gt.png": raws[0]["high.png"], "json": b"{}"}, "p.tar")


def _tier_raw(members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return sorted((f"t0.{name}", data) for name, data in members.items())


def test_several_medium_tiers_are_written_in_member_order_and_read_back(tmp_path):
    from synth.tiers import TIER_VERSION, tier_manifest, write_tier_shard

    rng = np.random.default_rng(0)
    low, first, second, high = (rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(4))
    meta = {"key": "t0", "task": "derain", "psnr": {"low": 20.0, "medium": 25.0, "medium1": 23.0}}
    path = str(tmp_path / "f0-000000.tar")
    write_tier_shard(path, [(low, [first, second], high, meta)])
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names == ["t0.high.png", "t0.json", "t0.low.png", "t0.medium.png", "t0.medium1.png"]
    (got,) = whole_images([path])
    assert np.array_equal(got["medium"], first) and len(got["mediums"]) == 2
    assert all(np.array_equal(a, b) for a, b in zip(got["mediums"], (first, second), strict=True))
    shards = [{"name": "f0-000000.tar", "sha256": "x", "samples": 1, "fold": 0, "split": "train", "rows": [meta]}]
    manifest = tier_manifest(shards, [], "digest", ["restormer/tiny", "nafnet/tiny"])
    assert manifest["format_version"] == TIER_VERSION == 3 and manifest["mediums"] == ["restormer/tiny", "nafnet/tiny"]
    assert manifest["tasks"]["derain"] == {"samples": 1, "psnr_low": 20.0, "psnr_medium": 25.0, "margin": 5.0,
                                           "psnr_medium1": 23.0, "margin1": 3.0}  # fmt: skip
    with pytest.raises(ValueError, match=r"score \[2\] medium tiers, but 1 are described"):
        tier_manifest(shards, [], "digest", ["restormer/tiny"])


def test_a_version_2_tier_sample_with_one_medium_still_decodes(tmp_path):
    path = tmp_path / "v2.tar"
    write_tar(path, sorted(tier_sample("t0", "denoise", np.random.default_rng(0))))  # the members a v2 writer wrote
    (got,) = whole_images([str(path)])
    assert len(got["mediums"]) == 1 and got["mediums"][0] is got["medium"] and got["medium"].shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"medium2.png"}, "has member 'medium2.png' but no 'medium1.png'"),  # a gap
        ({"medium1.png", "medium3.png"}, "has member 'medium3.png' but no 'medium2.png'"),
        ({"medium0.png"}, "has member 'medium0.png'; tier shards hold"),  # junk
        ({"medium01.png"}, "has member 'medium01.png'; tier shards hold"),
        ({"mediumx.png"}, "has member 'mediumx.png'; tier shards hold"),
    ],
)
def test_further_medium_members_are_numbered_without_gaps(extra, message, tmp_path):
    members = {n.split(".", 1)[1]: d for n, d in tier_sample("t0", "denoise", np.random.default_rng(0))}
    members |= {name: members["medium.png"] for name in extra}
    path = tmp_path / "bad.tar"
    write_tar(path, _tier_raw(members))
    with pytest.raises(ShardFormatError, match=rf"shard {path}: sample t0 {message}"):
        list(whole_images([str(path)]))

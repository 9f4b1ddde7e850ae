"""Reading shards safely: only PNG, JSON and NPY (without pickle) members are ever decoded.

:func:`iter_raw` streams the samples of one tar from a local path or an ``s3://`` URI; :func:`iter_shard` decodes
them in order (cross-validation, evaluation, the contact sheet); ``clearair.data`` builds the training and
validation loaders on the same two. For on-the-fly recipes :func:`ensure_lq` degrades the stored GT afresh at
every epoch with the same code and seeds as materialized synthesis, so epoch 0 gives the materialized pixels.

Shards hold whole images (long side capped by ``max_side``), not fixed crops: training draws its crops at read
time, and cross-validation and evaluation restore whole images.

Integrity: :func:`shard_paths` (and :func:`synth.tiers.tier_shard_paths`) return :class:`ShardURL` locations that
carry the sha256 their manifest lists. :func:`iter_raw` checks it once per shard and process (a memo of verified
``(url, sha256)`` pairs): a local file is hashed before its first sample is yielded; an ``s3://`` object is hashed
as its bytes stream through the tar reader and checked before its last sample is yielded, so the samples before
it have been read when a mismatch raises (the reader stops the run; it never goes on past a corrupt shard). A
plain path or string (a tar given by hand) has no expected hash and is read unchecked.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from synth import storage
from synth.degradations import Context, apply_steps
from synth.imageio import BadImage, decode_png
from synth.writer import degrade_clean

SAFE_SUFFIXES = ("gt.png", "lq.png", "json", "depth.npy")
_CHUNK = 1 << 20


class ShardFormatError(ValueError):
    """A shard member that is not one of the safe types or does not decode, a sample without its required members,
    or a shard whose bytes do not match its manifest's sha256; the message names the shard."""


class ShardURL(str):
    """A shard's location (used as the plain string everywhere) with the sha256 its manifest lists and that
    manifest's location; :func:`iter_raw` checks the shard's bytes against it. It survives pickling (Ray tasks,
    DataLoader workers); JSON and string operations give a plain string, which is read unchecked."""

    sha256: str | None
    manifest: str | None

    def __new__(cls, url: str, sha256: str | None = None, manifest: str | None = None) -> ShardURL:
        obj = super().__new__(cls, url)
        obj.sha256, obj.manifest = sha256, manifest
        return obj

    def __reduce__(self):
        return ShardURL, (str(self), self.sha256, self.manifest)


def manifest_urls(manifest: str, shard_dir: str, entries: list[dict]) -> list[ShardURL]:
    """The locations of the manifest ``entries`` under ``shard_dir``, each with the sha256 the entry lists (None
    for manifests that list none, whose shards are read unchecked)."""
    return [ShardURL(storage.join(shard_dir, e["name"]), e.get("sha256"), manifest) for e in entries]


def where(sample: dict[str, Any]) -> str:
    """``shard URL: sample KEY`` of a decoded sample, for error messages."""
    return f"shard {sample.get('shard', '?')}: sample {sample.get('key', '?')}"


def decode_member(name: str, data: bytes, origin: str, key: str) -> Any:
    """One PNG (an RGB array), JSON or NPY (never unpickled) member; one that does not decode is a
    ShardFormatError naming the shard, the sample and the member."""
    at = f"shard {origin}: sample {key}, member {name!r}"
    if name.endswith(".npy"):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            if "pickle" in str(err).lower() or "object arrays" in str(err).lower():
                raise ShardFormatError(f"{at}: pickled arrays are refused for safety (store numeric arrays)") from None
            raise ShardFormatError(f"{at}: not a valid .npy array ({err})") from None
        except (EOFError, OSError) as err:
            raise ShardFormatError(f"{at}: not a valid .npy array ({err or 'empty'})") from None
    if name.endswith(".png"):
        try:
            return decode_png(data)
        except (BadImage, cv2.error) as err:
            raise ShardFormatError(f"{at}: not a decodable PNG ({err})") from None
    try:
        return json.loads(data)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ShardFormatError(f"{at}: not valid JSON ({err})") from None


def decode_sample(raw: dict[str, Any], origin: str = "?") -> dict[str, Any]:
    """Decode a webdataset-style raw sample ({"__key__", "gt.png": bytes, ...}) into arrays and metadata, with
    ``shard`` (``origin``) beside ``key``."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {"key": key, "shard": origin}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        if name not in SAFE_SUFFIXES:
            raise ShardFormatError(f"shard {origin}: sample {key} has member {name!r}; only {SAFE_SUFFIXES} are read")
        value = decode_member(name, data, origin, key)
        out[{"json": "meta", "depth.npy": "depth"}.get(name, name.removesuffix(".png"))] = value
    if "gt" not in out or "meta" not in out:
        raise ShardFormatError(f"shard {origin}: sample {key} lacks gt.png or json")
    if not isinstance(out["meta"], dict):
        raise ShardFormatError(f"shard {origin}: sample {key}, member 'json' is not a JSON object")
    return out


# ----------------------------------------------------------------------------------------------- integrity

_verified: set[tuple[str, str]] = set()  # (url, sha256) pairs this process has checked
shards_hashed: Counter[str] = Counter()  # how often this process hashed each shard (once, thanks to the memo)


class _HashingReader:
    """A read-only stream that hashes the bytes read through it."""

    def __init__(self, stream) -> None:
        self.stream, self.h = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.h.update(data)
        return data

    def drain(self) -> str:
        """Read (and hash) what the tar reader left (end-of-archive padding); the hex digest of all bytes."""
        while self.read(_CHUNK):
            pass
        return self.h.hexdigest()


def _expected(location: str | Path) -> str | None:
    """The sha256 ``location`` must have, or None when it has none or this process already verified it."""
    sha = getattr(location, "sha256", None)
    return sha if sha and (str(location), sha) not in _verified else None


def _settle(location: ShardURL, actual: str, read: int = 0) -> None:
    """Remember a verified shard, or raise a ShardFormatError naming it, both hashes and the manifest."""
    url = str(location)
    shards_hashed[url] += 1
    if actual == location.sha256:
        _verified.add((url, actual))
        return
    note = f"; {read} of its samples were already read, the reader stops here" if read else ""
    raise ShardFormatError(
        f"shard {url}: sha256 mismatch: {location.manifest} lists {location.sha256} but the shard hashes to "
        f"{actual}{note}. It is corrupt or was rewritten after that manifest: recreate it (rerun the stage that "
        f"wrote it)"
    )


def iter_raw(location: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", member: bytes}``) of one tar, streamed from a local path or an
    ``s3://`` URI, grouping consecutive members by key (the part of the name before the first dot). A
    :class:`ShardURL` is checked against its sha256 first (see the module docstring)."""
    url, expected = str(location), _expected(location)
    if expected and not storage.is_remote(url):
        _settle(location, storage.sha256(url))  # local: before any sample (one more read, from the page cache)
        expected = None
    last, count = None, 0
    try:
        with storage.open_read(url) as stream:
            reader = _HashingReader(stream) if expected else stream
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for sample in _group(tar, url):
                    if last is not None:
                        yield last
                        count += 1
                    last = sample
            if expected:
                _settle(location, reader.drain(), count)  # remote: before the last sample
    except tarfile.TarError as err:
        raise ShardFormatError(f"shard {url}: not a readable tar ({err})") from None
    if last is not None:
        yield last


def _group(tar: tarfile.TarFile, url: str) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] = {}
    for info in tar:
        if not info.isfile():
            continue
        key, _, suffix = info.name.partition(".")
        if current and current["__key__"] != key:
            yield current
            current = {}
        current.update({"__key__": key, "__url__": url, suffix: tar.extractfile(info).read()})
    if current:
        yield current


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in stored order."""
    for raw in iter_raw(path):
        yield decode_sample(raw, str(path))


def shard_paths(root: str | Path, split: str, folds: list[int] | None = None) -> list[ShardURL]:
    """Shard files of ``split`` (and, for train, of the given folds) listed in the dataset's manifest, each with
    the sha256 the manifest lists."""
    root = storage.resolve(root)
    path = storage.join(root, "manifest.json")
    shards = storage.read_json(path)["shards"]
    entries = [s for s in shards if s["split"] == split and (folds is None or s["fold"] in folds)]
    return manifest_urls(path, storage.join(root, "shards"), entries)


def ensure_lq(sample: dict[str, Any], recipe, epoch: int) -> dict[str, Any]:
    """Fill ``sample["lq"]`` of an on-the-fly sample by degrading its GT at ``epoch``; stored LQs are kept."""
    meta = sample["meta"]
    if meta.get("mode") != "on_the_fly":
        if "lq" not in sample:
            raise ShardFormatError(f"{where(sample)} has no lq.png and is not an on-the-fly sample")
        return sample
    if recipe is None:
        raise ValueError(f"{where(sample)} is synthesised on the fly: pass the recipe to the reader")

    sample["lq"], sample["degradations"] = degrade_clean(
        sample["gt"], meta["task"], recipe, meta["seed"], meta["key"], meta["variant"], sample.get("depth"), epoch
    )
    return sample


# Degradations a reader may draw anew from the clean image alone (no depth map, no paired source).
RENEWABLE = ("gaussian_noise", "poisson_noise")


def fresh_lq(sample: dict[str, Any], stream: list[int]) -> np.ndarray | None:
    """A new draw of a synthetic noise sample's LQ from its GT: the recorded degradation steps with their recorded
    parameters (the same sigma or peak), new noise from ``stream`` (the caller's seed, key, epoch, repeat). None
    for samples that cannot be redrawn: paired data, or steps other than :data:`RENEWABLE` (haze needs depth)."""
    meta = sample["meta"]
    steps = meta.get("degradations") or []
    if meta.get("origin") != "synthetic" or not steps or any(st["degradation"] not in RENEWABLE for st in steps):
        return None
    lq, _ = apply_steps(sample["gt"], steps, np.random.default_rng(stream), Context())  # recorded params stay fixed
    return lq


def random_crops(
    gt: np.ndarray, lq: np.ndarray, size: int, rng: np.random.Generator, n: int = 1, origin: str = "image"
) -> list[tuple]:
    """``n`` aligned (lq, gt) crops of ``size`` at independent positions, each with a random flip; ``origin``
    (e.g. :func:`where` of the sample) names the image in the error when it is smaller than ``size``."""
    h, w = gt.shape[:2]
    if h < size or w < size:
        raise ShardFormatError(f"{origin}: {w}x{h} is smaller than the crop size {size}")
    crops = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        a, b = lq[y : y + size, x : x + size], gt[y : y + size, x : x + size]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        crops.append((np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return crops


def to_tensor(img: np.ndarray):
    """(H, W, 3) uint8 -> (3, H, W) float32 tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)

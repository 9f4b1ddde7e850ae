"""Finding source images: clean folders, paired datasets in the layouts users already have, and the demo.

One walker serves every layout. A directory whose name says it holds degraded inputs (``hazy``, ``rainy``,
``input``, ``blur``, ``low``, ``synthetic``, ...) and that has a sibling holding the clean targets (``clear``,
``gt``, ``target``, ``sharp``, ``high``, ``original``, ...) forms pairs; a file pairs with the target of the
same stem, of ``norain-X`` for ``rain-X`` (Rain100L), or of the first ``_`` token (RESIDE's
``0001_0.8_0.2.jpg`` -> ``0001.png``). Rain100L's flat ``rain-X``/``norain-X`` directories pair in place. Every
other image is a clean source to which the recipe applies. This covers Rain100L, SOTS/OTS, GoPro, LOL,
Snow100K, PromptIR's ``data/Train`` and ``test`` trees and a generic ``{input,target}`` layout; an explicit
layout only checks that the directory holds what that layout promises.

Identity is content: the sha256 of the file's bytes (of the crop's pixels for the demo), so moving or renaming
files changes neither a sample's key nor its split. A folder may hold a depth map for an image as
``<stem>.depth.npy`` (float, larger = farther) used by the haze model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from synth import storage
from synth.config import DemoConfig, SourceSpec
from synth.imageio import IMAGE_EXTENSIONS, BadImage, fit_long_side, image_size, load_rgb

log = logging.getLogger(__name__)

LQ_DIRS = {
    "hazy": ("clear", "gt", "clean", "original"),
    "rainy": ("gt", "norain", "clean"),
    "input": ("target", "gt", "groundtruth"),
    "blur": ("sharp",),
    "low": ("high", "normal"),
    "synthetic": ("gt", "original", "clear"),
    "lq": ("gt", "hq"),
    "degraded": ("clean", "gt"),
}
TASK_WORDS = (
    ("snow", "desnow"),
    ("haz", "dehaze"),
    ("rain", "derain"),
    ("blur", "deblur"),
    ("low", "lowlight"),
    ("lol", "lowlight"),
    ("nois", "denoise"),
    ("drop", "deraindrop"),
)
TEST_PARTS = ("test", "testing", "eval15", "snow100k-s", "snow100k-l", "test_a", "test_b", "bsd68", "cbsd68")
TRAIN_PARTS = ("train", "training", "our485")
LAYOUT_TASKS = {"rain100l": "derain", "sots": "dehaze", "gopro": "deblur", "lol": "lowlight", "snow100k": "desnow"}
DEMO_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "rocket.jpg",
    "motorcycle_left.png",
)
# The demo's fixed split by photograph (DemoConfig.split_by: photo): natural photos held out for test and
# validation; the others, train, are dealt to the folds by tile count.
DEMO_SPLITS = {"coffee.png": "test", "motorcycle_left.png": "test", "chelsea.png": "val"}


@dataclass(frozen=True)
class SourceItem:
    """One clean image, or one degraded/clean pair, identified by content."""

    dataset: str
    root: str  # the source directory ("skimage" for the demo); metadata stores paths relative to it
    gt: str  # absolute path, or "skimage:<file>#y,x" for a demo crop
    gt_hash: str
    lq: str | None = None
    lq_hash: str | None = None
    task: str | None = None  # set for pairs; clean sources get theirs from the recipe
    split: str | None = None  # official split of the layout, else None (decided by content)
    depth: str | None = None
    fold: int | None = None  # a fold fixed by the source (demo photographs), else decided by content

    @property
    def group(self) -> str:
        """What keeps variants (and all hazy versions of one clean image) in one split and fold."""
        return self.gt_hash

    @property
    def identity(self) -> str:
        """Content id of the sample's input: the LQ file for a pair, the clean image otherwise."""
        return self.lq_hash or self.gt_hash


@dataclass
class Discovery:
    items: list[SourceItem]
    skipped: list[dict[str, str]]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and ".depth." not in path.name


def _walk(root: Path, skipped: list[dict[str, str]]) -> Iterable[tuple[Path, list[str], list[str]]]:
    def onerror(err: OSError) -> None:
        skipped.append({"path": str(err.filename), "reason": f"cannot list folder: {err.strerror}"})

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        dirnames.sort()
        yield Path(dirpath), dirnames, sorted(filenames)


def _gt_candidates(stem: str) -> list[str]:
    names = [stem]
    if stem.startswith("rain-"):
        names.append("no" + stem)
    if "_" in stem:
        names.append(stem.split("_")[0])
    return names


def _task_of(rel: Path, fallback: str) -> str:
    parts = [p.lower() for p in rel.parts if p.lower() not in TRAIN_PARTS]
    text = "/".join(parts)
    for word, task in TASK_WORDS:
        if word in text:
            return task
    return fallback


def _split_of(rel: Path) -> str | None:
    parts = {p.lower() for p in rel.parts}
    if parts & set(TEST_PARTS):
        return "test"
    if parts & set(TRAIN_PARTS):
        return "train"
    return None


def _index_images(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, _, files in os.walk(folder):
        for f in sorted(files):
            p = Path(dirpath) / f
            if is_image(p):
                index.setdefault(p.stem, p)
    return index


def _pair_files(
    lq_files: list[Path], gt_index: dict[str, Path], skipped: list[dict[str, str]]
) -> list[tuple[Path, Path]]:
    pairs = []
    for lq in lq_files:
        gt = next((gt_index[n] for n in _gt_candidates(lq.stem) if n in gt_index), None)
        if gt is None:
            tried = ", ".join(_gt_candidates(lq.stem))
            skipped.append({"path": str(lq), "reason": f"no ground truth found (looked for stems: {tried})"})
        else:
            pairs.append((lq, gt))
    return pairs


def _find_pairs(root: Path, skipped: list[dict[str, str]]) -> tuple[list[tuple[Path, Path]], set[Path]]:
    """All (lq, gt) pairs under ``root`` and the files/dirs they consume."""
    pairs: list[tuple[Path, Path]] = []
    consumed: set[Path] = set()
    for dirpath, dirnames, files in _walk(root, skipped):
        siblings = {d.lower(): d for d in dirnames}
        for lq_name, gt_names in LQ_DIRS.items():
            lq_dir = siblings.get(lq_name)
            gt_dir = next((siblings[g] for g in gt_names if g in siblings), None)
            if lq_dir and gt_dir:
                lq_files = sorted(p for p in (dirpath / lq_dir).rglob("*") if is_image(p))
                pairs += _pair_files(lq_files, _index_images(dirpath / gt_dir), skipped)
                consumed |= {dirpath / lq_dir, dirpath / gt_dir}
        names = {Path(f).stem: dirpath / f for f in files if is_image(dirpath / f)}
        for stem, path in names.items():
            if stem.startswith("rain-") and "no" + stem in names:
                pairs.append((path, names["no" + stem]))
                consumed |= {path, names["no" + stem]}
    return pairs, consumed


def _under(path: Path, consumed: set[Path]) -> bool:
    return path in consumed or any(parent in consumed for parent in path.parents)


def _clean_files(root: Path, consumed: set[Path], skipped: list[dict[str, str]]) -> list[Path]:
    out = []
    for dirpath, _, files in _walk(root, skipped):
        if _under(dirpath, consumed):
            continue
        for f in files:
            p = dirpath / f
            if p in consumed or ".depth." in f:
                continue
            if is_image(p):
                out.append(p)
            else:
                skipped.append({"path": str(p), "reason": f"not an image (extension {p.suffix or 'none'!r})"})
    return out


def _hash_all(paths: list[Path], progress: bool = False, name: str = "") -> dict[Path, str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashed = pool.map(storage.sha256, paths)
        bar = tqdm(hashed, total=len(paths), desc=f"hash {name}", unit="file", disable=not progress or len(paths) < 2)
        return dict(zip(paths, bar, strict=True))


def _depth_for(path: Path) -> str | None:
    depth = path.with_name(path.stem + ".depth.npy")
    return str(depth) if depth.exists() else None


def discover_folder(spec: SourceSpec, skipped: list[dict[str, str]], progress: bool = False) -> list[SourceItem]:
    """Pairs and clean images under one source directory (``progress``: a bar while their bytes are hashed)."""
    root = Path(spec.path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"source {spec.path!r} is not a directory")
    name = spec.name or root.name
    pairs, consumed = _find_pairs(root, skipped) if spec.layout != "folder" else ([], set())
    clean = _clean_files(root, consumed, skipped)
    if spec.layout not in ("auto", "folder") and not pairs and spec.layout != "promptir":
        raise FileNotFoundError(f"source {spec.path!r}: no {spec.layout} pairs found (see synth.sources docs)")
    hashes = _hash_all(sorted({p for pair in pairs for p in pair} | set(clean)), progress, name)
    items = []
    for lq, gt in pairs:
        rel = lq.relative_to(root)
        task = LAYOUT_TASKS.get(spec.layout) or _task_of(rel, fallback=name.lower())
        items.append(SourceItem(name, str(root), str(gt), hashes[gt], str(lq), hashes[lq], task, _split_of(rel)))
    for p in clean:
        rel = p.relative_to(root)
        items.append(SourceItem(name, str(root), str(p), hashes[p], split=_split_of(rel), depth=_depth_for(p)))
    return items


def demo_crops(cfg: DemoConfig) -> list[tuple[str, int, int, np.ndarray]]:
    """(photo, y, x, crop) for every ``cfg.crop`` tile of scikit-image's photos scaled to ``cfg.long_side``."""
    import skimage

    out = []
    for photo in DEMO_PHOTOS:
        img, _ = load_rgb(Path(skimage.data_dir) / photo)
        img, _ = fit_long_side(img, cfg.long_side)
        for y in range(0, img.shape[0] - cfg.crop + 1, cfg.crop):
            for x in range(0, img.shape[1] - cfg.crop + 1, cfg.crop):
                out.append((photo, y, x, np.ascontiguousarray(img[y : y + cfg.crop, x : x + cfg.crop])))
    return out


def discover_demo(cfg: DemoConfig, folds: int = 2) -> list[SourceItem]:
    """The embedded default: tiles of photographs that ship inside scikit-image's wheel."""
    crops = demo_crops(cfg)
    placement = demo_photo_splits(cfg, folds) if cfg.split_by == "photo" else {}
    return [
        demo_item(f"skimage:{photo}#{y},{x}", hashlib.sha256(crop.tobytes()).hexdigest(), *placement.get(photo, ()))
        for photo, y, x, crop in crops
    ]


def demo_photo_splits(cfg: DemoConfig, folds: int) -> dict[str, tuple[str, int | None]]:
    """(split, fold) of every demo photograph under the photo split: :data:`DEMO_SPLITS`, the other photographs
    train, dealt largest first to the fold with the fewest tiles so far (ties to the lower fold)."""
    tiles: dict[str, int] = {}
    for photo, *_ in demo_crops(cfg):
        tiles[photo] = tiles.get(photo, 0) + 1
    placement: dict[str, tuple[str, int | None]] = {p: (s, None) for p, s in DEMO_SPLITS.items() if p in tiles}
    load = [0] * max(folds, 1)
    for photo in sorted(set(tiles) - set(DEMO_SPLITS), key=lambda p: (-tiles[p], p)):
        fold = min(range(len(load)), key=lambda k: (load[k], k))
        load[fold] += tiles[photo]
        placement[photo] = ("train", fold if folds > 1 else None)
    return placement


def demo_item(ref: str, digest: str, split: str | None = None, fold: int | None = None) -> SourceItem:
    """The demo crop ``skimage:<photo>#y,x``; the motorcycle photo comes with a depth map (from its disparity)."""
    depth = "skimage:motorcycle_disp.npz" if ref.startswith("skimage:motorcycle") else None
    return SourceItem("demo", "skimage", ref, digest, split=split, depth=depth, fold=fold)


def load_demo_crop(ref: str, cfg: DemoConfig) -> np.ndarray:
    import skimage

    photo, _, yx = ref.removeprefix("skimage:").partition("#")
    y, x = (int(v) for v in yx.split(","))
    img, _ = load_rgb(Path(skimage.data_dir) / photo)
    img, _ = fit_long_side(img, cfg.long_side)
    return np.ascontiguousarray(img[y : y + cfg.crop, x : x + cfg.crop])


def load_depth(ref: str, gt_ref: str, cfg: DemoConfig) -> np.ndarray:
    """Depth (larger = farther) for ``gt_ref``: a ``.depth.npy`` file, or the demo motorcycle's disparity."""
    if ref.startswith("skimage:"):
        import cv2
        import skimage

        disp = np.load(Path(skimage.data_dir) / ref.removeprefix("skimage:"), allow_pickle=False)
        disp = np.asarray(disp[disp.files[0]], dtype=np.float32)
        depth = 1.0 / np.maximum(np.nan_to_num(disp, nan=0.0), 1.0)
        h, w = disp.shape
        scale = min(1.0, cfg.long_side / max(h, w))
        depth = cv2.resize(depth, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        _, _, yx = gt_ref.partition("#")
        y, x = (int(v) for v in yx.split(","))
        return np.ascontiguousarray(depth[y : y + cfg.crop, x : x + cfg.crop])
    return np.load(ref, allow_pickle=False).astype(np.float32)


def check_size(item: SourceItem, min_side: int) -> str | None:
    """A skip reason if ``item``'s image is unreadable or smaller than ``min_side``, else None."""
    if item.gt.startswith("skimage:"):
        return None
    try:
        w, h = image_size(item.lq or item.gt)
    except BadImage as err:
        return str(err)
    if min(w, h) < min_side:
        return f"smaller than the patch size {min_side} (got {w}x{h})"
    return None


def discover(
    specs: list[SourceSpec], demo: DemoConfig, min_side: int, folds: int = 2, progress: bool = False
) -> Discovery:
    """Every usable item of every source, de-duplicated by content, in a stable order, with what was skipped."""
    skipped: list[dict[str, str]] = []
    found: list[SourceItem] = []
    for spec in specs:
        found += discover_demo(demo, folds) if spec.layout == "demo" else discover_folder(spec, skipped, progress)
    items: list[SourceItem] = []
    seen: dict[tuple[str, str | None], str] = {}
    for item in sorted(found, key=lambda i: (i.dataset, i.lq or i.gt)):
        key = (item.gt_hash, item.lq_hash)
        if key in seen:
            skipped.append({"path": item.lq or item.gt, "reason": f"duplicate of {seen[key]}"})
            continue
        seen[key] = item.lq or item.gt
        reason = check_size(item, min_side)
        if reason:
            skipped.append({"path": item.lq or item.gt, "reason": reason})
            continue
        items.append(item)
    return Discovery(remove_test_leaks(items, skipped), skipped)


def remove_test_leaks(items: list[SourceItem], skipped: list[dict[str, str]]) -> list[SourceItem]:
    """Drop non-test items whose content equals any official test image (input or target), listing each."""
    test = {h: i.lq or i.gt for i in items if i.split == "test" for h in (i.gt_hash, i.lq_hash) if h}
    kept = []
    for item in items:
        hit = next((test[h] for h in (item.gt_hash, item.lq_hash) if h in test), None)
        if item.split != "test" and hit:
            skipped.append({"path": item.lq or item.gt, "reason": f"identical to official test image {hit}"})
            continue
        kept.append(item)
    return kept


def relative(item: SourceItem, path: str | None) -> str | None:
    """``path`` relative to the item's source root, as stored in sample metadata (None stays None)."""
    if path is None or path.startswith("skimage:"):
        return path
    return str(Path(path).relative_to(item.root))

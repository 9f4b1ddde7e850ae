"""``clearair restore`` and ``clearair score``: a trained model or the learned perceiver on user images."""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from clearair.inference import save_image
from clearair.models.perceiver import TIERS, build_perceiver
from clearair.models.pretrained import MissingWeightsError
from clearair.priors import perceiver_config
from clearair.restorer import RestorerLoadError, load_restorer, resolve_device
from clearair.scoring import grid_probabilities, quality_score
from synth import storage
from synth.imageio import IMAGE_EXTENSIONS, BadImage, load_rgb


class RestoreError(RuntimeError):
    """A model, checkpoint, input or output folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class RestoreReport:
    """What ``restore_paths`` did: ``(source, output)`` written, ``(source, output)`` left as they were
    (``skip_existing``), and ``(source, reason)`` for each input that could not be restored."""

    done: list[tuple[Path, Path]]
    skipped: list[tuple[Path, Path]]
    failed: list[tuple[Path, str]]


def plan_outputs(inputs: list[Path], out: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Where each image of ``inputs`` is written under ``out``, and the inputs that do not exist.

    An image inside a given folder keeps its path relative to that folder (``photos/a/b.jpg`` given
    ``photos`` -> ``out/a/b.png``); a file given by name goes to ``out/<stem>.png``. Sources that would share an
    output (``b.jpg`` and ``b.png``, or two files named alike in different folders) all keep their suffix:
    ``b.jpg.png`` and ``b.png.png`` (and, when even that collides, a running number). When ``out`` lies
    inside a given folder, the images already under it are not inputs, so ``--out photos/restored`` can be
    rerun on ``photos``. Raises
    :class:`RestoreError` when an output would replace one of the inputs.
    """
    out_dir = out.resolve()
    found, missing = _walk(inputs)
    planned = []
    for given, f in found:
        if f is given:
            planned.append((f, Path(f.stem)))
        elif out_dir == given.resolve() or not f.resolve().is_relative_to(out_dir):  # earlier outputs: no inputs
            planned.append((f, f.relative_to(given).with_suffix("")))
    counts = Counter(stem for _, stem in planned)
    taken: set[Path] = set()
    outputs = []
    for src, stem in planned:
        name = stem.with_name(f"{stem.name}{src.suffix.lower()}") if counts[stem] > 1 else stem
        dst, n = out / f"{name}.png", 1
        while dst in taken:
            n += 1
            dst = out / f"{name}.{n}.png"
        taken.add(dst)
        outputs.append((src, dst))
    sources = {src.resolve() for src, _ in outputs}
    for src, dst in outputs:
        if dst.resolve() in sources:
            raise RestoreError(
                f"restoring {src} would overwrite the input {dst}: give an --out folder apart from the inputs"
            )
    return outputs, missing


def check_out_folder(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, or raise :class:`RestoreError` saying why."""
    reasons = {
        errno.ENOTDIR: "a file is in the way (a path component is not a folder)",
        errno.EEXIST: "it exists and is not a folder",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "no space left on the device",
    }
    probe = out / f".clearair-write-probe-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as err:
        why = reasons.get(err.errno, err.strerror or type(err).__name__)
        raise RestoreError(f"cannot write to the output folder {out}: {why}") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def restore_paths(
    model: str | Path,
    inputs: list[Path],
    out: Path,
    tile: int | None,
    overlap: int,
    *,
    device: str = "auto",
    precision: str = "auto",
    tracking_uri: str | None = None,
    skip_existing: bool = False,
    progress: bool = True,
) -> RestoreReport:
    """Restore every image of ``inputs`` into ``out`` as PNG (any size: tiled with blending).

    Everything that would stop the whole run is checked before the first image: the model loads, the outputs
    are planned (:func:`plan_outputs`) and the output folder takes a file. After that one bad image never stops
    the others: it is listed in the report's ``failed``. Each output is written under a temporary name and
    renamed, so an interrupted run leaves only whole files, and ``skip_existing`` resumes it.
    """

    planned, failed = plan_outputs(inputs, out)
    if not planned:
        what = f"; {failed[0][0]}: {failed[0][1]}" if failed else ""
        raise RestoreError(f"no image files among the inputs ({', '.join(map(str, inputs))}){what}")
    try:
        restorer = load_restorer(model, device=device, precision=precision, tracking_uri=tracking_uri)
    except RestorerLoadError as err:
        raise RestoreError(str(err)) from None
    check_out_folder(out)
    done, skipped = [], []
    for src, dst in tqdm(planned, desc="restore", unit="image", disable=not progress or len(planned) < 2):
        if skip_existing and dst.is_file():
            skipped.append((src, dst))
            continue
        try:
            img, _ = load_rgb(src)
        except BadImage as err:
            failed.append((src, f"cannot read the image: {err}"))
            continue
        try:
            restored = restorer.restore(img, tile=tile, overlap=overlap)
            dst.parent.mkdir(parents=True, exist_ok=True)
            save_image(dst, restored)
        except (RuntimeError, ValueError, OSError) as err:  # out of memory, a tile the model refuses, a full disk
            failed.append((src, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
            continue
        done.append((src, dst))
    return RestoreReport(done, skipped, failed)


@dataclass(frozen=True)
class Scored:
    """One scored image: P(excellent) as its quality score, its most likely tier, the three probabilities."""

    path: Path
    score: float
    tier: str
    probs: dict[str, float]


def load_scorer(prompts: str | Path, device: str = "auto"):
    """The frozen perceiver of a prompts file on ``device`` (auto: CUDA when there is one) and the crop it scores
    with (the view the prompts learned on)."""
    from safetensors import SafetensorError, safe_open

    try:
        prompts = storage.local_copy(prompts)
    except OSError as err:
        raise RestoreError(f"cannot read prompts {prompts}: {err}") from None
    if not prompts.is_file():
        raise RestoreError(f"prompts file {prompts} not found (the perceiver stage writes prompts.safetensors)")
    try:
        with safe_open(str(prompts), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise RestoreError(f"{prompts} is not a safetensors prompts file: {err}") from None
    if "config" not in meta:
        raise RestoreError(f"{prompts} holds no perceiver config in its metadata: not a clearair prompts file")
    view = json.loads(meta.get("view", "null")) or {"crop": None}  # prompts of 0.1.0: whole images
    try:
        dev = resolve_device(device)
        perceiver = build_perceiver(perceiver_config(json.loads(meta["config"])))
        perceiver.load_prompts(prompts)
    except (MissingWeightsError, ValueError) as err:
        raise RestoreError(str(err)) from None
    return perceiver.to(dev).eval(), view.get("crop")


def score_paths(
    prompts: str | Path, inputs: list[Path], device: str = "auto", progress: bool = True
) -> tuple[list[Scored], list[tuple[Path, str]]]:
    """Quality score, tier and probabilities of every readable image of ``inputs``, and ``(path, reason)`` for
    each one that could not be read. Images are decoded as synthesis decodes them and scored on the crop grid of
    the prompts' view (:func:`clearair.scoring.grid_probabilities`)."""
    perceiver, crop = load_scorer(prompts, device)
    files, failed = image_files_and_missing(inputs)
    rows = []
    for path in tqdm(files, desc="score", unit="image", disable=not progress or len(files) < 2):
        try:
            img, _ = load_rgb(path)
        except BadImage as err:
            failed.append((path, str(err)))
            continue
        probs = grid_probabilities(perceiver, img, crop)
        tier = TIERS[int(probs.argmax())]
        rows.append(Scored(path, quality_score(probs), tier, dict(zip(TIERS, map(float, probs), strict=True))))
    return rows, failed


def image_files_and_missing(inputs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files of ``inputs`` (folders walked, sorted) and the inputs that do not exist."""
    found, missing = _walk(inputs)
    return [f for _, f in found], missing


def _walk(inputs: list[Path]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """``(given input, image file)`` for each file of ``inputs`` (a file given by name is its own input; folders
    walked, sorted), and ``(input, reason)`` for those that do not exist."""
    found, missing = [], []
    for p in inputs:
        if p.is_dir():
            found += [(p, f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_file():
            found.append((p, p))
        else:
            missing.append((p, "no such file or folder"))
    return found, missing

"""A small PNG of LQ/GT pairs, one row per task, for a person to check a dataset at a glance."""

from __future__ import annotations

from synth import storage
from synth.figures import labelled_grid, png_bytes, thumb
from synth.read import ensure_lq, iter_shard
from synth.recipes import Recipe

THUMB = 128


def first_per_task(out: str, manifest: dict, recipe=None) -> dict[str, dict]:
    """The first stored sample of every task (on-the-fly samples are degraded at epoch 0)."""
    tasks = set(manifest["counts"]["task"])
    found: dict[str, dict] = {}
    for shard in manifest["shards"]:
        for sample in iter_shard(storage.join(out, "shards", shard["name"])):
            task = sample["meta"]["task"]
            if task not in found:
                found[task] = ensure_lq(sample, recipe, 0)
            if len(found) == len(tasks):
                return found
    return found


def write_contact_sheet(out: str, manifest: dict) -> str | None:
    """Write ``out/contact_sheet.png`` (rows: task; columns: label, LQ, GT); None for an empty dataset."""
    recipe = Recipe.model_validate(manifest["recipe"])
    samples = first_per_task(out, manifest, recipe)
    if not samples:
        return None
    rows = []
    for task in sorted(samples):
        s = samples[task]
        steps = ", ".join(d["degradation"] for d in s["meta"]["degradations"]) or s["meta"]["origin"]
        label = f"{task}\n{s['meta']['severity']}\n{steps[:60]}"
        rows.append((label, [thumb(s["lq"], THUMB), thumb(s["gt"], THUMB)]))
    path = storage.join(out, "contact_sheet.png")
    storage.write_bytes(path, png_bytes(labelled_grid(rows, ["degraded", "clean"])))
    return path

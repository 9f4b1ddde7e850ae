"""The synthesis driver: validate, plan, fan shards out to Ray, resume, and publish the manifest.

Order of work: the config and recipe are validated and the output is checked writable before anything else;
an output written with another config is refused (unless ``overwrite``); sources are discovered and planned;
shards with a state record are skipped, partial files are removed, and the rest run as one Ray task each
(retried on worker failure). The manifest is written last, atomically: a directory with ``manifest.json`` is
complete. Adding sources to an existing dataset plans only the new samples, in new shards.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections import Counter
from dataclasses import dataclass

from synth import storage
from synth.config import SynthConfig
from synth.contact_sheet import write_contact_sheet
from synth.distribute import run_shards
from synth.errors import SynthError
from synth.plan import ShardSpec, expand, make_shards
from synth.recipes import Recipe, load_recipe
from synth.sources import discover

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "clearair-shards"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RunOptions:
    num_workers: int | None = None  # concurrent shard tasks; None = all CPUs Ray offers
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True
    worker_output: bool = True  # Ray workers' stdout/stderr reach this terminal (off with ``clearair -q``)


def check_writable(out: str) -> None:
    """Fail early, with the reason, if ``out`` cannot hold the dataset (read-only mount, a file in the way,
    a missing bucket or credentials...)."""
    try:
        for sub in ("shards", "state"):
            storage.makedirs(storage.join(out, sub))
        probe = storage.join(out, "state", ".write-probe")
        storage.write_bytes(probe, b"x")
        storage.remove(probe)
    except OSError as err:
        raise SynthError(f"output {out} is not writable: {err.strerror or err}") from None


def read_manifest(out: str) -> dict | None:
    path = storage.join(out, "manifest.json")
    return storage.read_json(path) if storage.exists(path) else None


def check_compatible(cfg: SynthConfig, out: str, overwrite: bool) -> None:
    """Refuse to mix configs in one output; ``overwrite`` clears it instead."""
    previous = read_manifest(out) or _state_config(out)
    if previous is None or previous.get("config_digest") == cfg.digest():
        return
    if not overwrite:
        raise SynthError(
            f"{out} holds a dataset made with another config (digest {previous.get('config_digest', '?')[:12]} vs "
            f"{cfg.digest()[:12]}). Use another --out, or --overwrite to delete it and start again."
        )
    log.warning("overwrite: removing %s", out)
    storage.remove(storage.join(out, "manifest.json"))  # first: without it the output no longer claims completeness
    for sub in ("shards", "state"):
        storage.remove_tree(storage.join(out, sub))
    storage.remove(storage.join(out, "contact_sheet.png"))


def _state_config(out: str) -> dict | None:
    path = storage.join(out, "state", "config.json")
    return storage.read_json(path) if storage.exists(path) else None


def load_states(out: str) -> dict[str, dict]:
    """State records of published shards, by shard stem; a record whose tar is missing or has another size than
    the one recorded does not count (the shard is written again)."""
    states = {}
    shards = storage.file_sizes(storage.join(out, "shards"))  # one listing, not a request per shard
    for entry in storage.listdir(storage.join(out, "state")):
        if not entry.endswith(".json") or entry.startswith(".") or entry in ("config.json", "plan.json"):
            continue
        state = storage.read_json(storage.join(out, "state", entry))
        if state["name"] not in shards or state.get("bytes", shards[state["name"]]) != shards[state["name"]]:
            continue
        states[entry.removesuffix(".json")] = state
    return states


def remove_partials(out: str) -> int:
    """Delete temporary files an interrupted local run left (object stores never hold partial objects)."""
    n = 0
    for sub in ("shards", "state"):
        for entry in storage.listdir(storage.join(out, sub)):
            if entry.startswith(".") and entry.endswith(".partial"):
                storage.remove(storage.join(out, sub, entry))
                n += 1
    return n


def read_plan(out: str) -> dict[str, dict]:
    path = storage.join(out, "state", "plan.json")
    return storage.read_json(path)["shards"] if storage.exists(path) else {}


def plan(
    cfg: SynthConfig, recipe: Recipe, out: str, states: dict[str, dict], progress: bool = False
) -> tuple[list[ShardSpec], list[dict]]:
    """Shards still to write, and what discovery skipped (``progress``: a bar while sources are hashed).

    The first run commits its plan (``state/plan.json``) before any work; a rerun finishes exactly those shards,
    and samples the plan does not hold yet (new sources) go into new shards appended to it.
    """
    found = discover(cfg.sources, cfg.demo, cfg.patch_size, cfg.splits.folds, progress)
    cycle = recipe.task_cycle()
    samples = expand(found.items, cycle, cfg.variants, cfg.splits, cfg.heldout_variants(cycle))
    by_key = {s.key: s for s in samples}
    committed = read_plan(out)
    pending = []
    for name, entry in committed.items():
        if name in states:
            continue
        missing = [k for k in entry["keys"] if k not in by_key]
        if missing:
            raise SynthError(
                f"shard {name} was planned with samples whose sources are gone (e.g. {missing[0]}); "
                f"restore the sources or start again with --overwrite"
            )
        pending.append(ShardSpec(name, entry["split"], entry["fold"], tuple(by_key[k] for k in entry["keys"])))
    new = make_shards(samples, cfg.samples_per_shard, cfg.max_samples, {n: e["keys"] for n, e in committed.items()})
    if new:
        committed |= {s.name: {"split": s.split, "fold": s.fold, "keys": [x.key for x in s.samples]} for s in new}
        storage.write_json(storage.join(out, "state", "plan.json"), {"shards": committed})
    return pending + new, found.skipped


def synthesize(cfg: SynthConfig, options: RunOptions = RunOptions()) -> dict:
    """Run (or resume, or extend) synthesis into ``cfg.out`` and return the manifest."""
    recipe = load_recipe(cfg.recipe)
    out = storage.resolve(cfg.out)
    check_compatible(cfg, out, options.overwrite)
    check_writable(out)
    try:
        return _synthesize(cfg, recipe, out, options)
    except OSError as err:
        if err.filename is None and not err.strerror:
            raise
        raise SynthError(
            f"cannot write to {out}: {err.strerror} ({err.filename}). Finished shards are kept; "
            f"rerun the same command to resume."
        ) from None


def _synthesize(cfg: SynthConfig, recipe: Recipe, out: str, options: RunOptions) -> dict:
    storage.write_json(storage.join(out, "state", "config.json"), {"config_digest": cfg.digest()})
    if n := remove_partials(out):
        log.info("removed %d partial files of an interrupted run", n)
    states = load_states(out)
    pending, skipped = plan(cfg, recipe, out, states, options.progress)
    log.info("%d shards done, %d to write", len(states), len(pending))
    if pending:
        for state in run_shards(pending, cfg, recipe, out, options):
            states[state["name"].removesuffix(".tar")] = state
    manifest = build_manifest(cfg, recipe, states, skipped)

    write_contact_sheet(out, manifest)
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    return manifest


def build_manifest(cfg: SynthConfig, recipe: Recipe, states: dict[str, dict], skipped: list[dict]) -> dict:
    counts: dict[str, Counter] = {k: Counter() for k in ("task", "degradation", "severity", "split")}
    by_split: dict[str, Counter] = {}
    shard_skips = []
    for s in states.values():
        for k in ("task", "degradation", "severity"):
            counts[k].update(s["counts"][k])
        counts["split"][s["split"]] += s["samples"]
        by_split.setdefault(s["split"], Counter()).update(s["counts"]["task"])
        shard_skips += s["skipped"]
    shards = [
        {"name": s["name"], "sha256": s["sha256"], "samples": s["samples"], "split": s["split"], "fold": s["fold"]}
        for _, s in sorted(states.items())
    ]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "clearair_version": package_version(),
        "config": cfg.model_dump(mode="json"),
        "config_digest": cfg.digest(),
        "recipe": recipe.model_dump(mode="json"),
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()}
        | {"task_by_split": {split: dict(sorted(c.items())) for split, c in sorted(by_split.items())}},
        "folds": cfg.splits.folds,
        "skipped": sorted(skipped + shard_skips, key=lambda s: s["path"]),
    }


def package_version() -> str:
    """The installed clearair distribution's version, as the manifest records it (read from its metadata:
    synth does not import the model library, which would load torch into every synthesis driver)."""
    try:
        return importlib.metadata.version("clearair")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"

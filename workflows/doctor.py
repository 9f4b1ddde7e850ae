"""``clearair doctor``: is everything a pipeline needs present, offline, before hours of work start?

:func:`preflight` runs the weight and dataset checks for the stages a ``clearair run`` is about to run (a
cached stage needs nothing), so a missing CLIP model or dataset stops the run before synthesis, not hours
later at the stage that loads it. Each check names the ``--set`` key that points at what it looked for.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from clearair.models import pretrained
from synth import storage
from workflows.config import PipelineConfig
from workflows.evaluation import benchmark_items
from workflows.stages.perceiver import perceiver_config


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def _try(what: str, fn) -> Check:
    try:
        return Check(what, True, fn() or "present")
    except Exception as err:  # each check reports its own failure, the others still run; the whole message
        return Check(what, False, " ".join(str(err).split()))


def _needed(only: set[str] | None, stages: tuple[str, ...]) -> bool:
    return only is None or bool(only & set(stages))


def weight_checks(cfg: PipelineConfig, only: set[str] | None = None) -> list[Check]:
    """Load every pretrained part the pipeline names (those the stages in ``only`` need, when given)."""
    checks = []
    p = perceiver_config(cfg)
    clip_stages = ("perceiver", "train") if cfg.train.loss == "perceive_ir" else ("perceiver",)
    if _needed(only, clip_stages) and (p["pretrained"] or only is None):  # random init: no file to find
        keys = "--set perceiver.perceiver.clip_model=..., perceiver.perceiver.pretrained=..."
        what = f"CLIP {p['clip_model']} ({p['pretrained']}; {keys})"
        checks.append(_try(what, lambda: pretrained.load_open_clip(p["clip_model"], p["pretrained"]) and None))
    priors = cfg.train.priors
    kind = priors.get("kind")
    dino, key = (priors.get("source"), "source") if kind == "dino" else ((priors.get("regions") or {}).get("source"),
                                                                          "regions.source")  # fmt: skip
    if dino is not None and _needed(only, ("priors", "train")):
        what = f"DINOv2 {str(dino)[:60]} (--set train.priors.{key}=DIR)"
        checks.append(_try(what, lambda: pretrained.load_dinov2(dino) and None))
    vgg = cfg.train.vgg
    wants_vgg = cfg.train.loss == "perceive_ir" and (vgg is not None or not cfg.train.allow_random_frozen)
    if wants_vgg and _needed(only, ("train",)):
        what = f"VGG16 ({vgg}; --set train.vgg=FILE)"
        checks.append(_try(what, lambda: pretrained.load_vgg16_features(vgg) and None))
    return checks


def dataset_checks(cfg: PipelineConfig, only: set[str] | None = None) -> list[Check]:
    """Every source folder and benchmark the pipeline names (those the stages in ``only`` need, when given)."""
    checks = []
    for i, src in enumerate(cfg.synth.sources if _needed(only, ("synth",)) else []):
        if src.layout == "demo":
            checks.append(Check("source demo", True, "ships with scikit-image"))
            continue
        path = Path(src.path).expanduser()
        detail = "found" if path.is_dir() else f"{path.resolve()} is not a directory"
        what = f"source {src.path} (--set synth.sources.{i}.path=DIR)"
        checks.append(Check(what, path.is_dir(), detail))
    for i, b in enumerate(cfg.evaluate.benchmarks if _needed(only, ("evaluate",)) else []):
        what = f"benchmark {b.name} (--set evaluate.benchmarks.{i}.path=DIR)"
        checks.append(_try(what, lambda b=b: f"{len(benchmark_items(b.model_dump()))} images"))
    return checks


def preflight(cfg: PipelineConfig, stages: set[str]) -> list[Check]:
    """The failed weight and dataset checks of the parts that ``stages`` (those about to run) need."""
    return [c for c in weight_checks(cfg, stages) + dataset_checks(cfg, stages) if not c.ok]


def storage_check(workdir: str) -> Check:
    """An object-store workdir: can this machine write and read back an object there (bucket, credentials)?"""

    def probe() -> str:
        path = storage.join(workdir, ".doctor-probe")
        storage.write_bytes(path, b"ok")
        ok = storage.read_bytes(path) == b"ok"
        storage.remove(path)
        if not ok:
            raise OSError(f"{path} read back different bytes")
        return "writable"

    return _try(f"storage {workdir}", probe)


def disk_check(cfg: PipelineConfig, workdir: Path) -> Check:
    """Free space against a rough estimate: sources x (variants + 1) x 1.5 for PNG shards, tiers and checkpoints."""
    size = 0
    for src in cfg.synth.sources:
        path = Path(src.path)
        if path.is_dir():
            size += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    need = int(size * (cfg.synth.variants + 1) * 1.5) + 200_000_000
    probe = workdir if workdir.exists() else Path.cwd()
    free = shutil.disk_usage(probe).free
    return Check("disk", free > need, f"{free / 1e9:.1f} GB free at {probe}, about {need / 1e9:.1f} GB needed")


def diagnose(cfg: PipelineConfig, workdir: str, tracking_uri: str | None, ray_address: str | None) -> list[Check]:
    from workflows.tracking import check_tracking, default_tracking_uri

    checks = weight_checks(cfg) + dataset_checks(cfg)
    try:
        uri = tracking_uri or default_tracking_uri(storage.resolve(workdir))
        checks.append(_try(f"tracking {uri}", lambda: check_tracking(uri)))
    except ValueError as err:
        checks.append(Check("tracking", False, str(err)))
    checks.append(_try(f"ray {ray_address or '(local)'}", lambda: _ray_check(ray_address)))
    remote = storage.is_remote(workdir)
    checks.append(storage_check(workdir) if remote else disk_check(cfg, Path(workdir).expanduser().resolve()))
    return checks


def _ray_check(address: str | None) -> str:
    if address is None:
        return "a local Ray will be started (dashboard on 127.0.0.1)"
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        res = ray.cluster_resources()
        return f"{len(ray.nodes())} nodes, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
    finally:
        ray.shutdown()

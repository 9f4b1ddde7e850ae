"""``clearair doctor``: is everything a pipeline needs present, offline, before hours of work start?"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from workflows.config import PipelineConfig


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def _try(what: str, fn) -> Check:
    try:
        return Check(what, True, fn() or "present")
    except Exception as err:  # each check reports its own failure, the others still run
        return Check(what, False, str(err).splitlines()[0][:300])


def weight_checks(cfg: PipelineConfig) -> list[Check]:
    from clearair.models import pretrained
    from workflows.stages.perceiver import perceiver_config

    checks = []
    p = perceiver_config(cfg)
    checks.append(
        _try(
            f"CLIP {p['clip_model']} ({p['pretrained']})",
            lambda: pretrained.load_open_clip(p["clip_model"], p["pretrained"]) and None,
        )
    )
    priors = cfg.train.priors
    dino = priors.get("source") if priors.get("kind") == "dino" else (priors.get("regions") or {}).get("source")
    if dino is not None:
        checks.append(_try(f"DINOv2 {str(dino)[:60]}", lambda: pretrained.load_dinov2(dino) and None))
    vgg = cfg.train.vgg
    if cfg.train.loss == "perceive_ir" and (vgg is not None or not cfg.train.allow_random_frozen):
        checks.append(_try(f"VGG16 ({vgg})", lambda: pretrained.load_vgg16_features(vgg) and None))
    return checks


def dataset_checks(cfg: PipelineConfig) -> list[Check]:
    from workflows.evaluation import benchmark_items

    checks = []
    for src in cfg.synth.sources:
        if src.layout == "demo":
            checks.append(Check("source demo", True, "ships with scikit-image"))
        else:
            path = Path(src.path).expanduser()
            checks.append(Check(f"source {src.path}", path.is_dir(), "found" if path.is_dir() else "not a directory"))
    for b in cfg.evaluate.benchmarks:
        checks.append(_try(f"benchmark {b.name}", lambda b=b: f"{len(benchmark_items(b.model_dump()))} images"))
    return checks


def storage_check(workdir: str) -> Check:
    """An object-store workdir: can this machine write and read back an object there (bucket, credentials)?"""
    from synth import storage

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
    from synth import storage
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

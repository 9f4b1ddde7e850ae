"""The whole pipeline for real: local Ray, Ray Train, a real MLflow store and server, real shards and files."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clearair import __version__ as CLEARAIR_VERSION

pytestmark = pytest.mark.slow

TINY = str(Path(__file__).parent / "pipelines" / "tiny.yaml")
STAGES = ("synth", "crossval", "perceiver", "priors", "train", "evaluate")


def clearair(*args: str, timeout: int = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def runs_by_name(uri: str, experiment: str) -> tuple[object, dict[str, list]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    return client, by_name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished tiny pipeline per module; tests copy it (a workdir moves), so those that change only the
    train stage run that stage and what follows, not synthesis and cross-validation again."""
    workdir, temp = tmp_path_factory.mktemp("tiny") / "w", tmp_path_factory.mktemp("temp")
    # the stages' temp files (Ray's session stays in /tmp: its socket paths have a length limit)
    env = {"TMPDIR": str(temp), "RAY_TMPDIR": "/tmp"}
    res = clearair("run", TINY, "--workdir", str(workdir), "--no-progress", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(temp.glob("clearair-*")), "a stage left its temp files behind"
    return workdir


def copy_run(src: Path, dst: Path) -> tuple[Path, set[Path]]:
    """``src`` copied to ``dst``, and the stage folders it held (to tell them from those a rerun adds). Its MLflow
    experiment keeps its artifacts in ``src``, so a run in the copy names a new one (``COPY``)."""
    shutil.copytree(src, dst)
    return dst, set(dst.glob("stages/*"))


COPY = ("--set", "tracking.experiment=tiny-copy")


def new_stage(workdir: Path, stage: str, before: set[Path]) -> Path:
    """The one ``stage`` folder a rerun added to ``workdir``."""
    (folder,) = [p for p in workdir.glob(f"stages/{stage}-*") if p not in before]
    return folder


def check_lineage(uri: str, workdir: str | Path) -> None:
    """Runs nested per stage and fold, metrics over steps, dataset digests, the champion; ``workdir`` may be s3://."""
    from synth import storage

    client, runs = runs_by_name(uri, "tiny")
    (parent,) = runs["tiny"]
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.source.git.commit")
    assert parent.data.params.get("train.fit.steps") == "8"
    for stage in STAGES:
        (run,) = runs[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
    crossval = runs["crossval"][0]
    folds = [r for name, rs in runs.items() if name.startswith("crossval-fold") for r in rs]
    assert len(folds) == 2 and all(r.data.tags["mlflow.parentRunId"] == crossval.info.run_id for r in folds)
    assert all("psnr_medium" in r.data.metrics for r in folds)
    train = runs["train"][0]
    assert client.get_metric_history(train.info.run_id, "train/loss"), "metrics over steps"
    digests = {d.dataset.name: d.dataset.digest for d in train.inputs.dataset_inputs}
    (synth,) = [n for n in storage.listdir(storage.join(str(workdir), "stages")) if n.startswith("synth-")]
    manifest = storage.join(str(workdir), "stages", synth, "data", "manifest.json")
    assert digests["synth"] == storage.sha256(manifest)[:36] and "tiers" in digests
    version = client.get_model_version_by_alias("tiny-restorer", "champion")
    assert version.run_id == train.info.run_id
    probe = client.get_metric_history(train.info.run_id, "train/probe_psnr")  # the fixed probe, re-measured
    assert len(probe) >= 2 and all(math.isfinite(m.value) for m in probe)
    evaluate = runs["evaluate"][0]
    assert any(k.endswith("psnr_rgb") for k in evaluate.data.metrics)


def check_folds_never_restore_what_trained_them(workdir: Path) -> None:
    for done in sorted(workdir.glob("stages/crossval-*/fold*/done.json")):
        record = json.loads(done.read_text())
        fold = record["fold"]
        assert record["restored"] and all(f"-f{fold}-" in n for n in record["restored"])
        assert not any(f"-f{fold}-" in n for n in record["trained_on"])
        assert set(record["trained_on"]).isdisjoint(record["restored"])
        for shard in record["tier_shards"]:
            sources = record["restored"] if shard["split"] == "train" else record["restored_heldout"]
            assert all(row["fold"] == fold and row["source_shard"] in sources for row in shard["rows"])
            assert shard["split"] == "train" or fold == 0  # held-out splits: a restorer that saw neither


def test_tiny_pipeline_end_to_end_then_cached(tiny_run, tmp_path):
    workdir = tiny_run
    uri = f"sqlite:///{workdir.resolve()}/mlflow.db"
    check_lineage(uri, workdir)
    check_folds_never_restore_what_trained_them(workdir)
    assert (next(workdir.glob("stages/evaluate-*/results.md"))).read_text().count("synthetic-test") >= 2
    with open(next(workdir.glob("stages/evaluate-*/results.csv"))) as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["tiled"] == "0" for r in rows)  # every test image restored whole, within the budget
    for result in workdir.glob("stages/*/result.json"):
        assert json.loads(result.read_text())["clearair_version"] == CLEARAIR_VERSION, result
    assert next(workdir.glob("stages/train-*/model/model.safetensors")).exists()
    perceiver = json.loads(next(workdir.glob("stages/perceiver-*/result.json")).read_text())
    assert 0 <= perceiver["metrics"]["heldout/accuracy"] <= 1 and "whole/accuracy" in perceiver["metrics"]
    assert all(next(workdir.glob(f"stages/perceiver-*/{f}")).stat().st_size for f in ("confusion_matrix.png",
                                                                                       "tier_examples.png"))
    tiers = json.loads(next(workdir.glob("stages/crossval-*/tiers/manifest.json")).read_text())
    assert {s["split"] for s in tiers["shards"]} == {"train", "val", "test"} and tiers["heldout"]["test"]
    from synth.read import iter_raw

    metas = [json.loads(m["json"]) for p in workdir.glob("stages/crossval-*/tiers/f*.tar") for m in iter_raw(p)]
    noise = [m for m in metas if m["task"].startswith("denoise")]  # what train.fit.fresh_noise redraws from
    assert noise and all(m["degradations"][0]["degradation"] == "gaussian_noise" for m in noise)
    from clearair.data import whole_images

    samples = list(whole_images(sorted(str(p) for p in workdir.glob("stages/crossval-*/tiers/*.tar"))))
    assert tiers["mediums"] == ["restormer/tiny", "nafnet/tiny"] and {len(s["mediums"]) for s in samples} == {2}
    t = time.time()
    again = clearair("run", TINY, "--workdir", str(workdir), "--no-progress")
    assert again.returncode == 0 and time.time() - t < 60
    _, runs = runs_by_name(uri, "tiny")
    assert len(runs["tiny"]) == 2 and len(runs["train"]) == 1  # the rerun did no stage work
    restored = clearair("restore", str(next(workdir.glob("stages/train-*/model"))),
                        str(next(workdir.glob("stages/synth-*/data/contact_sheet.png"))), "--out", str(tmp_path / "r"),
                        "--tile", "64", "--overlap", "16")
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert (tmp_path / "r" / "contact_sheet.png").exists()
    wrong = clearair("restore", str(next(workdir.glob("stages/synth-*/data/manifest.json")).parent), "x.png", "--out",
                     str(tmp_path / "r2"))
    assert wrong.returncode == 2 and "error:" in wrong.stderr


def test_killed_training_resumes_to_the_same_final_step(tiny_run, tmp_path):
    workdir, before = copy_run(tiny_run, tmp_path / "w")  # only train and evaluate re-key
    steps = ["--set", "train.fit.steps=40", "--set", "train.fit.val_every=10"]
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", TINY, "--workdir", str(workdir),
                             "--no-progress", *steps, *COPY], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    checkpoints = "stages/train-*/ray/train/checkpoint_*"
    while (time.time() < deadline and proc.poll() is None
           and not [p for p in workdir.glob(checkpoints) if p.parents[2] not in before]):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train = new_stage(workdir, "train", before)
    assert list(train.glob("ray/train/checkpoint_*")) and not (train / "result.json").exists()
    res = clearair("run", TINY, "--workdir", str(workdir), *steps, *COPY)  # with progress lines, as a user sees it
    assert res.returncode == 0, res.stderr[-3000:]
    for n, stage in enumerate(STAGES, 1):  # a line per stage: cached, or started and done with its wall time
        assert f"[{n}/6] {stage}: cached" in res.stderr or f"[{n}/6] {stage}: done in " in res.stderr, stage
    assert "[2/6] crossval: cached" in res.stderr
    assert "[5/6] train: started" in res.stderr and "marked" in res.stderr  # the killed run's runs, see below
    output = res.stdout + res.stderr  # Ray passes the workers' lines on
    assert len(re.findall(r"train: step 40/40 \(100%\) loss [\d.e-]+", output)) == 1, output[-3000:]  # once, not twice
    _, runs = runs_by_name(f"sqlite:///{workdir.resolve()}/mlflow.db", "tiny-copy")
    statuses = sorted(r.info.status for rs in runs.values() for r in rs)
    assert "RUNNING" not in statuses and statuses.count("KILLED") >= 2  # the killed pipeline and its train run
    import torch

    ckpts = sorted(train.glob("ray/train/checkpoint_*/checkpoint.ckpt"))
    final = max(torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in ckpts)
    assert final == 40
    result = json.loads((train / "result.json").read_text())
    assert result["metrics"]["best_step"] > 0


def test_quickstart_shows_the_papers_idea_at_laptop_scale(tmp_path):
    """The quickstart (seed 0) on held-out photographs: a restorer well above its input on noise and rain and no
    worse on haze, and a perceiver on the shipped quality-aware CLIP that orders tiers. Every stage is seeded and
    every library's CPU kernels are capped at AVX2 (synth.portable), so a seed-0 run should give the same figures on
    every x86-64 machine of this kind. Every test tile is restored under every task (16 per task). The thresholds
    sit below the lowest of seeds 0, 1 and 2 but for rain, where seed 2 gains only +0.38 dB (README, 2-core Intel
    machine, 2026-12-06; seed 0 in brackets):
    noise +2.5 dB (+3.91), rain +2 dB (+2.86), macro +4 dB (+4.54), accuracy 0.65 (0.71), low and high recall 0.5
    (0.78, 0.95), medium recall 0.3 (0.38), win rates 0.75 on rain and haze (0.86, 1.0), Spearman 0.5 on haze
    (0.60) and 0.3 on rain (0.47); on the 70 held-out tier samples whose medium is >= 1 dB above low, accuracy 0.7
    (0.80) and medium recall 0.45 (0.56). Haze is the weak task at this size: about +0.9 dB for every seed on 16 tiles,
    and +0.37 for seed 0 after a change as small as the fused optimiser kernel, so the test asks only that
    dehazing does no harm. The haze and rain tiers measure within ~1 dB either side of 0: the stage must warn
    about a margin under 1 dB, not pass it off as separable."""
    workdir = tmp_path / "qs"
    res = clearair("run", "quickstart", "--workdir", str(workdir), "--no-progress", timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    tiers = json.loads(next(workdir.glob("stages/crossval-*/tiers/manifest.json")).read_text())["tasks"]
    assert len(tiers) == 5 and all(tiers[f"denoise_{s}"]["margin"] >= 1.0 for s in (15, 25, 50)), tiers
    for task, t in tiers.items():  # haze and rain stay within ~1 dB at this size, either side of 0: said, not hidden
        assert t["margin"] >= 1.0 or f"the medium tier of {task} is only" in res.stderr, (task, t)
    metrics = json.loads(next(workdir.glob("stages/perceiver-*/result.json")).read_text())["metrics"]
    assert metrics["heldout/accuracy"] >= 0.65, metrics  # chance: 0.33
    assert min(metrics["heldout/recall_low"], metrics["heldout/recall_high"]) >= 0.5, metrics
    assert metrics["heldout/recall_medium"] >= 0.3, metrics
    # on the held-out tiers whose medium is >= 1 dB above low (perceiver.wellposed_gain), the issue's targets
    assert metrics["heldout_wellposed/samples"] >= 50, metrics
    assert metrics["heldout_wellposed/accuracy"] >= 0.7 and metrics["heldout_wellposed/recall_medium"] >= 0.45, metrics
    for task in tiers:  # clean beats degraded, and the score follows the tier rank
        noise = task.startswith("denoise")
        assert metrics[f"heldout/{task}.win"] >= (0.9 if noise else 0.75), (task, metrics)
        assert metrics[f"heldout/{task}.spearman"] >= (0.6 if noise else 0.5 if task == "dehaze" else 0.3), task
    rows = list(__import__("csv").DictReader(open(next(workdir.glob("stages/evaluate-*/results.csv")))))
    tasks = {r["task"]: r for r in rows if r["set"] == "synthetic-test"}
    assert len(tasks) == 6
    gain = {"macro": 4.0, "derain": 2.0, "dehaze": 0.0}  # each denoise task: 2.5
    for name, r in tasks.items():
        assert float(r["psnr_rgb"]) >= float(r["input_psnr_rgb"]) + gain.get(name, 2.5), r


def test_clearair_training_path_at_reduced_size(tiny_run, tmp_path):
    """The ClearAIR pipeline's train stage (clearair loss, perceiver assessor, DINOv2-cluster regions) on toys,
    on the tiny run's data, tiers and prompts."""
    workdir, before = copy_run(tiny_run, tmp_path / "w")
    dino = "{hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2, patch_size: 14, image_size: 28}"
    priors = (f"{{kind: clearair, assessor: {{kind: perceiver}}, regions: {{kind: dino_cluster, n_regions: 4, "
              f"image_size: 28, source: {dino}}}, degradation: {{kind: cfe_perceiver, "
              f"cfe: {{channels: [8, 8, 16, 16], out_dim: 16}}}}}}")
    res = clearair("run", TINY, "--workdir", str(workdir), "--no-progress", *COPY,
                   "--set", "train.model={arch: clearair, preset: tiny, config: {quality_dim: 64, "
                   "degradation_dim: 19}}",
                   "--set", "train.loss=clearair", "--set", "train.loss_weights={}", "--set", f"train.priors={priors}")
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((new_stage(workdir, "train", before) / "model" / "config.json").read_text())
    assert config["arch"] == "clearair" and config["extra"]["priors"]["assessor"]["prompts"].endswith(".safetensors")
    priors = json.loads((new_stage(workdir, "priors", before) / "result.json").read_text())
    assert priors["skipped"] is None and priors["metrics"]["samples_computed"] > 0  # precomputed once per image
    shard = priors["outputs"]["train_shards"][0].replace("{workdir}", str(workdir))
    from synth.read import iter_raw

    assert {"prior.quality_emb.npy", "prior.region_masks.npy"} <= set(next(iter_raw(shard)))
    assert (new_stage(workdir, "evaluate", before) / "results.csv").exists()

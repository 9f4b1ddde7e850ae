"""The one loading API: exports, moved exports, checkpoints, MLflow models; frozen parts named and checked."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clearair.export import export_model
from clearair.models.factory import build_model
from clearair.models.perceiver import PerceiverConfig
from clearair.priors import build_priors, perceiver_from_config
from clearair.restorer import RestorerLoadError, frozen_record, load_restorer
from tests.tiny import GUIDANCE_DINO, REGION_DINO
from workflows.tracking import Tracker, default_tracking_uri

TINY_DINO = GUIDANCE_DINO
DINO_PRIORS = {"kind": "dino", "source": {**TINY_DINO, "image_size": 56}, "image_size": 56}
IMAGE = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)  # not a multiple of anything


def _export(model, priors: dict, out: Path) -> Path:
    provider = build_priors(priors, allow_random=True)
    extra = {"priors": priors, "allow_random_frozen": True, "frozen": frozen_record(provider)}
    return export_model(model, out, extra=extra)


@pytest.fixture(scope="module")
def perceive_ir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _export(build_model("perceive_ir", preset="tiny"), DINO_PRIORS, tmp_path_factory.mktemp("pir") / "model")


@pytest.fixture(scope="module")
def clearair_export(tmp_path_factory, perceive_ir) -> Path:
    """A ClearAIR export whose priors name a prompts file and a CFE export of this project, outside the export."""
    tmp = tmp_path_factory.mktemp("ca")
    config = dataclasses.asdict(PerceiverConfig.tiny())
    perceiver_from_config(config, allow_random=True).save_prompts(tmp / "prompts.safetensors")
    shutil.copytree(perceive_ir, tmp / "cfe-source")
    priors = {
        "kind": "clearair",
        "assessor": {"kind": "perceiver", "config": config, "prompts": str(tmp / "prompts.safetensors")},
        "regions": {"kind": "dino_cluster", "n_regions": 4, "image_size": 32, "source": REGION_DINO},
        "degradation": {"kind": "cfe_perceiver", "cfe": str(tmp / "cfe-source")},
    }
    dims = build_priors(priors, allow_random=True).dims
    torch.manual_seed(1)
    return _export(build_model("clearair", dims, preset="tiny"), priors, tmp / "model")


def test_every_image_form_comes_back_in_its_form_with_the_priors_built(perceive_ir):
    restorer = load_restorer(perceive_ir, device="cpu")
    assert restorer.arch == "perceive_ir" and set(restorer.info["frozen"]) == {"guidance"}
    out = restorer.restore(IMAGE)
    assert out.dtype == np.uint8 and out.shape == IMAGE.shape and not np.array_equal(out, IMAGE)
    as_float = restorer(IMAGE.astype(np.float32) / 255.0)
    assert as_float.dtype == np.float32 and np.abs(as_float * 255.0 - out).max() <= 0.5 + 1e-3
    batch = restorer(np.stack([IMAGE, IMAGE]))
    assert batch.shape == (2, *IMAGE.shape) and np.array_equal(batch[1], out)
    pil = restorer(Image.fromarray(IMAGE))
    assert pil.mode == "RGB" and np.array_equal(np.asarray(pil), out)
    tensor = restorer(torch.from_numpy(IMAGE).permute(2, 0, 1).float() / 255.0)
    assert tensor.shape == (3, 37, 45) and torch.allclose(
        tensor * 255.0, torch.from_numpy(out).permute(2, 0, 1).float(), atol=0.51
    )
    tiled = restorer(IMAGE, tile=24, overlap=8)  # priors per tile: close to, not equal to, the whole-image pass
    assert tiled.shape == IMAGE.shape
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        restorer(IMAGE.astype(np.float32))  # 0..255 floats are a caller's mistake, not an image
    with pytest.raises(ValueError, match="RGB"):
        restorer(IMAGE[..., :2])


def test_a_moved_clearair_export_loads_with_the_parts_it_carries(clearair_export, tmp_path):
    meta = json.loads((clearair_export / "config.json").read_text())
    priors = meta["extra"]["priors"]
    assert priors["assessor"]["prompts"].startswith("export:parts/") and priors["degradation"]["cfe"].startswith(
        "export:"
    )
    expected = load_restorer(clearair_export, device="cpu")(IMAGE)
    moved = shutil.copytree(clearair_export, tmp_path / "elsewhere")
    for original in (clearair_export.parent / "prompts.safetensors", clearair_export.parent / "cfe-source"):
        original.rename(original.with_name(original.name + ".gone"))  # the workdir of the training run is gone
    try:
        restorer = load_restorer(moved, device="cpu")
        assert set(restorer.info["frozen"]) == {"assessor", "regions", "degrader"}
        assert np.array_equal(restorer(IMAGE), expected)
    finally:
        for gone in clearair_export.parent.glob("*.gone"):
            gone.rename(gone.with_name(gone.name.removesuffix(".gone")))


def test_frozen_parts_that_differ_or_are_missing_fail_before_any_image(perceive_ir, tmp_path):
    copy = shutil.copytree(perceive_ir, tmp_path / "other-dino")
    meta = json.loads((copy / "config.json").read_text())
    meta["extra"]["priors"]["seed"] = 7  # the random tiny DINOv2 of another seed: other weights, same shapes
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RestorerLoadError, match="frozen parts differ.*guidance"):
        load_restorer(copy, device="cpu")
    assert load_restorer(copy, device="cpu", check_frozen=False)(IMAGE).shape == IMAGE.shape

    meta["extra"]["priors"]["source"] = str(tmp_path / "dinov2-base")  # a real DINOv2 this machine lacks
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RestorerLoadError, match=r"needs frozen dino priors.*dinov2-base.*Download"):
        load_restorer(copy, device="cpu")


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code_even_when_torch_is_told_to_unpickle(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {}, "clearair": {}, "payload": _RunsCode(marker)}, tmp_path / "crafted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # only weights_only passed explicitly holds
    with pytest.raises(RestorerLoadError, match="crafted.ckpt is not a checkpoint that loads safely"):
        load_restorer(tmp_path / "crafted.ckpt", device="cpu")
    assert not marker.exists()


def test_bad_sources_are_named(tmp_path, monkeypatch):
    with pytest.raises(RestorerLoadError, match="no such model"):
        load_restorer(tmp_path / "nothing")
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "clearair": {}, "payload": Path("x")}, pickled)  # needs unpickling a class
    with pytest.raises(RestorerLoadError, match="evil.ckpt is not a checkpoint that loads safely"):
        load_restorer(pickled, device="cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(RestorerLoadError, match="no config.json"):
        load_restorer(tmp_path / "half")
    if not torch.cuda.is_available():
        with pytest.raises(RestorerLoadError, match="no usable CUDA"):
            load_restorer(tmp_path / "half", device="cuda")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RestorerLoadError, match="MLFLOW_TRACKING_URI"):
        load_restorer("models:/x@champion")


FRESH_PROCESS = """
import sys, numpy as np, mlflow.pyfunc
images = np.load(sys.argv[1])
out = {}
for name in ("tiny-pir", "tiny-clearair"):
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion", model_config={"device": "cpu"})
    out[name] = model.predict(images)
import clearair
np.savez(sys.argv[2], code=np.array(clearair.__file__), **out)
"""


def test_registered_perceive_ir_and_clearair_predict_in_a_fresh_process(perceive_ir, clearair_export, tmp_path):
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "models")
    run = tracker.start_run("train")
    for name, export in (("tiny-pir", perceive_ir), ("tiny-clearair", clearair_export)):
        tracker.register_model(run, export, name, alias="champion")
    images = np.stack([IMAGE, IMAGE[::-1]])  # (2, H, W, 3) uint8
    np.save(tmp_path / "images.npy", images)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "images.npy"), str(tmp_path / "out.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    assert "artifacts/code/clearair" in str(served["code"])  # the code travelled with the model
    for name, export in (("tiny-pir", perceive_ir), ("tiny-clearair", clearair_export)):
        local = load_restorer(export, device="cpu", precision="fp32")(images.astype(np.float32) / 255.0)
        assert served[name].shape == images.shape and np.abs(served[name] - local).max() < 1e-5
        registered = load_restorer(f"models:/{name}@champion", device="cpu", tracking_uri=uri)
        assert registered.arch == load_restorer(export, device="cpu").arch


def test_a_registered_model_restores_after_its_download_is_gone(perceive_ir, clearair_export, tmp_path, monkeypatch):
    """``load_restorer("models:/...")`` downloads into a directory that lives only while the model loads: the
    restorer (priors included) works after it is removed, and repeated loads leave nothing in the temp dir."""
    uri = default_tracking_uri(tmp_path)
    tracker = Tracker(uri, "models")
    run = tracker.start_run("train")
    images = np.stack([IMAGE, IMAGE[::-1]]).astype(np.float32) / 255.0
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for name, export in (("tiny-pir", perceive_ir), ("tiny-clearair", clearair_export)):
        tracker.register_model(run, export, name, alias="champion")
        registered = load_restorer(f"models:/{name}@champion", device="cpu", precision="fp32", tracking_uri=uri)
        local = load_restorer(export, device="cpu", precision="fp32")
        assert sorted(p.name for p in temp.iterdir()) == []
        assert np.abs(registered(images) - local(images)).max() < 1e-6

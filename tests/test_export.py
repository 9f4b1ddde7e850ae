"""Exported models (safetensors + config.json): round trips and refusals."""

import json
import shutil

import pytest
import torch

from clearair.export import (
    ExportFormatError,
    export_model,
    load_model,
    read_export_config,
)
from clearair.models.factory import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("restormer", preset="tiny")
    with torch.no_grad():  # make every weight differ from a fresh init
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return m.eval()


def _x() -> torch.Tensor:
    return torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0))


def test_export_round_trip_gives_identical_outputs(model, tmp_path):
    out = export_model(model, tmp_path / "m", extra={"priors": [], "trained_on": "3-task"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # nothing pickled
    loaded = load_model(out)
    assert type(loaded) is type(model) and not loaded.training
    with torch.inference_mode():
        assert torch.equal(loaded(_x()), model(_x()))
    meta = read_export_config(out / "config.json")
    assert meta["format"] == "clearair-model" and meta["arch"] == "restormer"
    assert meta["extra"]["trained_on"] == "3-task" and meta["config"]["dim"] == model.config.dim


def test_guided_model_round_trip(tmp_path):
    torch.manual_seed(1)
    net = build_model("perceive_ir", preset="tiny").eval()
    priors = {"dino_cls": torch.randn(1, 4, net.config.dino_dim)}
    loaded = load_model(export_model(net, tmp_path / "p"))
    with torch.inference_mode():
        assert torch.equal(loaded(_x(), priors=priors), net(_x(), priors=priors))


def test_weights_of_another_config_are_refused_naming_file_and_keys(model, tmp_path):
    out = export_model(model, tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["num_refinement"] = 2
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportFormatError, match=r"model\.safetensors.*missing keys: levels\.refine\.blocks\.1"):
        load_model(out)


def test_weights_of_another_arch_are_refused(model, tmp_path):
    a = export_model(model, tmp_path / "a")
    b = export_model(build_model("nafnet", preset="tiny"), tmp_path / "b")
    shutil.copy(a / "model.safetensors", b / "model.safetensors")
    meta = json.loads((b / "config.json").read_text())
    meta.pop("weights_sha256")  # as if the config had been written by hand
    (b / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportFormatError, match=r"model\.safetensors does not match a 'nafnet'.*unexpected keys"):
        load_model(b)


def test_replaced_weights_fail_the_checksum(model, tmp_path):
    a = export_model(model, tmp_path / "a")
    b = export_model(build_model("restormer", preset="tiny"), tmp_path / "b")
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(ExportFormatError, match="checksum"):
        load_model(a)


def test_partial_or_foreign_dirs_are_refused(model, tmp_path):
    out = export_model(model, tmp_path / "m")
    (out / "config.json").unlink()
    with pytest.raises(ExportFormatError, match="no config.json"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"model_type": "dinov2"}))  # a transformers directory
    with pytest.raises(ExportFormatError, match=r"config\.json is not a 'clearair-model'"):
        load_model(out)


def test_reexport_overwrites_atomically(model, tmp_path):
    export_model(build_model("restormer", preset="tiny"), tmp_path / "m")
    out = export_model(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    with torch.inference_mode():
        assert torch.equal(load_model(out)(_x()), model(_x()))


def test_export_refuses_non_json_extra(model, tmp_path):
    with pytest.raises(TypeError, match="extra.when"):
        export_model(model, tmp_path / "m", extra={"when": object()})

"""Restorers as MLflow models: logged with models-from-code, registered under a name, loaded back by alias.

The logged model is ``workflows/model_code.py`` (MLflow runs it at load time) plus the export directory
(safetensors + config.json) as the artifact ``model``; the ``clearair`` and ``synth`` packages travel as code.
Nothing is pickled, and loading the model runs only our code. Every call goes through the caller's
:class:`mlflow.MlflowClient`: MLflow's own ``models:/`` resolution would use the process-global tracking URI.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PyFuncModel
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import clearair
import synth
from clearair.export import read_export_config
from workflows.provenance import package_version

log = logging.getLogger(__name__)

MODEL_CODE_PATH = Path(__file__).parents[1] / "model_code.py"  # workflows/model_code.py, beside this package
# What the model library (clearair + synth, logged as code) imports, at the versions of this environment.
MODEL_REQUIREMENTS = (
    "torch",
    "numpy",
    "safetensors",
    "pillow",
    "opencv-python-headless",
    "transformers",
    "open_clip_torch",
    "mlflow",
)


def register_model(client: mlflow.MlflowClient, run_id: str, export_dir: Path, name: str, alias: str) -> str:
    """Log an exported restorer as a models-from-code pyfunc, register it as ``name`` and point ``alias`` at it.

    The logged model holds ``workflows/model_code.py`` and the export directory (safetensors + config.json);
    nothing is pickled. Returns the new version number. MLflow reserves the alias "latest" (the URI
    ``models:/NAME/latest`` already means the newest version), so it is refused here.
    """
    if alias.lower() == "latest":
        raise ValueError('MLflow reserves the alias "latest"; models:/NAME/latest already names the newest version')
    meta = read_export_config(export_dir)  # refuse an incomplete export before logging anything
    run = client.get_run(run_id)
    tags = {"clearair.arch": meta["arch"], "clearair.weights_sha256": str(meta.get("weights_sha256"))}
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags)
    try:
        _save_pyfunc(client, model, run_id, Path(export_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return _register(client, name, alias, run_id, model, tags)


def _save_pyfunc(client: mlflow.MlflowClient, model: LoggedModel, run_id: str, export_dir: Path) -> None:
    mlmodel = Model(
        artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        with warnings.catch_warnings():  # the entry declares its schema in the signature, not in type hints
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            mlflow.pyfunc.save_model(
                path=local,
                python_model=str(MODEL_CODE_PATH),
                artifacts={"model": str(export_dir.resolve())},
                code_paths=[str(Path(p).parent) for p in (clearair.__file__, synth.__file__)],
                mlflow_model=mlmodel,
                signature=_model_signature(),
                input_example=(_input_example(), {"output": "float"}),
                pip_requirements=_pip_requirements(),  # explicit: no inference subprocess that loads the model
            )
        client.log_model_artifacts(model.model_id, str(local))


def _register(
    client: mlflow.MlflowClient, name: str, alias: str, run_id: str, model: LoggedModel, tags: dict[str, str]
) -> str:
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The source is the logged model's storage location, not models:/<id>: with a sqlite store MLflow resolves
    # a models:/ source through the process-global tracking URI (a ./mlflow.db in the working directory).
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
    )
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s (alias %s) from run %s", name, version.version, alias, run_id)
    return str(version.version)


def load_registered_model(
    client: mlflow.MlflowClient, uri: str, name: str, alias: str, dst_path: str | os.PathLike | None = None
) -> PyFuncModel:
    """The pyfunc model ``models:/NAME@ALIAS`` of the store at ``uri``, downloaded to ``dst_path`` (or a new temp dir).

    The alias is resolved with ``client``: MLflow's own ``models:/`` resolution uses the process-global registry
    URI, whatever URI is passed to it.
    """
    version = client.get_model_version_by_alias(name, alias).version
    source = client.get_model_version_download_uri(name, version)
    dst = os.fspath(dst_path) if dst_path is not None else tempfile.mkdtemp(prefix="clearair-model-")
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri)
    return mlflow.pyfunc.load_model(local)


def _model_signature() -> ModelSignature:
    """uint8 RGB batches (B, H, W, 3) of any size in, float32 (B, H, W, 3) in [0, 1] out, and the tiling params."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("tile", "long", 0),
                ParamSpec("overlap", "long", 32),
                ParamSpec("memory_budget_mb", "double", 0.0),
                ParamSpec("output", "string", "float"),
            ]
        ),
    )


def _input_example() -> np.ndarray:
    """One 32x32 grey-gradient image: small enough to log, a valid input for every architecture."""
    ramp = np.linspace(0, 255, 32).astype(np.uint8)  # (32,)
    return np.tile(ramp[:, None, None], (1, 1, 32, 3))  # (1, 32, 32, 3)


def _pip_requirements() -> list[str]:
    return [f"{p}=={package_version(p)}" if package_version(p) != "not installed" else p for p in MODEL_REQUIREMENTS]

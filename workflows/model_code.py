"""MLflow models-from-code entry for a ClearAIR restorer (logged by :func:`workflows.tracking.registry.register_model`).

MLflow runs this file when the model is loaded; the weights come from the logged artifact ``model`` (an export
directory: ``model.safetensors`` + ``config.json`` + the project-made frozen parts under ``parts/``), read by
:func:`clearair.restorer.load_restorer`, which also builds the frozen priors the export names (DINOv2 for
Perceive-IR, the quality perceiver and degradation embedder for ClearAIR). The ``clearair`` and ``synth`` packages
travel with the model (MLflow ``code_paths``), so no unpublished package has to be installed. Nothing is
unpickled.

``predict`` takes RGB images as a uint8 numpy array ``(B, H, W, 3)`` (any size; one batch holds one size) and
returns the restorations as float32 ``(B, H, W, 3)`` in [0, 1] (uint8 with the param ``output="uint8"``).
Params: ``tile`` (0 = whole image), ``overlap``, ``memory_budget_mb`` (0 = none), as in
:func:`clearair.inference.restore_image`. ``model_config={"device": "cpu", "precision": "fp32"}`` at load time
picks the device (default: CUDA when available) and the precision (default: bf16 on CUDA, float32 on the CPU).
"""

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from clearair.restorer import load_restorer


class RestorerModel(PythonModel):
    """A restorer from an export directory, restoring whole images (or tiles, on request)."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.restorer = load_restorer(
            context.artifacts["model"], device=config.get("device", "auto"), precision=config.get("precision", "auto")
        )

    def predict(self, context, model_input, params=None):
        params = params or {}
        images = np.asarray(model_input)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 RGB images (B, H, W, 3), got {images.dtype} {images.shape}")
        out = self.restorer.restore(
            images.astype(np.float32) / 255.0,
            tile=int(params.get("tile") or 0) or None,
            overlap=int(params.get("overlap", 32)),
            memory_budget_mb=float(params.get("memory_budget_mb") or 0) or None,
        )  # (B, H, W, 3) float32 in [0, 1]
        if params.get("output", "float") == "uint8":
            return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
        return out


set_model(RestorerModel())

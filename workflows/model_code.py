"""MLflow models-from-code entry for a ClearAIR restorer (logged by :meth:`workflows.tracking.Tracker.register_model`).

MLflow runs this file when the model is logged and again when it is loaded; the weights come from the logged
artifact ``model`` (an export directory: ``model.safetensors`` + ``config.json``), read by
:func:`clearair.export.load_model`. Nothing is unpickled.

``predict`` takes RGB images as a numpy array, one (H, W, 3) image or a batch (B, H, W, 3) of equal size, uint8 or
float in [0, 1], and returns the restorations as (B, H, W, 3) float32 in [0, 1] (uint8 with ``output="uint8"``).
Params: ``tile`` (0 = whole image), ``overlap``, ``memory_budget_mb`` (0 = none), as in
:func:`clearair.inference.restore_image`. ``model_config={"device": "cpu"}`` at load time picks the device (default:
CUDA when available). Restorers that need priors (guidance from assessors) are not served by this entry.

The ``np.ndarray`` hint on ``predict`` tells MLflow not to infer or enforce an input schema (sizes and dtypes vary).
"""

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from clearair.export import load_model
from clearair.inference import restore_image


def _to_batch(images: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3), uint8 or float in [0, 1] -> (B, 3, H, W) float32 in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected RGB images of shape (H, W, 3) or (B, H, W, 3), got {arr.shape}")
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    x = torch.from_numpy(np.ascontiguousarray(arr)).float() / scale  # (B, H, W, 3)
    return x.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


class RestorerModel(PythonModel):
    """A restorer from an export directory, restoring whole images (or tiles, on request)."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(context.artifacts["model"], device=device)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        params = params or {}
        budget = float(params.get("memory_budget_mb") or 0)
        out = restore_image(
            self.model,
            _to_batch(model_input),
            tile=int(params.get("tile") or 0) or None,
            overlap=int(params.get("overlap", 32)),
            memory_budget_mb=budget or None,
        )  # (B, 3, H, W)
        arr = out.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        if params.get("output", "float") == "uint8":
            return np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        return arr


set_model(RestorerModel())

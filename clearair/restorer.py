"""One way to load a trained restorer anywhere: ``clearair.load_restorer(PATH_OR_URI)``.

A *source* is any of:

- an export directory (``model.safetensors`` + ``config.json``, :mod:`clearair.export`);
- an ``s3://`` (or other object-store) export, read through a local copy;
- a training checkpoint of :class:`clearair.lightning.RestorerModule` (a ``.ckpt`` file, read with
  ``weights_only=True``; the priors it needs come from its hyperparameters);
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` of an MLflow registry (``tracking_uri``, else
  ``$MLFLOW_TRACKING_URI``); MLflow is imported only for these.

The result, a :class:`Restorer`, holds the network *and* the frozen prior provider it was trained with (DINOv2 for
Perceive-IR, the perceiver / regions / degradation embedder for ClearAIR), built from the priors spec the source
records, on one device. It restores numpy, PIL or tensor images of any size.

Frozen parts: an export records, under ``extra["frozen"]``, the sha256 of each frozen part's weights
(:func:`fingerprint`: tensors by name, floats as float32). Loading rebuilds each part from its recorded source and
compares; a part that is not on this machine fails before any image is restored, with the loader's message saying
what to download and where to put it, and a part whose weights differ from the recorded ones fails naming both
sums (``check_frozen=False`` accepts it). Parts this project makes itself (learned prompts, a reused CFE) travel
inside the export under ``parts/`` (:func:`clearair.export.export_model`), so an export is self-contained except
for third-party pretrained weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clearair.export import (
    CONFIG_NAME,
    MODEL_FORMAT,
    ExportFormatError,
    check_state_dict,
    load_model,
    read_export_config,
    resolve_parts,
)
from clearair.inference import plan_tile, restore_image
from clearair.models.factory import build_model
from clearair.models.pretrained import MissingWeightsError, full_state_dict
from clearair.priors import build_priors
from synth import storage

log = logging.getLogger(__name__)

CHECKPOINT_INFO = "clearair"  # the RestorerModule checkpoint's record of arch, config and frozen-part sums
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class RestorerLoadError(ValueError):
    """A source that cannot become a restorer: missing, in no format we know, or needing frozen parts this machine
    lacks or holds in another version. The message names the source."""


# ----------------------------------------------------------------------------------------------- frozen parts


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's weights: every state-dict tensor in name order, name and shape included, those of its
    :class:`~clearair.models.pretrained.Frozen` parts too (:func:`~clearair.models.pretrained.full_state_dict`),
    floating tensors as float32 (so a part loaded in bf16 on a GPU and in float32 on a CPU from a bf16 file agree)."""
    h = hashlib.sha256()
    for name, tensor in sorted(full_state_dict(module).items()):
        t = tensor.detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_record(provider: nn.Module | None) -> dict[str, str]:
    """``{part: sha256}`` for each top-level part of a prior provider (empty without one)."""
    if provider is None:
        return {}
    return {name: fingerprint(part) for name, part in provider.named_children()}


def verify_frozen(provider: nn.Module | None, recorded: dict[str, str] | None, source: str) -> None:
    """Raise :class:`RestorerLoadError` if a rebuilt part's weights differ from those the model was trained with."""
    if not recorded:
        log.info("%s records no frozen-part checksums (an export of clearair 0.1): not checked", source)
        return
    built = frozen_record(provider)
    wrong = [
        f"{name}: built {built.get(name, 'nothing')[:12]}, trained with {sha[:12]}"
        for name, sha in sorted(recorded.items())
        if built.get(name) != sha
    ]
    if wrong:
        raise RestorerLoadError(
            f"{source}: frozen parts differ from those the model was trained with ({'; '.join(wrong)}). Point the "
            f"priors at the same weights (another revision or dtype gives other sums), or pass check_frozen=False "
            f"to use these anyway"
        )


# ----------------------------------------------------------------------------------------------- device, precision


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; ``"cuda"`` on a machine without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no usable CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``"auto"`` is bf16 on CUDA and float32 (None) elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------------------------- images


def _as_batch(image: Any) -> tuple[Tensor, Any]:
    """Any image form -> ``(B, 3, H, W)`` float32 in [0, 1], and a function giving the output back in that form."""
    if isinstance(image, Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"expected a tensor image (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        _check_range(image.min().item(), image.max().item(), image.is_floating_point())
        x = image.float() if image.is_floating_point() else image.float() / 255.0
        return (x if image.ndim == 4 else x[None]), (lambda y: y if image.ndim == 4 else y[0])
    if not isinstance(image, np.ndarray):  # a PIL image
        if not hasattr(image, "mode"):
            raise TypeError(f"cannot restore a {type(image).__name__}: give a numpy array, a PIL image or a tensor")
        from PIL import Image  # image I/O (PIL, and OpenCV through synth.imageio) stays out of `import clearair`

        from synth.imageio import pil_to_rgb

        x, back = _as_batch(pil_to_rgb(image)[0])
        return x, lambda y: Image.fromarray(back(y))
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB array (H, W, 3) or (B, H, W, 3), got shape {image.shape}")
    floating = np.issubdtype(image.dtype, np.floating)
    if not floating and image.dtype != np.uint8:
        raise ValueError(f"expected uint8 or float images in [0, 1], got dtype {image.dtype}")
    _check_range(float(image.min()), float(image.max()), floating)
    batch = image if image.ndim == 4 else image[None]
    x = torch.from_numpy(np.ascontiguousarray(batch)).float().permute(0, 3, 1, 2).contiguous()
    x = x if floating else x / 255.0

    def back(y: Tensor) -> np.ndarray:
        arr = y.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) float32
        if not floating:
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        return arr if image.ndim == 4 else arr[0]

    return x, back


def _check_range(lo: float, hi: float, floating: bool) -> None:
    if floating and (lo < -1e-3 or hi > 1.0 + 1e-3):
        raise ValueError(f"float images must lie in [0, 1]; this one spans [{lo:.3g}, {hi:.3g}] (divide by 255?)")


# ----------------------------------------------------------------------------------------------- the restorer


@dataclass
class Restorer:
    """A trained restorer with its frozen priors, on one device; ``restore(image)`` (or call it) on any size.

    ``info`` holds the source's record: ``arch``, ``config``, ``source`` and the export's ``extra``.
    """

    network: nn.Module
    priors: nn.Module | None
    device: torch.device
    dtype: torch.dtype | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.info.get("arch", getattr(self.network, "arch", "?")))

    def restore(
        self, image: Any, *, tile: int | None = None, overlap: int = 32, memory_budget_mb: float | None = None
    ) -> Any:
        """Restore one image or a batch, returned in the form given.

        Args:
            image: numpy ``(H, W, 3)`` / ``(B, H, W, 3)`` uint8 or float in [0, 1] (uint8 in, uint8 out;
                float in, float32 out), a PIL image (any mode, decoded as synthesis decodes files; PIL RGB out),
                or a tensor ``(3, H, W)`` / ``(B, 3, H, W)`` in [0, 1] (float32 out on the input's device).
            tile: tile side for large images (None: whole image, unless ``memory_budget_mb`` asks for tiles).
            overlap: pixels shared by neighbouring tiles.
            memory_budget_mb: tile when a whole-image pass would need more activation memory than this.
        """
        x, back = _as_batch(image)
        out = restore_image(
            self.network,
            x,
            priors_fn=self.priors,
            tile=tile,
            overlap=overlap,
            memory_budget_mb=memory_budget_mb,
            dtype=self.dtype,
        )
        return back(out)

    __call__ = restore

    def tile_for(
        self,
        height: int,
        width: int,
        *,
        tile: int | None = None,
        overlap: int = 32,
        memory_budget_mb: float | None = None,
    ) -> int | None:
        """The tile side :meth:`restore` uses for one ``height`` x ``width`` image with these settings, or None
        for a whole-image pass (:func:`clearair.inference.plan_tile`)."""
        return plan_tile(self.network, 1, height, width, tile, overlap, memory_budget_mb, self.dtype, self.priors)

    def __repr__(self) -> str:
        parts = ", ".join(self.info.get("frozen") or {}) or "none"
        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return (
            f"Restorer({self.arch}, frozen parts: {parts}, {self.device}, {precision}, from {self.info.get('source')})"
        )


# ----------------------------------------------------------------------------------------------- sources


def read_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a RestorerModule checkpoint (``weights_only=True``; its weight average when it kept one) and
    its record: ``arch``, ``config``, ``extra`` (``priors``, ``allow_random_frozen``, ``frozen``), in the shape an
    export's config.json has."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled code, RuntimeError / EOFError for damaged files
        raise RestorerLoadError(
            f"{path} is not a checkpoint that loads safely (weights only; nothing is unpickled): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    info = ckpt.get(CHECKPOINT_INFO) if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "state_dict" not in ckpt:
        raise RestorerLoadError(f"{path} is not a restorer training checkpoint (no {CHECKPOINT_INFO!r} record)")
    hp = ckpt.get("hyper_parameters") or {}
    model = build_model(info["arch"], info["config"])
    weights = ckpt["state_dict"]
    prefix = "ema." if any(k.startswith("ema.") for k in weights) else "model."  # the weight average when kept
    state = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    extra = {
        "priors": hp.get("priors") or {"kind": "none"},
        "allow_random_frozen": bool(hp.get("allow_random_frozen", False)),
        "frozen": info.get("frozen") or {},
    }
    return model.eval(), {"arch": info["arch"], "config": info["config"], "extra": extra}


def _local_source(source: str, tracking_uri: str | None, downloads: Path) -> Path:
    """A local file or directory for ``source``: object stores are downloaded into the cache, MLflow models into
    ``downloads`` (a directory that lives only while the model loads)."""
    if source.startswith(("models:/", "runs:/")):
        return _mlflow_export(source, tracking_uri, downloads)
    if storage.is_remote(source):
        try:
            return storage.local_copy(source) if storage.is_file(source) else storage.local_tree(source)
        except OSError as err:
            raise RestorerLoadError(f"cannot read {source}: {err}") from None
    path = Path(source).expanduser()
    if not path.exists():
        raise RestorerLoadError(f"{source}: no such model (an export directory, a .ckpt file or a models:/ URI)")
    return path


def _mlflow_export(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """Download a registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or a logged one and return
    the export directory inside it."""
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise RestorerLoadError(f"{uri}: say which MLflow store holds it (tracking_uri= or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if uri.startswith("models:/"):
            name, _, ref = uri.removeprefix("models:/").partition("@")
            if ref:
                version = client.get_model_version_by_alias(name, ref).version
            else:
                name, _, version = name.partition("/")
            artifact = client.get_model_version_download_uri(name, version)
        else:
            artifact = uri
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact, dst_path=os.fspath(dst), tracking_uri=tracking_uri
        )
    except MlflowException as err:
        raise RestorerLoadError(f"{uri} in {tracking_uri}: {err.message}") from None
    return find_export(Path(local), uri)


def find_export(root: Path, source: str) -> Path:
    """The one ClearAIR export directory at or under ``root`` (a logged MLflow model keeps it in artifacts/)."""
    candidates = [root] if (root / CONFIG_NAME).is_file() else []
    candidates += sorted(p.parent for p in root.glob(f"artifacts/*/{CONFIG_NAME}"))
    for c in candidates:
        try:
            if json.loads((c / CONFIG_NAME).read_text()).get("format") == MODEL_FORMAT:
                return c
        except (OSError, ValueError):
            continue
    raise RestorerLoadError(f"{source} holds no ClearAIR export (no {CONFIG_NAME} of format {MODEL_FORMAT!r})")


def _network_and_record(path: Path, source: str) -> tuple[nn.Module, dict[str, Any]]:
    if path.is_file() and path.name != "config.json":
        return read_checkpoint(path)
    try:
        meta = read_export_config(path)
        root = path if path.is_dir() else path.parent
        network = load_model(root)
    except (ExportFormatError, FileNotFoundError) as err:
        raise RestorerLoadError(f"{source}: {err}") from None
    extra = dict(meta.get("extra") or {})
    extra["priors"] = resolve_parts(extra.get("priors") or {"kind": "none"}, root)
    return network, {"arch": meta["arch"], "config": meta["config"], "extra": extra}


def build_frozen(extra: dict[str, Any], source: str, check: bool = True) -> nn.Module | None:
    """The prior provider an export or checkpoint record names, checked against its recorded sums."""
    spec = extra.get("priors") or {"kind": "none"}
    try:
        provider = build_priors(spec, allow_random=bool(extra.get("allow_random_frozen")))
    except MissingWeightsError as err:
        raise RestorerLoadError(f"{source} needs frozen {spec.get('kind')} priors that are not here: {err}") from None
    except ValueError as err:
        raise RestorerLoadError(f"{source}: its priors spec cannot be built: {err}") from None
    if check:
        verify_frozen(provider, extra.get("frozen"), source)
    return provider


def load_restorer(
    source: str | os.PathLike,
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    tracking_uri: str | None = None,
    check_frozen: bool = True,
) -> Restorer:
    """Load a trained restorer and the frozen parts it needs, ready to restore images on ``device``.

    Args:
        source: an export directory, an ``s3://`` export, a training ``.ckpt``, or ``models:/NAME@ALIAS``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        precision: ``"auto"`` (bf16 on CUDA, float32 on the CPU), ``"fp32"`` or ``"bf16"``.
        tracking_uri: the MLflow store of a ``models:/`` source (default ``$MLFLOW_TRACKING_URI``).
        check_frozen: refuse frozen parts whose weights differ from those recorded at training time.

    Raises:
        RestorerLoadError: naming the source and what is wrong, before any image is restored.
    """
    source = os.fspath(source)
    try:
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
    except ValueError as err:
        raise RestorerLoadError(str(err)) from None
    with tempfile.TemporaryDirectory(prefix="clearair-model-") as downloads:  # weights are in memory after this
        network, record = _network_and_record(_local_source(source, tracking_uri, Path(downloads)), source)
        provider = build_frozen(record["extra"], source, check_frozen)
    network = network.to(dev).eval()
    if provider is not None:
        provider = provider.to(dev).eval()
    info = {**record, "source": source, "frozen": record["extra"].get("frozen") or {}}
    return Restorer(network, provider, dev, dtype, info)

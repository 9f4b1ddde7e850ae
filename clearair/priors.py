"""Frozen parts built from plain config: prior providers, the frozen perceiver, VGG16 features.

A *prior provider* turns degraded images ``(B, 3, H, W)`` in [0, 1] into the priors a restorer reads:

- ``{"kind": "dino", "source": DIR | {Dinov2Config kwargs}, "image_size": 224}`` -> ``{"dino_cls"}``
  (Perceive-IR's semantic guidance);
- ``{"kind": "clearair", "assessor": ..., "regions": ..., "degradation": ...}`` -> ``{"quality_emb",
  "region_masks", "degradation_emb"}`` with
  ``assessor`` ``{"kind": "perceiver", "config": {PerceiverConfig fields}, "prompts": PATH | None}`` or
  ``{"kind": "mllm", "source": DIR}``; ``regions`` ``{"kind": "dino_cluster", "source": ..., "n_regions": 16}`` or
  ``{"kind": "sam2", "source": DIR}``; ``degradation`` ``{"kind": "cfe_perceiver", "cfe": EXPORT_DIR | {CFE
  kwargs}}`` (the perceiver defaults to the assessor's) or ``{"kind": "daclip", "source": FILE}``;
- ``{"kind": "none"}`` -> no provider (priors come precomputed in the batches, or the model needs none).

Weights load offline through :mod:`clearair.models.pretrained`. A dict ``source`` (tiny random-init model), a
perceiver with ``pretrained: None`` or without prompts, and ``vgg=None`` are refused unless ``allow_random`` is
set; random parts are built under a fixed seed (``"seed"``, default 0), so the priors stage, the perceiver stage
and training build the same random networks.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn

from clearair.export import load_model
from clearair.models.assessors import (
    DaClipEmbedder,
    DegradationEmbedder,
    MLLMAssessor,
    PerceiverAssessor,
    compute_clearair_priors,
)
from clearair.models.guidance import CFE, DINO_LAYERS, SemanticGuidance
from clearair.models.perceiver import PerceiverConfig, QualityPerceiver, build_perceiver
from clearair.models.pretrained import freeze, load_dinov2, load_vgg16_features, seeded_init
from clearair.models.regions import DinoClusterRegions, Sam2Regions
from clearair.models.vgg import PERCEIVE_IR_TAPS, VGGFeatures

log = logging.getLogger(__name__)

PRIOR_PREFIX = "prior."

# (required keys, optional keys with defaults) of each kind of spec, for building and for check_priors
DINO_SPEC = (("source",), {"image_size": 224, "layers": DINO_LAYERS, "seed": 0})
CLEARAIR_SPEC = (("assessor", "regions", "degradation"), {})
PERCEIVER_ASSESSOR_SPEC = (("config",), {"prompts": None, "seed": 0, "with_probabilities": False})
MLLM_ASSESSOR_SPEC = (
    ("source",),
    {"prompt": "How would you rate the quality of this image?", "answer_prefix": "The quality of the image is",
     "dtype": "auto"},
)  # fmt: skip
DINO_CLUSTER_SPEC = (("source",), {"n_regions": 16, "image_size": 224, "iters": 10, "seed": 0})
SAM2_SPEC = (
    ("source",),
    {"n_regions": 16, "points_per_side": 8, "pred_iou_thresh": 0.7, "stability_thresh": 0.85, "nms_iou": 0.7},
)
DACLIP_SPEC = (("source",), {"model_name": "daclip_ViT-B-32", "image_size": 224})
CFE_PERCEIVER_SPEC = (("cfe",), {"perceiver": None, "perceiver_part": "similarities", "seed": 0})


def check_priors(spec: Any, where: str = "priors", learned_perceiver: bool = False) -> None:
    """ValueError naming the key for a spec :func:`build_priors` would refuse, found without loading anything:
    kinds, keys at every level, and the fields of a DINOv2 config dict (which transformers would silently
    accept: a misspelt ``hidden_size`` would build a 768-wide model). ``learned_perceiver``: a perceiver
    assessor may leave its config and prompts out (a pipeline fills in those its perceiver stage learned)."""
    kind = _kind(spec, where, ("none", "dino", "clearair"))
    if kind == "none":
        _fields(spec, f"{where} (none)", (), {})
    elif kind == "dino":
        _check_dino_source(_fields(spec, f"{where} (dino)", *DINO_SPEC)["source"], f"{where}.source")
    else:
        spec = _fields(spec, f"{where} (clearair)", *CLEARAIR_SPEC)
        a = spec["assessor"]
        if _kind(a, f"{where}.assessor", ("perceiver", "mllm")) == "perceiver":
            required, optional = PERCEIVER_ASSESSOR_SPEC
            if learned_perceiver and "config" not in a:
                required, optional = (), {**optional, "config": {}}
            perceiver_config(_fields(a, f"{where}.assessor (perceiver)", required, optional)["config"])
        else:
            _fields(a, f"{where}.assessor (mllm)", *MLLM_ASSESSOR_SPEC)
        r = spec["regions"]
        if _kind(r, f"{where}.regions", ("dino_cluster", "sam2")) == "dino_cluster":
            source = _fields(r, f"{where}.regions (dino_cluster)", *DINO_CLUSTER_SPEC)["source"]
            _check_dino_source(source, f"{where}.regions.source")
        else:
            _fields(r, f"{where}.regions (sam2)", *SAM2_SPEC)
        d = spec["degradation"]
        if _kind(d, f"{where}.degradation", ("cfe_perceiver", "daclip")) == "daclip":
            _fields(d, f"{where}.degradation (daclip)", *DACLIP_SPEC)
        else:
            _fields(d, f"{where}.degradation (cfe_perceiver)", *CFE_PERCEIVER_SPEC)


def _check_dino_source(source: Any, where: str) -> None:
    """A DINOv2 source: a path or hub name, or a dict of real ``Dinov2Config`` fields."""
    if isinstance(source, dict):
        from transformers import Dinov2Config, PretrainedConfig

        valid = set(Dinov2Config().to_dict())
        unknown = sorted(set(source) - valid)
        if unknown:
            own = sorted(valid - set(PretrainedConfig().to_dict()))  # the model's fields, not every config's
            raise ValueError(f"{where}: unknown Dinov2Config fields {unknown}; its fields: {', '.join(own)}")
    elif not isinstance(source, str):
        raise ValueError(f"{where} must be a path, a hub name or a dict of Dinov2Config fields")


class PriorProvider(nn.Module):
    """Frozen prior computation: ``forward(lq) -> {name: float32 tensor}`` without gradients, built in eval mode
    (a trainer holds it in :class:`clearair.models.pretrained.Frozen`, which keeps it there).

    ``dims`` names the restorer config fields that must agree with this provider (e.g. ``{"dino_dim": 768}``).
    """

    names: tuple[str, ...] = ()
    dims: dict[str, int]

    def compute(self, lq: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, lq: Tensor) -> dict[str, Tensor]:
        return {k: v.float() for k, v in self.compute(lq).items()}


class DinoPriors(PriorProvider):
    """Perceive-IR's ``"dino_cls"`` ``(B, 4, D)`` from a frozen DINOv2 (:class:`SemanticGuidance`)."""

    names = ("dino_cls",)

    def __init__(self, guidance: SemanticGuidance) -> None:
        super().__init__()
        self.guidance = guidance
        self.dims = {"dino_dim": guidance.dim}

    def compute(self, lq: Tensor) -> dict[str, Tensor]:
        return self.guidance(lq)


class ClearAIRPriors(PriorProvider):
    """ClearAIR's three priors from a quality assessor, a region source and a degradation embedder."""

    names = ("quality_emb", "region_masks", "degradation_emb")

    def __init__(self, assessor: nn.Module, regions: nn.Module, degrader: nn.Module) -> None:
        super().__init__()
        self.assessor, self.regions, self.degrader = assessor, regions, degrader
        self.dims = {"quality_dim": assessor.dim, "degradation_dim": degrader.dim, "n_regions": regions.n_regions}

    def compute(self, lq: Tensor) -> dict[str, Tensor]:
        return compute_clearair_priors(lq, self.assessor, self.regions, self.degrader)


def load_priors_from_batch(batch: dict[str, Any]) -> dict[str, Tensor] | None:
    """Precomputed priors of a batch (keys ``"prior.<name>"``) as ``{name: tensor}``, or None if it has none."""
    priors = {k[len(PRIOR_PREFIX) :]: v for k, v in batch.items() if k.startswith(PRIOR_PREFIX)}
    return priors or None


# ----------------------------------------------------------------------------------------------- spec helpers


def _fields(spec: Any, what: str, required: tuple[str, ...], optional: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with defaults filled in; a ValueError naming ``what`` and the valid keys for anything else."""
    if not isinstance(spec, dict):
        raise ValueError(f"{what} must be a dict, got {type(spec).__name__}")
    valid = ("kind", *required, *optional)
    unknown = sorted(set(spec) - set(valid))
    missing = [k for k in required if k not in spec]
    if unknown or missing:
        raise ValueError(f"{what}: unknown keys {unknown}, missing keys {missing}; valid keys: {', '.join(valid)}")
    return {**optional, **spec}


def _kind(spec: Any, what: str, kinds: tuple[str, ...]) -> str:
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in kinds:
        raise ValueError(f"{what} kind {kind!r} is not one of {', '.join(kinds)}")
    return kind


def _refuse_random(what: str, allow_random: bool) -> None:
    if not allow_random:
        raise ValueError(
            f"{what} would be randomly initialised; give a weights source, or allow random frozen parts explicitly "
            f"(allow_random / allow_random_frozen=True) for tiny test configs"
        )


def _dinov2(source: str | dict[str, Any], allow_random: bool, seed: int) -> nn.Module:
    _check_dino_source(source, "DINOv2 source")
    if isinstance(source, dict):
        _refuse_random("DINOv2 (dict source)", allow_random)
        return load_dinov2(source, seed)
    return load_dinov2(source)


# ----------------------------------------------------------------------------------------------- frozen parts


def perceiver_config(config: dict[str, Any] | PerceiverConfig) -> PerceiverConfig:
    """A :class:`PerceiverConfig` from its plain dict; unknown fields raise a ValueError listing the valid ones."""
    if isinstance(config, PerceiverConfig):
        return config
    names = [f.name for f in dataclasses.fields(PerceiverConfig)]
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise ValueError(f"unknown perceiver config fields {unknown}; valid: {', '.join(names)}")
    return PerceiverConfig(**config)


def perceiver_from_config(config: dict[str, Any], allow_random: bool = False, seed: int = 0) -> QualityPerceiver:
    """A perceiver with fresh, trainable prompts drawn under ``seed`` (as is a random-init CLIP, ``pretrained:
    None``): the same config and seed give the same starting prompts in every process."""
    cfg = perceiver_config(config)
    if cfg.pretrained is None:
        _refuse_random(f"CLIP {cfg.clip_model!r} (pretrained=None)", allow_random)
    with seeded_init(seed):
        return build_perceiver(cfg)


def build_frozen_perceiver(spec: dict[str, Any], allow_random: bool = False) -> QualityPerceiver:
    """The frozen stage-1 perceiver from ``{"config": {...}, "prompts": PATH | None, "seed": 0}``."""
    spec = _fields(spec, "perceiver", ("config",), {"prompts": None, "seed": 0})
    perceiver = perceiver_from_config(spec["config"], allow_random, spec["seed"])
    if spec["prompts"] is None:
        _refuse_random("the perceiver's prompts (prompts=None)", allow_random)
    else:
        perceiver.load_prompts(spec["prompts"])
    return freeze(perceiver)


def build_vgg_features(
    spec: str | dict[str, Any] | None, allow_random: bool = False, taps: tuple[str, ...] | None = None
) -> nn.Module:
    """Frozen :class:`clearair.models.vgg.VGGFeatures` at ``taps`` (None: the Perceive-IR authors') from a source
    (``"torchvision"`` or a file), a dict ``{"source", "seed"}``, or None (random weights, only with
    ``allow_random``)."""
    taps = tuple(taps or PERCEIVE_IR_TAPS)
    spec = _fields(spec if isinstance(spec, dict) else {"source": spec}, "vgg", (), {"source": None, "seed": 0})
    if spec["source"] is None:
        _refuse_random("VGG16 (vgg=None)", allow_random)
        with seeded_init(spec["seed"]):
            return VGGFeatures(load_vgg16_features(None), taps)
    return VGGFeatures(load_vgg16_features(spec["source"]), taps)


# ----------------------------------------------------------------------------------------------- providers


def build_priors(spec: dict[str, Any] | None, allow_random: bool = False) -> PriorProvider | None:
    """The prior provider described by ``spec`` (see the module docstring), or None for ``{"kind": "none"}``."""
    if spec is None:
        return None
    kind = _kind(spec, "priors", ("none", "dino", "clearair"))
    if kind == "none":
        _fields(spec, "priors (none)", (), {})
        return None
    if kind == "dino":
        spec = _fields(spec, "priors (dino)", *DINO_SPEC)
        dinov2 = _dinov2(spec["source"], allow_random, spec["seed"])
        return DinoPriors(SemanticGuidance(dinov2, tuple(spec["layers"]), spec["image_size"])).eval()
    spec = _fields(spec, "priors (clearair)", *CLEARAIR_SPEC)
    assessor = _assessor(spec["assessor"], allow_random)
    regions = _regions(spec["regions"], allow_random)
    degrader = _degrader(spec["degradation"], allow_random, getattr(assessor, "perceiver", None))
    return ClearAIRPriors(assessor, regions, degrader).eval()


def _assessor(spec: dict[str, Any], allow_random: bool) -> nn.Module:
    if _kind(spec, "assessor", ("perceiver", "mllm")) == "perceiver":
        spec = _fields(spec, "assessor (perceiver)", *PERCEIVER_ASSESSOR_SPEC)
        perceiver = build_frozen_perceiver({k: spec[k] for k in ("config", "prompts", "seed")}, allow_random)
        return PerceiverAssessor(perceiver, spec["with_probabilities"])
    spec = _fields(spec, "assessor (mllm)", *MLLM_ASSESSOR_SPEC)
    return MLLMAssessor(spec["source"], spec["prompt"], spec["answer_prefix"], spec["dtype"])


def _regions(spec: dict[str, Any], allow_random: bool) -> nn.Module:
    if _kind(spec, "regions", ("dino_cluster", "sam2")) == "dino_cluster":
        spec = _fields(spec, "regions (dino_cluster)", *DINO_CLUSTER_SPEC)
        dinov2 = _dinov2(spec["source"], allow_random, spec["seed"])
        return DinoClusterRegions(dinov2, spec["n_regions"], spec["image_size"], spec["iters"])
    spec = _fields(spec, "regions (sam2)", *SAM2_SPEC)
    return Sam2Regions(**{k: v for k, v in spec.items() if k != "kind"})


def _degrader(spec: dict[str, Any], allow_random: bool, assessor_perceiver: nn.Module | None) -> nn.Module:
    if _kind(spec, "degradation", ("cfe_perceiver", "daclip")) == "daclip":
        spec = _fields(spec, "degradation (daclip)", *DACLIP_SPEC)
        return DaClipEmbedder(spec["source"], spec["model_name"], spec["image_size"])
    spec = _fields(spec, "degradation (cfe_perceiver)", *CFE_PERCEIVER_SPEC)
    perceiver = assessor_perceiver
    if spec["perceiver"] is not None:
        perceiver = build_frozen_perceiver(spec["perceiver"], allow_random)
    if perceiver is None:
        raise ValueError("degradation cfe_perceiver needs a perceiver: give 'perceiver' or use the perceiver assessor")
    return DegradationEmbedder(_cfe(spec["cfe"], allow_random, spec["seed"]), perceiver, spec["perceiver_part"])


def _cfe(source: str | dict[str, Any], allow_random: bool, seed: int) -> nn.Module:
    """A trained CFE taken from an exported restorer (a directory of :func:`clearair.export.export_model`), or a
    random one from ``{"channels": [...], "out_dim": ...}`` (tests only)."""
    if isinstance(source, dict):
        _refuse_random("the CFE (dict source)", allow_random)
        spec = _fields(source, "cfe", (), {"channels": (32, 64, 96, 128), "out_dim": 128})
        with seeded_init(seed):
            return freeze(CFE(tuple(spec["channels"]), spec["out_dim"]))

    model = load_model(source)
    if not isinstance(getattr(model, "cfe", None), nn.Module):
        raise ValueError(f"the model exported at {source} ({getattr(model, 'arch', '?')}) has no CFE to reuse")
    return freeze(model.cfe)

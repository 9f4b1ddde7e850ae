"""The training losses a :class:`clearair.lightning.RestorerModule` takes: one per ``train.loss`` name.

Each is a small module called once per batch, ``loss(model, batch, priors, probe_psnr) -> (loss, logged parts)``:
``model`` the network being trained, ``priors`` those of the batch (or None), ``probe_psnr`` the network's PSNR on
the difficulty probe (Perceive-IR's difficulty weights; nan before the first probe). Logged parts are floats
(``"total"`` is left out of the log). A loss holds only frozen parts (the perceiver, VGG16), never the network:
:func:`build_loss` builds them from a :class:`clearair.specs.LossSpec`, and the training module keeps the loss
frozen.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from clearair import losses as clearair_losses
from clearair.losses import (
    ClearAIRLossWeights,
    ClipAwareLoss,
    DifficultyAdaptivePerceptualLoss,
    PerceiveIRLoss,
    clue_reuse_loss,
    difficulty_weights,
)
from clearair.metrics import psnr_torch
from clearair.priors import build_frozen_perceiver, build_vgg_features
from clearair.specs import LossSpec

MAX_PSNR = 100.0  # identical images have infinite PSNR; means are taken over values capped here
CON_LABELS = ("family", "task")  # the batch member the InfoNCE labels come from (LossSpec.con_labels)
NEGATIVE_PSNR = ("patch", "image")  # where a negative's PSNR comes from (LossSpec.negative_psnr)


def apply_network(model: nn.Module, lq: Tensor, priors: dict[str, Tensor] | None) -> Tensor:
    """``model(lq, priors)``, or ``model(lq)`` without priors: any image-to-image ``nn.Module`` trains too."""
    return model(lq) if priors is None else model(lq, priors)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily in eval mode (ClearAIR: no mask dropout), gradients untouched."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PixelObjective(nn.Module):
    """``"l1"``: the pixel term alone (L1 as the papers, or MSE)."""

    def __init__(self, pixel: str = "l1") -> None:
        super().__init__()
        self.pixel = clearair_losses.pixel_loss(pixel)

    @classmethod
    def build(cls, spec: LossSpec, allow_random: bool = False) -> PixelObjective:
        return cls(spec.pixel)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], priors: dict[str, Tensor] | None, probe_psnr: float
    ) -> tuple[Tensor, dict[str, float]]:
        return self.pixel(apply_network(model, batch["lq"], priors), batch["gt"]), {}


def build_perceive_ir_loss(spec: LossSpec, allow_random: bool = False) -> PerceiveIRLoss:
    """Perceive-IR's loss with its frozen parts (the perceiver, then VGG16); a part whose weight is 0 is not
    built."""
    w = clearair_losses.loss_weights("perceive_ir", spec.weights)
    if w.clip and spec.perceiver is None:
        raise ValueError("the CLIP-aware loss needs perceiver={'config': ..., 'prompts': ...} (or loss_weights clip=0)")
    clip = None
    if w.clip:
        clip = ClipAwareLoss(build_frozen_perceiver(spec.perceiver, allow_random), spec.clip_temperature)
    dpl = None
    if w.dpl:
        layer_weights = tuple(spec.vgg_layer_weights or clearair_losses.DPL_LAYER_WEIGHTS)
        vgg = build_vgg_features(spec.vgg, allow_random, spec.vgg_taps)
        dpl = DifficultyAdaptivePerceptualLoss(vgg, layer_weights)
    return PerceiveIRLoss(w, clip, dpl, pixel=spec.pixel, gather=spec.con_gather)


@torch.no_grad()
def negative_psnr(batch: dict[str, Any], source: str = "patch") -> Tensor:
    """Each medium negative's PSNR ``(B, P)``: of its crop against the ground-truth crop (``"patch"``), or the
    whole image's stored in the tier shard (``"image"``)."""
    if source == "image":
        return batch["medium_psnr"]
    medium, gt = batch["medium"], batch["gt"]  # (B, P, 3, c, c), (B, 3, c, c)
    target = gt.unsqueeze(1).expand_as(medium).flatten(0, 1)
    psnr = psnr_torch(medium.flatten(0, 1).float(), target.float()).clamp(max=MAX_PSNR)
    return psnr.view(medium.shape[:2]).float()


class PerceiveIRObjective(nn.Module):
    """``"perceive_ir"``: :class:`clearair.losses.PerceiveIRLoss` on a batch: the pixel term, InfoNCE on the
    network's CFE features of two crops (labels from ``batch[con_labels]``), the CLIP-aware loss and the
    difficulty-adaptive perceptual loss against the batch's medium-tier negatives."""

    def __init__(self, loss: PerceiveIRLoss, con_labels: str = "family", negative_psnr: str = "patch") -> None:
        super().__init__()
        self.loss, self.con_labels, self.negative_psnr = loss, con_labels, negative_psnr

    @classmethod
    def build(cls, spec: LossSpec, allow_random: bool = False) -> PerceiveIRObjective:
        return cls(build_perceive_ir_loss(spec, allow_random), spec.con_labels, spec.negative_psnr)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], priors: dict[str, Tensor] | None, probe_psnr: float
    ) -> tuple[Tensor, dict[str, float]]:
        lq = batch["lq"]
        restored, cfe = forward_features(model, lq, priors)
        cfe2 = model.cfe(batch["lq2"]) if cfe is not None and "lq2" in batch else None
        negatives, weights = self.negatives(batch, probe_psnr)
        labels = batch[self.con_labels]  # "family" (the noise levels one label) or "task"
        return self.loss(restored, batch["gt"], lq, cfe, cfe2, labels, negatives, weights)

    def negatives(self, batch: dict[str, Any], probe_psnr: float) -> tuple[Tensor | None, Tensor | None]:
        """Medium-tier negatives ``(B, P, 3, c, c)`` and their difficulty weights ``(B, P)``, or ``(None, None)``."""
        if "medium" not in batch:
            return None, None
        return batch["medium"], difficulty_weights(negative_psnr(batch, self.negative_psnr), probe_psnr)


def forward_features(model: nn.Module, lq: Tensor, priors: dict[str, Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """``(restored, CFE features)`` of a network with ``forward_features``; ``(restored, None)`` of any other."""
    if hasattr(model, "forward_features"):
        return model.forward_features(lq, priors)
    return apply_network(model, lq, priors), None


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    return torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))


class AlignedRestore:
    """``restore(view)`` for :func:`clue_reuse_loss` that moves spatial priors (``(B, M, h, w)`` region masks)
    along with the dihedral view of ``reference`` it is given.

    The first call receives an exact dihedral transform of ``reference`` (the weak view): the transform is found
    by comparison and reused for the later (photometrically changed) views.
    """

    def __init__(self, model: nn.Module, priors: dict[str, Tensor] | None, reference: Tensor) -> None:
        self.model, self.priors, self.reference = model, priors, reference
        self.transform = None

    def _find(self, view: Tensor) -> functools.partial:
        for flip in (False, True):
            for k in range(4):
                candidate = _dihedral(self.reference, k, flip)
                if candidate.shape == view.shape and torch.equal(candidate, view):
                    return functools.partial(_dihedral, k=k, flip=flip)
        raise RuntimeError("clue reuse: the first view is not a dihedral transform of the restored image")

    def __call__(self, view: Tensor) -> Tensor:
        if self.transform is None:
            self.transform = self._find(view)
        priors = self.priors and {k: self.transform(v) if v.ndim == 4 else v for k, v in self.priors.items()}
        return apply_network(self.model, view, priors)


class ClearAIRObjective(nn.Module):
    """``"clearair"``: the pixel term plus clue reuse (:func:`clearair.losses.clue_reuse_loss`); the two extra
    passes run without mask dropout, so the weak and the strong view see the same region masks."""

    def __init__(self, weights: ClearAIRLossWeights | None = None, pixel: str = "l1") -> None:
        super().__init__()
        self.weights, self.pixel = weights or ClearAIRLossWeights(), clearair_losses.pixel_loss(pixel)

    @classmethod
    def build(cls, spec: LossSpec, allow_random: bool = False) -> ClearAIRObjective:
        return cls(clearair_losses.loss_weights("clearair", spec.weights), spec.pixel)

    def forward(
        self, model: nn.Module, batch: dict[str, Any], priors: dict[str, Tensor] | None, probe_psnr: float
    ) -> tuple[Tensor, dict[str, float]]:
        w = self.weights
        restored = apply_network(model, batch["lq"], priors)
        l1 = self.pixel(restored, batch["gt"])
        with eval_mode(model):  # both views see the same (all) region masks
            inter = clue_reuse_loss(AlignedRestore(model, priors, restored.detach()), restored, w.gamma)
        return w.l1 * l1 + w.inter * inter, {"l1": float(l1.detach()), "inter": float(inter.detach())}


# train.loss names a loss (a YAML choice)
LOSSES: dict[str, type[nn.Module]] = {
    "l1": PixelObjective,
    "perceive_ir": PerceiveIRObjective,
    "clearair": ClearAIRObjective,
}


def check_loss(spec: LossSpec) -> None:
    """A ValueError naming the setting and its valid values for anything :func:`build_loss` would refuse, found
    without building anything; every setting is checked, whichever loss uses it."""
    if spec.name not in LOSSES:
        raise ValueError(f"unknown loss {spec.name!r}; valid: {', '.join(LOSSES)}")
    if spec.negative_psnr not in NEGATIVE_PSNR:
        raise ValueError(f"unknown negative_psnr {spec.negative_psnr!r}; valid: {', '.join(NEGATIVE_PSNR)}")
    if spec.con_labels not in CON_LABELS:
        raise ValueError(f"unknown con_labels {spec.con_labels!r}; valid: {', '.join(CON_LABELS)}")
    clearair_losses.pixel_loss(spec.pixel)
    clearair_losses.loss_weights(spec.name, spec.weights)  # l1 takes none


def build_loss(spec: LossSpec, allow_random: bool = False) -> nn.Module:
    """The loss ``spec`` names, with its frozen parts built (random ones only with ``allow_random``)."""
    check_loss(spec)
    return LOSSES[spec.name].build(spec, allow_random)

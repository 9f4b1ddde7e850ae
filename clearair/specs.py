"""The plain records a restorer's training is built from: what crosses a process boundary, and what a checkpoint keeps.

A :class:`RestorerSpec` names the network, the training loss with its frozen parts, the prior provider and the
optimiser; :func:`clearair.lightning.build_restorer_module` builds the module from it where it trains (on each Ray
worker), so no ``nn.Module`` is ever pickled. Its :func:`dataclasses.asdict` form is the module's saved
hyperparameters: plain types that ``torch.load(path, weights_only=True)`` reads back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NetworkSpec:
    """A restorer of :func:`clearair.models.factory.build_model`: its architecture, preset and config overrides."""

    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    preset: str = "paper"


@dataclass(frozen=True)
class LossSpec:
    """A training loss of :data:`clearair.objectives.LOSSES` and its settings.

    Args:
        name: ``"l1"`` (the pixel term alone), ``"perceive_ir"`` (pixel + InfoNCE on CFE + CLIP-aware +
            difficulty-adaptive perceptual) or ``"clearair"`` (pixel + clue reuse).
        weights: fields of :class:`clearair.losses.LossWeights` or :class:`clearair.losses.ClearAIRLossWeights`
            (empty for ``"l1"``).
        pixel: the pixel term (:data:`clearair.losses.PIXEL_LOSSES`): ``"l1"`` as the papers, or ``"mse"``.
        clip_temperature: the CLIP-aware loss's softmax temperature: 1 (raw cosines, as the authors' code) or None
            (the CLIP's learned one).
        con_labels: the InfoNCE labels: ``"family"`` (degradation types; the noise levels one label, as the
            authors) or ``"task"`` (every task its own label; clearair 0.1.0, where noise levels repel).
        con_gather: InfoNCE negatives from every data-parallel rank (the authors' all_gather), not only this rank's.
        vgg_taps, vgg_layer_weights: the perceptual loss's VGG16 layers and weights (None: the authors').
        negative_psnr: each medium negative's PSNR for its difficulty weight: ``"patch"`` of its training crop (as
            the authors), or ``"image"`` the whole image's, stored in the tier shard (clearair 0.1.0).
        perceiver: ``{"config", "prompts"}`` of the frozen stage-1 perceiver, for the CLIP-aware loss.
        vgg: the VGG16 source of the perceptual loss (:func:`clearair.priors.build_vgg_features`).
    """

    name: str = "l1"
    weights: dict[str, float] = field(default_factory=dict)
    pixel: str = "l1"
    clip_temperature: float | None = 1.0
    con_labels: str = "family"
    con_gather: bool = True
    vgg_taps: tuple[str, ...] | None = None
    vgg_layer_weights: tuple[float, ...] | None = None
    negative_psnr: str = "patch"
    perceiver: dict[str, Any] | None = None
    vgg: str | dict[str, Any] | None = None


@dataclass(frozen=True)
class OptimSpec:
    """AdamW on the network's weights, cosine-annealed from ``lr`` to ``min_lr`` over ``max_steps`` optimiser steps
    (:func:`clearair.optim.adamw_cosine`), and the weight average.

    ``ema_decay``: keep an exponential moving average of the network's weights, updated after every optimiser step
    with decay ``min(ema_decay, (1 + n) / (10 + n))`` at update ``n`` (early, untrained weights fade fast in short
    runs); validation, the probe and the export use it. None: no average (clearair 0.1.0).
    """

    max_steps: int
    lr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float | None = None


@dataclass(frozen=True)
class RestorerSpec:
    """Everything :func:`clearair.lightning.build_restorer_module` builds a training module from.

    Args:
        network, optim, loss: see :class:`NetworkSpec`, :class:`OptimSpec`, :class:`LossSpec`.
        priors: a prior-provider spec (:func:`clearair.priors.build_priors`); batches that carry ``prior.*``
            tensors use those instead.
        allow_random_frozen: allow randomly initialised frozen parts (tiny test configs only).
        select_by: what ``val/psnr`` (the score checkpoints are kept by) averages: ``"task_mean"`` the mean of the
            per-task mean PSNRs, as the Perceive-IR authors pick their checkpoint, or ``"image_mean"`` the mean over
            images (clearair 0.1.0).
        probe_every_epoch: re-measure the probe PSNR at every epoch start (else once).
    """

    network: NetworkSpec
    optim: OptimSpec
    loss: LossSpec = field(default_factory=LossSpec)
    priors: dict[str, Any] | None = None
    allow_random_frozen: bool = False
    select_by: str = "task_mean"
    probe_every_epoch: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain types (the checkpoint's hyperparameters); :meth:`from_dict` reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, hp: dict[str, Any]) -> RestorerSpec:
        """The spec of a checkpoint's hyperparameters: :meth:`to_dict`'s, or the flat keyword arguments
        ``RestorerModule`` took before it was built from parts (clearair 0.1 and 0.2 development checkpoints)."""
        if "network" not in hp:
            hp = _nest(hp)
        top = {k: v for k, v in hp.items() if k not in ("network", "optim", "loss")}
        return cls(NetworkSpec(**hp["network"]), OptimSpec(**hp["optim"]), LossSpec(**hp["loss"]), **top)


# The flat keyword arguments of the former RestorerModule that these specs name otherwise.
_RENAMED = {"model_config": "config", "loss": "name", "loss_weights": "weights", "pixel_loss": "pixel"}
_PARTS = {"network": NetworkSpec, "optim": OptimSpec, "loss": LossSpec}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The former flat keyword arguments in :meth:`RestorerSpec.to_dict`'s layout (absent ones take defaults)."""
    named = {_RENAMED.get(k, k): v for k, v in flat.items()}
    named = {k: v for k, v in named.items() if not (k in ("config", "weights") and v is None)}  # None: no overrides
    nested = {part: {f.name: named.pop(f.name) for f in dataclasses.fields(c) if f.name in named}
              for part, c in _PARTS.items()}  # fmt: skip
    return nested | named

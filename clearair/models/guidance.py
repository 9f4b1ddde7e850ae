"""Perceive-IR's guidance modules, usable on any backbone with per-level hooks.

- :class:`SemanticGuidance` (SGM): a frozen DINOv2 wrapper that turns images into the ``"dino_cls"`` prior,
  the CLS tokens of hidden layers 1, 4, 8, 12. It is deliberately *not* a submodule of any restorer: pipelines
  compute the prior once per image and pass it in ``priors``.
- :class:`CFE`: compact feature extraction, a small trainable conv encoder giving a unit-norm degradation
  feature (the InfoNCE loss compares it across crops and tasks).
- :class:`PGM`: prompt guidance module, FiLM of backbone features by ``MLP([dino_l ; cfe])``; the identity at
  initialisation.
- :class:`FiLMGuidedLevel`: a backbone level (see :mod:`clearair.models.restormer`) that FiLMs its input with a
  PGM before running its blocks; how guidance attaches to a backbone without attention of its own (NAFNet).

DINOv2 layer per U-Net level: level ``l`` (1 = full resolution) uses the ``l``-th of the four CLS tokens
(layers 1, 4, 8, 12), deeper and coarser levels getting the more semantic layers; levels deeper than four
(NAFNet's middle) use the last token. See :func:`dino_index`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.pretrained import dinov2_cls_tokens, freeze

log = logging.getLogger(__name__)

DINO_LAYERS = (1, 4, 8, 12)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRIOR_PRODUCERS = {
    "dino_cls": "clearair.models.guidance.SemanticGuidance (frozen DINOv2, CLS tokens of layers 1, 4, 8, 12)",
    "cfe": "the restorer's own CFE module (call the restorer's forward, which computes it from lq)",
}


def require_prior(priors: dict[str, Tensor] | None, key: str) -> Tensor:
    """``priors[key]``, or a ValueError naming the missing key and the module that computes it."""
    if priors is None or key not in priors:
        producer = PRIOR_PRODUCERS.get(key, "the pipeline's prior stage")
        have = sorted(priors) if priors else []
        raise ValueError(f"prior {key!r} is missing (got {have}); compute it with {producer}")
    return priors[key]


def require_dino_cls(priors: dict[str, Tensor] | None, dino_dim: int, num_layers: int = len(DINO_LAYERS)) -> Tensor:
    """The ``(B, num_layers, dino_dim)`` DINOv2 prior, checked for shape."""
    tokens = require_prior(priors, "dino_cls")
    if tokens.ndim != 3 or tokens.shape[1] != num_layers or tokens.shape[2] != dino_dim:
        raise ValueError(
            f"prior 'dino_cls' must be (B, {num_layers}, {dino_dim}), got {tuple(tokens.shape)}: "
            f"was it computed with a DINOv2 of another width than the model config's dino_dim?"
        )
    return tokens


def dino_index(level: int, num_layers: int = len(DINO_LAYERS)) -> int:
    """Index into ``dino_cls`` for U-Net depth ``level`` (1-based): level l -> token l, clamped to the last."""
    return min(level, num_layers) - 1


class CFE(nn.Module):
    """Compact feature extraction: 4 x (3x3 conv stride 2 + GELU), global average pool, linear, L2 norm.

    Args:
        channels: output channels of the four convs (the paper: 32, 64, 96, 128).
        out_dim: size of the degradation feature.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 96, 128), out_dim: int = 128, in_ch: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_ch, *channels[:-1]), channels, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], out_dim)

    def forward(self, lq: Tensor) -> Tensor:
        feat = self.body(lq).mean(dim=(2, 3))  # (B, channels[-1])
        return F.normalize(self.head(feat), dim=-1)  # (B, out_dim), unit norm


def film(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``x * (1 + gamma) + beta`` with ``gamma``, ``beta`` of shape ``(B, C, 1, 1)``."""
    return x * (1 + gamma) + beta


class PGM(nn.Module):
    """Prompt guidance module: FiLM parameters from ``MLP([LN(dino_l) ; cfe])``, last layer zero-initialised.

    The DINOv2 token is layer-normalised first (CLS tokens of deep layers have large, layer-dependent norms);
    the CFE feature is already unit-norm. A fresh PGM returns its input unchanged.
    """

    def __init__(self, feat_dim: int, dino_dim: int, cfe_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.dino_norm = nn.LayerNorm(dino_dim)
        self.mlp = nn.Sequential(nn.Linear(dino_dim + cfe_dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * feat_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def modulation(self, dino: Tensor, cfe: Tensor) -> tuple[Tensor, Tensor]:
        """``gamma, beta`` of shape ``(B, feat_dim, 1, 1)`` from ``dino`` ``(B, D)`` and ``cfe`` ``(B, E)``."""
        params = self.mlp(torch.cat([self.dino_norm(dino), cfe], dim=-1))  # (B, 2C)
        gamma, beta = params[:, :, None, None].chunk(2, dim=1)
        return gamma, beta

    def forward(self, x: Tensor, dino: Tensor, cfe: Tensor) -> Tensor:
        gamma, beta = self.modulation(dino, cfe)
        return film(x, gamma.to(x.dtype), beta.to(x.dtype))  # (B, C, H, W)


class FiLMGuidedLevel(nn.Module):
    """A backbone level whose input is FiLMed by a PGM from ``priors["dino_cls"][:, dino_index]`` and
    ``priors["cfe"]``, then passed through ``blocks`` (each called as ``block(x)``)."""

    def __init__(
        self, blocks: Iterable[nn.Module], feat_dim: int, dino_dim: int, cfe_dim: int, hidden: int, index: int
    ) -> None:
        super().__init__()
        self.index = index
        self.pgm = PGM(feat_dim, dino_dim, cfe_dim, hidden)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        dino = require_prior(priors, "dino_cls")[:, self.index]  # (B, D)
        x = self.pgm(x, dino, require_prior(priors, "cfe"))
        for block in self.blocks:
            x = block(x)
        return x


class SemanticGuidance(nn.Module):
    """Frozen DINOv2 semantic prior: ``{"dino_cls": (B, len(layers), D)}`` from ``(B, 3, H, W)`` images in [0, 1].

    Images are resized to ``image_size`` squared (bilinear, antialiased) and ImageNet-normalised. The wrapped
    model is frozen (eval mode, no gradients; a trainer holds it in :class:`clearair.models.pretrained.Frozen`,
    which keeps it so); build it with :func:`clearair.models.pretrained.load_dinov2`.
    """

    def __init__(self, dinov2: nn.Module, layers: tuple[int, ...] = DINO_LAYERS, image_size: int = 224) -> None:
        super().__init__()
        self.dinov2 = freeze(dinov2)
        self.layers = tuple(layers)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        """Width of the CLS tokens (768 for DINOv2-base)."""
        return int(self.dinov2.config.hidden_size)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = (self.image_size, self.image_size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std  # (B, 3, S, S)
        return {"dino_cls": dinov2_cls_tokens(self.dinov2, x, self.layers)}

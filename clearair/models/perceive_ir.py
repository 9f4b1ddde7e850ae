"""Perceive-IR's restoration network: a Restormer whose latent and decoder levels are prompt-guided.

Encoder levels and the refinement stage use plain transformer blocks (TB). The latent and the three decoder
levels use enhanced transformer blocks (ETB)::

    n = LN(x);  g = PGM(n, dino_l, cfe) = n * (1 + gamma) + beta          # guidance, FiLM of the features
    x = x + PromptCrossAttention(query=g, key/value=n)                   # transposed (channel) attention
    x = x + MDTA(LN(x));  x = x + GDFN(LN(x))

Each guided level owns one PGM; its ``gamma, beta`` depend only on the image-level priors, so they are computed
once per level and applied to the input of every ETB of that level. DINOv2 layer per level: latent (1/8) ->
layer 12, decoder level 3 (1/4) -> layer 8, level 2 (1/2) -> layer 4, level 1 (full resolution) -> layer 1
(:func:`clearair.models.guidance.dino_index`).

The frozen DINOv2 is not part of this module: ``priors["dino_cls"]`` comes in from
:class:`clearair.models.guidance.SemanticGuidance` or a pipeline stage. The CFE is part of it (``model.cfe``)
and is computed from ``lq`` inside :meth:`PerceiveIR.forward_features`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from clearair.models.guidance import CFE, DINO_LAYERS, PGM, dino_index, film, require_dino_cls, require_prior
from clearair.models.restormer import (
    GDFN,
    MDTA,
    LayerNorm2d,
    LevelSpec,
    Restormer,
    RestormerConfig,
    transformer_level,
    transposed_attention,
)

log = logging.getLogger(__name__)

GUIDED_STAGES = ("latent", "dec3", "dec2", "dec1")


@dataclass(frozen=True)
class PerceiveIRConfig:
    """Perceive-IR: a Restormer backbone plus the guidance sizes (DINOv2 width, CFE feature, PGM hidden)."""

    backbone: RestormerConfig = field(default_factory=RestormerConfig)
    dino_dim: int = 768
    cfe_dim: int = 128
    pgm_hidden: int = 256
    cfe_channels: tuple[int, ...] = (32, 64, 96, 128)

    @classmethod
    def paper(cls) -> PerceiveIRConfig:
        """Restormer paper backbone with DINOv2-base tokens (768-d) and a 128-d CFE."""
        return cls()

    @classmethod
    def tiny(cls) -> PerceiveIRConfig:
        """Tiny Restormer, tiny-DINOv2 width 32, small CFE: for tests."""
        return cls(RestormerConfig.tiny(), dino_dim=32, cfe_dim=16, pgm_hidden=16, cfe_channels=(8, 8, 16, 16))


class PromptCrossAttention(nn.Module):
    """Transposed cross attention: queries from the guidance map, keys and values from the features."""

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.q = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=bias), nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias)
        )
        self.kv = nn.Sequential(
            nn.Conv2d(dim, dim * 2, 1, bias=bias), nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=bias)
        )
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, guide: Tensor, feat: Tensor) -> Tensor:
        k, v = self.kv(feat).chunk(2, dim=1)  # 2 x (B, C, H, W)
        return self.proj(transposed_attention(self.q(guide), k, v, self.heads, self.temperature))


class ETB(nn.Module):
    """Enhanced transformer block: prompt-guided cross attention, then MDTA and GDFN (all pre-norm residual)."""

    def __init__(self, dim: int, heads: int, expansion: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        self.norm0 = LayerNorm2d(dim)
        self.cross = PromptCrossAttention(dim, heads, bias)
        self.norm1 = LayerNorm2d(dim)
        self.attn = MDTA(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GDFN(dim, expansion, bias)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        n = self.norm0(x)
        x = x + self.cross(film(n, gamma.to(n.dtype), beta.to(n.dtype)), n)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PromptGuidedLevel(nn.Module):
    """One latent/decoder level: a PGM (FiLM parameters from the level's DINOv2 token and the CFE) and ETBs."""

    def __init__(self, spec: LevelSpec, cfg: PerceiveIRConfig) -> None:
        super().__init__()
        b = cfg.backbone
        self.index = dino_index(spec.level)
        self.pgm = PGM(spec.dim, cfg.dino_dim, cfg.cfe_dim, cfg.pgm_hidden)
        self.blocks = nn.ModuleList(ETB(spec.dim, spec.heads, b.ffn_expansion, b.bias) for _ in range(spec.num_blocks))

    def forward(self, x: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        dino = require_prior(priors, "dino_cls")[:, self.index]  # (B, D)
        gamma, beta = self.pgm.modulation(dino, require_prior(priors, "cfe"))  # 2 x (B, C, 1, 1)
        for block in self.blocks:
            x = block(x, gamma, beta)
        return x


def perceive_ir_level(spec: LevelSpec, cfg: PerceiveIRConfig) -> nn.Module:
    """Level factory: ETB levels for the latent and decoder, plain TB levels for the encoder and refinement."""
    if spec.name in GUIDED_STAGES:
        return PromptGuidedLevel(spec, cfg)
    return transformer_level(spec, cfg.backbone.ffn_expansion, cfg.backbone.bias)


class PerceiveIR(nn.Module):
    """Perceive-IR restorer. ``forward(lq, priors)`` needs ``priors["dino_cls"]`` ``(B, 4, dino_dim)``."""

    arch = "perceive_ir"
    required_priors = ("dino_cls",)

    def __init__(self, cfg: PerceiveIRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.cfe = CFE(cfg.cfe_channels, cfg.cfe_dim, cfg.backbone.in_ch)
        self.backbone = Restormer(cfg.backbone, level_factory=partial(perceive_ir_level, cfg=cfg))
        self.size_multiple = self.backbone.size_multiple

    def forward_features(self, lq: Tensor, priors: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(restored (B, 3, H, W), cfe feature (B, cfe_dim))``: training reuses the CFE feature in InfoNCE."""
        require_dino_cls(priors, self.config.dino_dim, len(DINO_LAYERS))
        cfe = self.cfe(lq)  # (B, cfe_dim)
        return self.backbone(lq, {**priors, "cfe": cfe}), cfe

    def forward(self, lq: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        return self.forward_features(lq, priors)[0]

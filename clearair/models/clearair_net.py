"""ClearAIR: coarse-to-fine all-in-one restoration, "how -> where -> what", on a Restormer U-Net.

Three image-level priors steer the network (all computed outside it by frozen models, see
:func:`clearair.models.assessors.compute_clearair_priors`):

- ``"quality_emb"`` ``(B, quality_dim)`` -- *how* degraded the image is overall (an IQA embedding). An adapter
  (Linear-GELU-Linear) maps it to ``F_q`` once; a Quality Guidance Module (QGM) at every U-Net level modulates the
  features per channel: ``X * (1 + Linear(F_q)) + Linear(F_q)``. This is the paper's ``X * Linear(F_q) +
  Linear(F_q)`` with the scale written as ``1 + s``; both linears are zero-initialised, so a fresh QGM is exactly
  the identity and training starts from the plain backbone.
- ``"region_masks"`` ``(B, M, h, w)`` in [0, 1] -- *where*: M region masks (SAM2 or DINOv2 clusters) at any
  resolution, resized to each level (bilinear, antialiased). Mask-average pooling of the level's features gives
  one token per region; semantic cross-attention lets every pixel (query) attend to the M region tokens
  (keys/values), so the attention map is ``(B, heads, HW, M)``: memory O(HW x M), never HW x HW. Empty masks and
  masks removed by mask dropout are excluded from the keys. Mask dropout (training only) removes each mask with
  probability ``mask_dropout``, the same masks at every level, and always keeps at least one non-empty mask.
- ``"degradation_emb"`` ``(B, degradation_dim)`` -- *what* degradation it is. ``softmax(MLP(F_d))`` weighs
  ``n_degradation_prompts`` learnable prompts (one prompt bank per level, ``n x C``); a degradation-aware module
  uses the weighted prompt as a query that attends over the pixels (a spatial softmax), and the context it finds,
  together with the prompt, gates the channels: ``X + proj(LN(X) * sigmoid(W [ctx ; p]))``.

Where each sits (before the Transformer blocks of its level)::

    enc1, enc2, enc3:          QGM -> blocks
    latent, dec3, dec2, dec1:  QGM (how) -> semantic cross-attention (where) -> degradation-aware (what) -> blocks
    refine:                    blocks

The fourth stage of the paper, internal clue reuse ("details"), is a self-supervised loss
(:func:`clearair.losses.clue_reuse_loss`) and adds nothing to the network.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.restormer import (
    LayerNorm2d,
    LevelSpec,
    Restormer,
    RestormerConfig,
    TransformerBlock,
    transformer_level,
)

log = logging.getLogger(__name__)

GUIDED_STAGES = ("latent", "dec3", "dec2", "dec1")
QUALITY_STAGES = ("enc1", "enc2", "enc3", *GUIDED_STAGES)
PRIOR_SOURCES = {
    "quality_emb": "clearair.models.assessors.PerceiverAssessor (default) or MLLMAssessor",
    "region_masks": "clearair.models.regions.DinoClusterRegions (default) or Sam2Regions",
    "degradation_emb": "clearair.models.assessors.DegradationEmbedder (default) or DaClipEmbedder",
}


def _clearair_backbone() -> RestormerConfig:
    return RestormerConfig(dim=48, num_blocks=(3, 5, 6, 8), num_refinement=4, heads=(1, 2, 4, 8))


@dataclass(frozen=True)
class ClearAIRConfig:
    """ClearAIR architecture.

    ``quality_dim`` and ``degradation_dim`` must match the prior sources used: e.g.
    ``dataclasses.replace(cfg, quality_dim=assessor.dim, degradation_dim=degrader.dim)``. ``n_regions`` is the
    number of masks the region source gives (no weight depends on it; the network checks it to catch a prior
    computed with another source).
    """

    backbone: RestormerConfig = field(default_factory=_clearair_backbone)
    quality_dim: int = 4096
    degradation_dim: int = 512
    n_regions: int = 16
    n_degradation_prompts: int = 5
    mask_dropout: float = 0.2
    adapter_hidden: int = 256

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_dropout < 1.0:
            raise ValueError(f"mask_dropout must be in [0, 1), got {self.mask_dropout}")

    @classmethod
    def paper(cls) -> ClearAIRConfig:
        """The paper's setting: Restormer blocks (3, 5, 6, 8), dims 48..384, 16 SAM2 masks, dropout 0.2.

        ``quality_dim`` 4096 is the hidden size of the paper's MLLM IQA model (DeQA-Score, LLaMA-2-7B based);
        ``degradation_dim`` 512 that of DA-CLIP ViT-B/32. With the default sources (perceiver, CFE) replace them.
        """
        return cls()

    @classmethod
    def tiny(cls) -> ClearAIRConfig:
        """A small variant for tests and smoke runs (tiny Restormer, 4 regions, 16-d priors)."""
        return cls(
            backbone=RestormerConfig.tiny(),
            quality_dim=16,
            degradation_dim=16,
            n_regions=4,
            n_degradation_prompts=3,
            adapter_hidden=16,
        )


class QualityGuidance(nn.Module):
    """QGM: per-channel affine modulation ``x * (1 + scale(F_q)) + shift(F_q)``; identity at initialisation."""

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.scale = nn.Linear(cond_dim, dim)
        self.shift = nn.Linear(cond_dim, dim)
        for layer in (self.scale, self.shift):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, fq: Tensor) -> Tensor:
        scale = self.scale(fq)[:, :, None, None]  # (B, C, 1, 1)
        shift = self.shift(fq)[:, :, None, None]
        return x * (1 + scale) + shift


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks ``(B, M, h, w)`` resized to ``size`` (bilinear, antialiased when shrinking; stays in [0, 1])."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False, antialias=True)


def region_tokens(x: Tensor, masks: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Mask-average pooling: ``(tokens (B, M, C), area (B, M))`` of features ``x`` ``(B, C, H, W)``.

    ``masks`` ``(B, M, H, W)`` weigh the pixels; an empty mask gives a zero token and zero area.
    """
    m = masks.flatten(2).to(x.dtype)  # (B, M, HW)
    area = m.sum(-1)  # (B, M)
    tokens = m @ x.flatten(2).transpose(1, 2)  # (B, M, C)
    return tokens / area.clamp(min=eps).unsqueeze(-1), area


class SemanticCrossAttention(nn.Module):
    """Pixels attend to region tokens: queries from each pixel, keys/values from mask-pooled region features.

    The attention map is ``(B, heads, HW, M)``; regions flagged invalid (empty or dropped) get no weight, and a
    sample without any valid region is left unchanged. Residual: ``x + proj(attention)``.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm = LayerNorm2d(dim)
        self.to_q = nn.Conv2d(dim, dim, 1, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``; ``masks`` ``(B, M, h, w)`` at any size; ``valid`` ``(B, M)`` bool."""
        b, c, h, w = x.shape
        d = c // self.heads
        xn = self.norm(x)
        tokens, area = region_tokens(xn, resize_masks(masks, (h, w)))  # (B, M, C), (B, M)
        valid = valid & (area > 0)
        q = self.to_q(xn).reshape(b, self.heads, d, h * w).transpose(-2, -1)  # (B, heads, HW, d)
        k, v = self.to_kv(tokens).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # 2 x (B, heads, M, d)
        logits = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, heads, HW, M)
        logits = logits.masked_fill(~valid[:, None, None, :], torch.finfo(logits.dtype).min)
        attn = logits.softmax(dim=-1) * valid.any(dim=-1).to(logits.dtype)[:, None, None, None]
        out = (attn @ v).transpose(-2, -1).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class DegradationAware(nn.Module):
    """The "what" module: a weighted degradation prompt attends over the pixels, then gates the channels.

    ``p = weights @ prompts`` ``(B, C)`` is the query of a per-head spatial attention over the level's pixels; the
    attended context ``ctx`` ``(B, C)`` and ``p`` give a channel gate ``sigmoid(W [ctx ; p])`` applied to the
    normalised features; residual ``x + proj(gated)``.

    Args:
        dim: channels of the level.
        n_prompts: number of learnable degradation prompts.
        heads: attention heads of the spatial attention.
    """

    def __init__(self, dim: int, n_prompts: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.prompts = nn.Parameter(torch.randn(n_prompts, dim) * 0.02)  # (n, C)
        self.norm = LayerNorm2d(dim)
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Conv2d(dim, 2 * dim, 1, bias=bias)
        self.gate = nn.Linear(2 * dim, dim)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """``x`` ``(B, C, H, W)``; ``weights`` ``(B, n)`` rows summing to 1."""
        b, c, h, w = x.shape
        d = c // self.heads
        xn = self.norm(x)
        p = weights.to(x.dtype) @ self.prompts.to(x.dtype)  # (B, C)
        q = self.to_q(p).reshape(b, self.heads, 1, d)  # (B, heads, 1, d)
        k, v = self.to_kv(xn).reshape(b, 2, self.heads, d, h * w).unbind(1)  # 2 x (B, heads, d, HW)
        attn = ((q @ k) / math.sqrt(d)).softmax(dim=-1)  # (B, heads, 1, HW)
        ctx = (attn @ v.transpose(-2, -1)).reshape(b, c)  # (B, C)
        gate = torch.sigmoid(self.gate(torch.cat([ctx, p], dim=-1)))[:, :, None, None]  # (B, C, 1, 1)
        return x + self.proj(xn * gate)


class ClearAIRLevel(nn.Module):
    """One U-Net level: QGM, then (on guided levels) region cross-attention and the degradation-aware module,
    then the level's Transformer blocks. Reads the guidance dict built by :meth:`ClearAIRNet.forward`."""

    def __init__(self, spec: LevelSpec, cfg: ClearAIRConfig) -> None:
        super().__init__()
        bb = cfg.backbone
        self.qgm = QualityGuidance(cfg.adapter_hidden, spec.dim)
        self.guided = spec.name in GUIDED_STAGES
        if self.guided:
            self.where = SemanticCrossAttention(spec.dim, spec.heads, bb.bias)
            self.what = DegradationAware(spec.dim, cfg.n_degradation_prompts, spec.heads, bb.bias)
        self.blocks = nn.ModuleList(
            TransformerBlock(spec.dim, spec.heads, bb.ffn_expansion, bb.bias) for _ in range(spec.num_blocks)
        )

    def forward(self, x: Tensor, guide: dict[str, Tensor]) -> Tensor:
        x = self.qgm(x, guide["fq"])  # how
        if self.guided:
            x = self.where(x, guide["region_masks"], guide["region_valid"])  # where
            x = self.what(x, guide["prompt_weights"])  # what
        for block in self.blocks:
            x = block(x)
        return x


def drop_masks(masks: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Mask dropout: each non-empty mask is removed with probability ``p``; at least one survives per image.

    Returns ``(masks with dropped ones zeroed (B, M, h, w), kept (B, M) bool)``. An image whose masks are all
    empty keeps none (there is nothing to keep).
    """
    present = masks.flatten(2).amax(-1) > 0  # (B, M)
    keep = present & (torch.rand(present.shape, device=masks.device) >= p)
    lost = ~keep.any(dim=1) & present.any(dim=1)  # (B,)
    if lost.any():
        pick = (torch.rand(present.shape, device=masks.device) * present).argmax(dim=1)  # a random present mask
        keep[lost, pick[lost]] = True
    return masks * keep[:, :, None, None].to(masks.dtype), keep


class ClearAIRNet(nn.Module):
    """The ClearAIR restorer: a Restormer U-Net with QGM, semantic cross-attention and degradation-aware modules.

    ``forward(lq, priors)`` needs the three priors described in the module docstring; H and W must be multiples
    of 8. Holds only trainable parts; the frozen models that compute the priors live outside.
    """

    arch = "clearair"
    size_multiple = 8
    required_priors = tuple(PRIOR_SOURCES)

    def __init__(self, cfg: ClearAIRConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.adapter_hidden
        self.quality_adapter = nn.Sequential(nn.Linear(cfg.quality_dim, h), nn.GELU(), nn.Linear(h, h))
        self.prompt_mlp = nn.Sequential(
            nn.Linear(cfg.degradation_dim, h), nn.GELU(), nn.Linear(h, cfg.n_degradation_prompts)
        )
        self.backbone = Restormer(cfg.backbone, level_factory=self._level)

    def _level(self, spec: LevelSpec) -> nn.Module:
        if spec.name in QUALITY_STAGES:
            return ClearAIRLevel(spec, self.config)
        bb = self.config.backbone
        return transformer_level(spec, bb.ffn_expansion, bb.bias)

    def _check_priors(self, lq: Tensor, priors: dict[str, Tensor] | None) -> dict[str, Tensor]:
        priors = priors or {}
        for key, source in PRIOR_SOURCES.items():
            if key not in priors:
                raise ValueError(
                    f"ClearAIRNet needs the prior {key!r}: compute it with {source} "
                    f"(clearair.models.assessors.compute_clearair_priors gives all three)"
                )
        cfg, b = self.config, lq.shape[0]
        expected = {"quality_emb": (b, cfg.quality_dim), "degradation_emb": (b, cfg.degradation_dim)}
        for key, shape in expected.items():
            if tuple(priors[key].shape) != shape:
                raise ValueError(
                    f"prior {key!r} has shape {tuple(priors[key].shape)}, expected {shape}: set ClearAIRConfig."
                    f"{key.replace('_emb', '_dim')} to the dimension of {PRIOR_SOURCES[key]}"
                )
        masks = priors["region_masks"]
        if masks.ndim != 4 or masks.shape[:2] != (b, cfg.n_regions):
            raise ValueError(
                f"prior 'region_masks' has shape {tuple(masks.shape)}, expected ({b}, {cfg.n_regions}, h, w) "
                f"(ClearAIRConfig.n_regions={cfg.n_regions})"
            )
        return priors

    def guidance(self, lq: Tensor, priors: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """The per-image guidance every level reads: ``fq``, ``region_masks``, ``region_valid``, ``prompt_weights``.

        Mask dropout is drawn here (training mode only), so all levels see the same surviving masks.
        """
        p = self._check_priors(lq, priors)
        param = self.quality_adapter[0].weight
        masks = p["region_masks"].to(device=lq.device, dtype=torch.float32)
        if self.training and self.config.mask_dropout > 0:
            masks, valid = drop_masks(masks, self.config.mask_dropout)
        else:
            valid = masks.flatten(2).amax(-1) > 0  # (B, M)
        fq = self.quality_adapter(p["quality_emb"].to(device=lq.device, dtype=param.dtype))  # (B, hidden)
        logits = self.prompt_mlp(p["degradation_emb"].to(device=lq.device, dtype=param.dtype))  # (B, n)
        return {"fq": fq, "region_masks": masks, "region_valid": valid, "prompt_weights": logits.softmax(dim=-1)}

    def forward(self, lq: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        """Restore ``lq`` ``(B, 3, H, W)`` in [0, 1] given the priors; returns ``(B, 3, H, W)`` (global residual)."""
        return self.backbone(lq, self.guidance(lq, priors))

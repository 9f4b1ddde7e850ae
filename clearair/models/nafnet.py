"""NAFNet, the second backbone, and its guided variant (Perceive-IR's CFE + PGM attached per level).

NAFBlock (nonlinear-activation-free block, Chen et al. 2022)::

    y = x + beta  * conv1x1(SCA(SimpleGate(dwconv3x3(conv1x1(LN(x))))))     # spatial mixing
    z = y + gamma * conv1x1(SimpleGate(conv1x1(LN(y))))                     # channel feed-forward

SimpleGate splits the channels in two halves and multiplies them (it replaces GELU); simplified channel
attention (SCA) scales channels by ``conv1x1(global average pool)``; ``beta``/``gamma`` are zero-initialised.
The U-Net downsamples with 2x2 stride-2 convs (channels x2), upsamples with 1x1 conv + PixelShuffle, and adds
(not concatenates) the skips.

Levels follow the mechanism of :mod:`clearair.models.restormer`: ``enc1..enc4, middle, dec4..dec1`` are built
by a level factory and called as ``level(x, priors)``. :class:`GuidedNAFNet` uses a factory that wraps every
level in :class:`clearair.models.guidance.FiLMGuidedLevel`: the level input is FiLMed by a PGM from the
level's DINOv2 token (enc/dec level l -> token l, the middle -> layer 12) and the CFE feature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from clearair.models.guidance import CFE, DINO_LAYERS, FiLMGuidedLevel, dino_index, require_dino_cls
from clearair.models.restormer import LayerNorm2d, Level, LevelFactory, LevelSpec, check_input

log = logging.getLogger(__name__)


class SimpleGate(nn.Module):
    """Split channels in halves and multiply them: ``(B, 2C, H, W) -> (B, C, H, W)``."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet block with SimpleGate and simplified channel attention; residual scales start at zero."""

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2) -> None:
        super().__init__()
        dw, ffn = channels * dw_expand, channels * ffn_expand
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.gate = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, channels, 1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, channels, 1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate(self.conv2(self.conv1(self.norm1(x))))  # (B, C * dw_expand / 2, H, W)
        y = x + self.beta * self.conv3(h * self.sca(h))
        h = self.gate(self.conv4(self.norm2(y)))  # (B, C * ffn_expand / 2, H, W)
        return y + self.gamma * self.conv5(h)


@dataclass(frozen=True)
class NAFNetConfig:
    """NAFNet architecture: ``width`` channels at full resolution, doubled at each of the encoder levels."""

    in_ch: int = 3
    width: int = 32
    enc_blocks: tuple[int, ...] = (2, 2, 4, 8)
    middle_blocks: int = 12
    dec_blocks: tuple[int, ...] = (2, 2, 2, 2)

    @classmethod
    def paper(cls) -> NAFNetConfig:
        """NAFNet-width32 as in the paper's denoising configuration (~29M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> NAFNetConfig:
        """Width 8, one block per level: for tests."""
        return cls(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1))


def nafnet_level_specs(cfg: NAFNetConfig) -> list[LevelSpec]:
    """Levels in execution order; ``heads`` is unused (0) for NAFNet; the middle sits at depth ``depth + 1``."""
    if len(cfg.enc_blocks) != len(cfg.dec_blocks):
        raise ValueError(f"enc_blocks {cfg.enc_blocks} and dec_blocks {cfg.dec_blocks} need the same length")
    depth = len(cfg.enc_blocks)
    enc = [LevelSpec(f"enc{i + 1}", i + 1, cfg.width * 2**i, 0, n) for i, n in enumerate(cfg.enc_blocks)]
    middle = [LevelSpec("middle", depth + 1, cfg.width * 2**depth, 0, cfg.middle_blocks)]
    dec = [LevelSpec(f"dec{i + 1}", i + 1, cfg.width * 2**i, 0, n) for i, n in enumerate(cfg.dec_blocks)]
    return enc + middle + dec[::-1]


def naf_level(spec: LevelSpec) -> Level:
    """The default level: ``spec.num_blocks`` NAFBlocks."""
    return Level(NAFBlock(spec.dim) for _ in range(spec.num_blocks))


class NAFNet(nn.Module):
    """NAFNet U-Net with a global residual; H and W must be multiples of ``2 ** len(enc_blocks)``.

    Args:
        cfg: architecture.
        level_factory: builds each level from its :class:`LevelSpec`; ``None`` gives plain NAFBlocks.
    """

    arch = "nafnet"
    required_priors: tuple[str, ...] = ()  # runs on the image alone

    def __init__(self, cfg: NAFNetConfig, level_factory: LevelFactory | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.size_multiple = 2 ** len(cfg.enc_blocks)
        factory = level_factory or naf_level
        specs = nafnet_level_specs(cfg)
        enc_dims = [s.dim for s in specs if s.name.startswith("enc")]
        self.intro = nn.Conv2d(cfg.in_ch, cfg.width, 3, padding=1)
        self.levels = nn.ModuleDict({s.name: factory(s) for s in specs})
        self.downs = nn.ModuleList(nn.Conv2d(c, c * 2, 2, stride=2) for c in enc_dims)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c * 2, c * 4, 1, bias=False), nn.PixelShuffle(2)) for c in reversed(enc_dims)
        )
        self.ending = nn.Conv2d(cfg.width, cfg.in_ch, 3, padding=1)

    def forward(self, lq: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        """Restore ``lq`` ``(B, in_ch, H, W)``; ``priors`` is handed unchanged to every level."""
        check_input(lq, self.size_multiple)
        p = priors if priors is not None else {}
        depth = len(self.downs)
        x = self.intro(lq)  # (B, w, H, W)
        skips = []
        for i, down in enumerate(self.downs):
            x = self.levels[f"enc{i + 1}"](x, p)  # (B, w * 2^i, H / 2^i, W / 2^i)
            skips.append(x)
            x = down(x)
        x = self.levels["middle"](x, p)  # (B, w * 2^depth, H / 2^depth, W / 2^depth)
        for i, up in zip(range(depth, 0, -1), self.ups, strict=True):
            x = self.levels[f"dec{i}"](up(x) + skips[i - 1], p)  # (B, w * 2^(i-1), ...)
        return self.ending(x) + lq


@dataclass(frozen=True)
class GuidedNAFNetConfig:
    """NAFNet plus Perceive-IR guidance sizes (the same fields as :class:`PerceiveIRConfig`)."""

    backbone: NAFNetConfig = field(default_factory=NAFNetConfig)
    dino_dim: int = 768
    cfe_dim: int = 128
    pgm_hidden: int = 256
    cfe_channels: tuple[int, ...] = (32, 64, 96, 128)

    @classmethod
    def paper(cls) -> GuidedNAFNetConfig:
        """NAFNet-width32 with DINOv2-base tokens and the paper's CFE."""
        return cls()

    @classmethod
    def tiny(cls) -> GuidedNAFNetConfig:
        """Tiny NAFNet, tiny-DINOv2 width 32, small CFE: for tests."""
        return cls(NAFNetConfig.tiny(), dino_dim=32, cfe_dim=16, pgm_hidden=16, cfe_channels=(8, 8, 16, 16))


def guided_naf_level(spec: LevelSpec, cfg: GuidedNAFNetConfig) -> FiLMGuidedLevel:
    """Level factory: NAFBlocks behind a PGM fed by the level's DINOv2 token and the CFE feature."""
    blocks = (NAFBlock(spec.dim) for _ in range(spec.num_blocks))
    return FiLMGuidedLevel(blocks, spec.dim, cfg.dino_dim, cfg.cfe_dim, cfg.pgm_hidden, dino_index(spec.level))


class GuidedNAFNet(nn.Module):
    """NAFNet with Perceive-IR's guidance; the same ``forward``/``forward_features`` contract as PerceiveIR.

    Args:
        cfg: a :class:`GuidedNAFNetConfig`, or a :class:`NAFNetConfig` together with ``dino_dim``/``cfe_dim``.
    """

    arch = "nafnet_guided"
    required_priors = ("dino_cls",)

    def __init__(
        self, cfg: GuidedNAFNetConfig | NAFNetConfig, dino_dim: int | None = None, cfe_dim: int | None = None
    ) -> None:
        super().__init__()
        if isinstance(cfg, NAFNetConfig):
            sizes = {k: v for k, v in (("dino_dim", dino_dim), ("cfe_dim", cfe_dim)) if v is not None}
            cfg = GuidedNAFNetConfig(backbone=cfg, **sizes)
        elif dino_dim is not None or cfe_dim is not None:
            raise ValueError("give dino_dim/cfe_dim inside the GuidedNAFNetConfig, not as extra arguments")
        self.config = cfg
        self.cfe = CFE(cfg.cfe_channels, cfg.cfe_dim, cfg.backbone.in_ch)
        self.backbone = NAFNet(cfg.backbone, level_factory=partial(guided_naf_level, cfg=cfg))
        self.size_multiple = self.backbone.size_multiple

    def forward_features(self, lq: Tensor, priors: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(restored (B, 3, H, W), cfe feature (B, cfe_dim))``."""
        require_dino_cls(priors, self.config.dino_dim, len(DINO_LAYERS))
        cfe = self.cfe(lq)  # (B, cfe_dim)
        return self.backbone(lq, {**priors, "cfe": cfe}), cfe

    def forward(self, lq: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        return self.forward_features(lq, priors)[0]

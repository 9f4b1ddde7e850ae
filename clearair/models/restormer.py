"""Restormer: a 4-level U-shaped transformer with transposed (channel) attention, and its building blocks.

Block = LayerNorm + MDTA (multi-Dconv-head transposed attention: a C x C attention map per head, so time and
memory grow linearly with the number of pixels) + LayerNorm + GDFN (gated depthwise-conv feed-forward).

Per-level injection (how Perceive-IR, ClearAIR and guided variants reuse this backbone)
-------------------------------------------------------------------------------------
The network is a fixed skeleton of *levels*: ``enc1, enc2, enc3, latent, dec3, dec2, dec1, refine``. Each level is
built by a ``level_factory(spec: LevelSpec) -> nn.Module`` given to :class:`Restormer`; the default factory,
:func:`transformer_level`, stacks plain :class:`TransformerBlock`s. Every level module is called as
``level(x, priors)`` with ``x`` of shape ``(B, spec.dim, H / 2**(spec.level-1), W / 2**(spec.level-1))`` and
``priors`` the dict given to :meth:`Restormer.forward` (image-level side information such as ``"dino_cls"``,
possibly extended by a wrapper, e.g. with ``"cfe"``), and must return a tensor of the same shape. A wrapper that
needs extra per-level operations writes a factory that returns its own level module for the stages it cares
about and :func:`transformer_level` for the rest, e.g.::

    def my_levels(spec: LevelSpec) -> nn.Module:
        if spec.name.startswith("enc"):
            return transformer_level(spec, cfg.ffn_expansion, cfg.bias)
        return MyGuidedLevel(spec, ...)      # forward(x, priors) -> x

    backbone = Restormer(cfg, level_factory=my_levels)
    restored = backbone(lq, {"dino_cls": tokens, "cfe": feature})
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

STAGES = ("enc1", "enc2", "enc3", "latent", "dec3", "dec2", "dec1", "refine")


def check_input(lq: Tensor, multiple: int) -> None:
    """Raise a ValueError unless ``lq`` is ``(B, C, H, W)`` with H and W multiples of ``multiple``."""
    if lq.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(lq.shape)}")
    h, w = lq.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"height and width must be multiples of {multiple}, got {h}x{w}: reflect-pad the input "
            f"(clearair.inference does this) or crop it"
        )


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a ``(B, C, H, W)`` map, with a learnable scale and bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


def transposed_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, temperature: Tensor) -> Tensor:
    """Attention across channels: per head a ``(C/heads) x (C/heads)`` map, so cost is linear in pixels.

    ``q``, ``k``, ``v`` are ``(B, C, H, W)``; query and key are L2-normalised over the pixels so the map is a
    cosine similarity scaled by the per-head learnable ``temperature`` ``(heads, 1, 1)``.
    """
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))  # (B, heads, C/heads, HW)
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature  # (B, heads, C/heads, C/heads)
    out = attn.softmax(dim=-1) @ v  # (B, heads, C/heads, HW)
    return out.reshape(b, c, h, w)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: 1x1 conv + 3x3 depthwise conv make q, k, v; channel attention."""

    def __init__(self, dim: int, heads: int, bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)  # 3 x (B, C, H, W)
        return self.proj(transposed_attention(q, k, v, self.heads, self.temperature))


class GDFN(nn.Module):
    """Gated depthwise-conv feed-forward: GELU(branch 1) * branch 2, hidden width ``int(dim * expansion)``."""

    def __init__(self, dim: int, expansion: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.dw(self.project_in(x)).chunk(2, dim=1)  # 2 x (B, hidden, H, W)
        return self.project_out(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """Pre-norm Restormer block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, dim: int, heads: int, expansion: float = 2.66, bias: bool = False) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim)
        self.attn = MDTA(dim, heads, bias)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = GDFN(dim, expansion, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """Overlapping 3x3 conv embedding of the image into ``dim`` channels at full resolution."""

    def __init__(self, in_ch: int = 3, dim: int = 48, bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Halve H and W, double channels: 3x3 conv to ``dim // 2`` then PixelUnshuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, 2C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W, halve channels: 3x3 conv to ``dim * 2`` then PixelShuffle(2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, C/2, 2H, 2W)


@dataclass(frozen=True)
class LevelSpec:
    """What a level factory needs to build one level.

    ``level`` is the U-Net depth (1 = full resolution, 4 = the latent at 1/8); ``dim`` the channels the level
    sees (decoder level 1 and the refinement run at twice the base dim, after the skip concat).
    """

    name: str
    level: int
    dim: int
    heads: int
    num_blocks: int


class Level(nn.Module):
    """A stack of blocks applied in order; ``priors`` is accepted and ignored (the plain, unguided level)."""

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


LevelFactory = Callable[[LevelSpec], nn.Module]


def transformer_level(spec: LevelSpec, expansion: float = 2.66, bias: bool = False) -> Level:
    """The default level: ``spec.num_blocks`` plain :class:`TransformerBlock`s."""
    return Level(TransformerBlock(spec.dim, spec.heads, expansion, bias) for _ in range(spec.num_blocks))


@dataclass(frozen=True)
class RestormerConfig:
    """Restormer architecture. Level dims are ``dim * (1, 2, 4, 8)``; ``num_blocks``/``heads`` per level."""

    in_ch: int = 3
    out_ch: int = 3
    dim: int = 48
    num_blocks: tuple[int, int, int, int] = (4, 6, 6, 8)
    num_refinement: int = 4
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion: float = 2.66
    bias: bool = False

    @classmethod
    def paper(cls) -> RestormerConfig:
        """The Restormer / Perceive-IR configuration (~26M parameters for the plain network)."""
        return cls()

    @classmethod
    def tiny(cls) -> RestormerConfig:
        """A ~0.2M-parameter variant for tests and smoke runs."""
        return cls(dim=8, num_blocks=(1, 1, 1, 1), num_refinement=1)


def level_specs(cfg: RestormerConfig) -> list[LevelSpec]:
    """The eight levels of the U-Net, in execution order (names as in :data:`STAGES`)."""
    d, n, h = cfg.dim, cfg.num_blocks, cfg.heads
    return [
        LevelSpec("enc1", 1, d, h[0], n[0]),
        LevelSpec("enc2", 2, d * 2, h[1], n[1]),
        LevelSpec("enc3", 3, d * 4, h[2], n[2]),
        LevelSpec("latent", 4, d * 8, h[3], n[3]),
        LevelSpec("dec3", 3, d * 4, h[2], n[2]),
        LevelSpec("dec2", 2, d * 2, h[1], n[1]),
        LevelSpec("dec1", 1, d * 2, h[0], n[0]),
        LevelSpec("refine", 1, d * 2, h[0], cfg.num_refinement),
    ]


class Restormer(nn.Module):
    """The 4-level Restormer U-Net with a global residual (``out = conv(features) + lq``).

    Args:
        cfg: architecture.
        level_factory: builds each level from its :class:`LevelSpec` (see the module docstring); ``None`` gives
            plain transformer blocks everywhere.
    """

    arch = "restormer"
    size_multiple = 8
    required_priors: tuple[str, ...] = ()  # runs on the image alone

    def __init__(self, cfg: RestormerConfig, level_factory: LevelFactory | None = None) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.dim
        if level_factory is None:

            def level_factory(spec: LevelSpec) -> nn.Module:
                return transformer_level(spec, cfg.ffn_expansion, cfg.bias)

        self.patch_embed = PatchEmbed(cfg.in_ch, d, cfg.bias)
        self.levels = nn.ModuleDict({spec.name: level_factory(spec) for spec in level_specs(cfg)})
        self.down1 = Downsample(d)
        self.down2 = Downsample(d * 2)
        self.down3 = Downsample(d * 4)
        self.up3 = Upsample(d * 8)
        self.reduce3 = nn.Conv2d(d * 8, d * 4, 1, bias=cfg.bias)
        self.up2 = Upsample(d * 4)
        self.reduce2 = nn.Conv2d(d * 4, d * 2, 1, bias=cfg.bias)
        self.up1 = Upsample(d * 2)
        self.output = nn.Conv2d(d * 2, cfg.out_ch, 3, padding=1, bias=cfg.bias)

    def forward(self, lq: Tensor, priors: dict[str, Tensor] | None = None) -> Tensor:
        """Restore ``lq`` ``(B, in_ch, H, W)``; ``priors`` is handed unchanged to every level."""
        check_input(lq, self.size_multiple)
        p = priors if priors is not None else {}
        lv = self.levels
        x1 = lv["enc1"](self.patch_embed(lq), p)  # (B, d, H, W)
        x2 = lv["enc2"](self.down1(x1), p)  # (B, 2d, H/2, W/2)
        x3 = lv["enc3"](self.down2(x2), p)  # (B, 4d, H/4, W/4)
        y = lv["latent"](self.down3(x3), p)  # (B, 8d, H/8, W/8)
        y = lv["dec3"](self.reduce3(torch.cat([self.up3(y), x3], dim=1)), p)  # (B, 4d, H/4, W/4)
        y = lv["dec2"](self.reduce2(torch.cat([self.up2(y), x2], dim=1)), p)  # (B, 2d, H/2, W/2)
        y = lv["dec1"](torch.cat([self.up1(y), x1], dim=1), p)  # (B, 2d, H, W)
        y = lv["refine"](y, p)  # (B, 2d, H, W)
        out = self.output(y)  # (B, out_ch, H, W)
        return out + lq if self.config.out_ch == self.config.in_ch else out

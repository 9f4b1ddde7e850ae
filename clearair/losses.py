"""Training losses of Perceive-IR (stage 2) and ClearAIR, in plain torch.

Perceive-IR: ``L = L1 + 0.1 L_con + 0.05 L_clip + 0.1 L_dpl`` (:class:`PerceiveIRLoss`).
ClearAIR: ``L = L1 + 0.25 L_inter`` with ``L_inter`` the clue-reuse consistency (:func:`clue_reuse_loss`).
Images are (B, 3, H, W) in [0, 1]. Frozen parts (the perceiver, VGG16) are passed in, never built here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.perceiver import TIERS, QualityPerceiver
from clearair.models.pretrained import freeze
from clearair.models.vgg import VGGFeatures

log = logging.getLogger(__name__)


def l1_loss(restored: Tensor, gt: Tensor) -> Tensor:
    """Mean absolute error."""
    return F.l1_loss(restored, gt)


# The pixel term of every restorer loss. The papers use L1. Its minimiser is the median residual, so on sparse
# residuals (rain streaks cover 2-9% of pixels) a small network first settles on the identity and needs many
# iterations to leave it; MSE's mean does not have that plateau, which matters at laptop-scale budgets.
PIXEL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": l1_loss, "mse": F.mse_loss}


def pixel_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in PIXEL_LOSSES:
        raise ValueError(f"unknown pixel loss {name!r}; valid: {', '.join(PIXEL_LOSSES)}")
    return PIXEL_LOSSES[name]


def gather_across_ranks(x: Tensor) -> Tensor:
    """Every data-parallel rank's ``x`` concatenated along dim 0 in rank order, with gradient flowing through this
    rank's own slice only (the others are constants here; each rank back-propagates its own features). Ranks may
    hold different batch sizes. Without an initialised process group (or with one rank): ``x`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    chunks = [part[: int(n.item())] for part, n in zip(parts, sizes, strict=True)]
    chunks[rank] = x
    return torch.cat(chunks)


def negative_coverage(task: Tensor, bank_task: Tensor) -> Tensor:
    """The fraction of anchors (labels ``task``, (B,)) with at least one negative among ``bank_task`` (N,): the
    part of a batch the contrastive loss acts on; a 0-d float tensor."""
    return (task[:, None] != bank_task[None, :]).any(dim=1).float().mean()


def cfe_infonce(
    anchor: Tensor, positive: Tensor, task: Tensor, tau: float = 0.1, gather: bool = False
) -> tuple[Tensor, Tensor]:
    """InfoNCE on L2-normalised degradation features: same image attracts, other degradation types repel.

    For anchor ``i`` the positive is ``positive[i]`` (another crop of the same degraded image); the negatives are
    every anchor and positive feature in the bank whose label differs from ``task[i]``: this rank's batch, or with
    ``gather`` every data-parallel rank's (:func:`gather_across_ranks`; the anchors stay this rank's). Features of
    other images with the same label are left out of the denominator (they share the degradation, so are not
    negatives). An anchor without any negative contributes exactly 0 (its softmax has a single term), so a
    one-label bank gives a finite loss of 0 with zero gradient.

    Args:
        anchor: (B, D) features of one crop per image.
        positive: (B, D) features of another crop of the same images.
        task: (B,) integer labels: degradation families (the noise levels one label) as the Perceive-IR authors,
            or tasks.

    Returns:
        The loss, and the fraction of anchors with at least one negative (a 0-d tensor, no gradient): the part of
        the batch the loss acts on.
    """
    pos = (anchor * positive).sum(-1, keepdim=True) / tau  # (B, 1)
    if gather:
        bank = torch.cat([gather_across_ranks(anchor), gather_across_ranks(positive)])  # (2N, D), N over ranks
        bank_task = gather_across_ranks(task).repeat(2)  # (2N,)
    else:
        bank, bank_task = torch.cat([anchor, positive]), torch.cat([task, task])  # (2B, D), (2B,)
    sim = anchor @ bank.T / tau  # (B, 2N)
    is_negative = task[:, None] != bank_task[None, :]  # (B, 2N)
    sim = sim.masked_fill(~is_negative, float("-inf"))
    logits = torch.cat([pos, sim], dim=1)  # (B, 1 + 2N); column 0 is the positive
    coverage = negative_coverage(task, bank_task).detach()
    return (torch.logsumexp(logits, dim=1) - pos[:, 0]).mean(), coverage


class ClipAwareLoss(nn.Module):
    """``1 - softmax(cos(CLIP_img(R), T) / temperature)[excellent]`` under the frozen stage-1 prompts ``T``,
    averaged over the batch.

    ``temperature`` 1 takes the raw cosines, as the Perceive-IR authors' code does: in [-1, 1] the three
    probabilities stay near a third, so the loss is a gentle pull towards "excellent". ``None`` divides by the
    CLIP's own learned temperature (multiplies by ``logit_scale.exp()``, ~100 for OpenAI's CLIP), the sharp
    softmax the perceiver is trained and scored with. The perceiver is frozen in place (its prompts included):
    gradients flow only through the frozen CLIP image tower into the restored image.
    """

    def __init__(self, perceiver: QualityPerceiver, temperature: float | None = 1.0):
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f"the CLIP-aware loss's temperature must be > 0 (or None: CLIP's own), got {temperature}")
        self.perceiver = freeze(perceiver)
        self.temperature = temperature
        self.excellent = TIERS.index("high")

    def forward(self, restored: Tensor) -> Tensor:
        with torch.no_grad():
            prompts = self.perceiver.prompt_features()  # (3, D), unit norm
        img = self.perceiver.encode_image(restored)  # (B, D), unit norm
        scale = self.perceiver.logit_scale.exp() if self.temperature is None else 1.0 / self.temperature
        logits = scale * img @ prompts.T  # (B, 3)
        return 1.0 - logits.softmax(dim=-1)[:, self.excellent].mean()


DPL_LAYER_WEIGHTS = (1 / 12, 1 / 6, 1 / 3, 1.0)  # per VGG16 tap (clearair.models.vgg), shallow to deep


def difficulty_weights(neg_psnr: Tensor, model_psnr: float, hard: float = 1.25, easy: float = 0.75) -> Tensor:
    """Weight per negative: ``hard`` when its PSNR to GT is at most the model's probe PSNR (a negative as good as
    the model is hard to push away from), ``easy`` otherwise. Same shape as ``neg_psnr``."""
    return torch.where(neg_psnr <= model_psnr, torch.full_like(neg_psnr, hard), torch.full_like(neg_psnr, easy))


def _l1_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Mean |a - b| over all but the leading dims: (B, C, H, W) -> (B,), (B, P, C, H, W) -> (B, P)."""
    return (a - b).abs().flatten(a.dim() - 3).mean(-1)


class DifficultyAdaptivePerceptualLoss(nn.Module):
    """Contrastive perceptual loss: close to GT, far from the degraded input and from medium-quality negatives.

    Per VGG tap ``l``: ``w_l * d(R, GT) / (2 d(R, LQ) + sum_p w_p d(R, P_p) + eps)`` with ``d`` the mean L1
    distance of the tap's features; summed over taps, averaged over the batch. ``eps`` keeps the ratio finite
    (and its gradient zero rather than NaN) when R, GT, LQ and the negatives all coincide.
    """

    def __init__(self, vgg: VGGFeatures, layer_weights: tuple[float, ...] = DPL_LAYER_WEIGHTS, eps: float = 1e-6):
        super().__init__()
        if len(layer_weights) != len(vgg.taps):
            raise ValueError(f"{len(layer_weights)} layer weights for {len(vgg.taps)} VGG taps {vgg.taps}")
        self.vgg = vgg
        self.layer_weights = tuple(layer_weights)
        self.eps = eps

    def forward(
        self,
        restored: Tensor,
        gt: Tensor,
        lq: Tensor,
        negatives: Tensor | None = None,
        neg_weights: Tensor | None = None,
    ) -> Tensor:
        """``negatives`` (B, P, 3, H, W) with difficulty weights ``neg_weights`` (B, P); both or neither."""
        if (negatives is None) != (neg_weights is None):
            raise ValueError("negatives and neg_weights go together: pass both or neither")
        b = restored.shape[0]
        f_r = self.vgg(restored)
        with torch.no_grad():
            f_gt_lq = self.vgg(torch.cat([gt, lq]))
            f_neg = self.vgg(negatives.flatten(0, 1)) if negatives is not None else None
        total = restored.new_zeros(b, dtype=torch.float32)
        for i, (w, r) in enumerate(zip(self.layer_weights, f_r, strict=True)):
            r = r.float()
            target, degraded = f_gt_lq[i].float().split(b)
            den = 2 * _l1_per_sample(r, degraded) + self.eps  # (B,)
            if f_neg is not None:
                neg = f_neg[i].float().unflatten(0, (b, -1))  # (B, P, C, H, W)
                den = den + (neg_weights * _l1_per_sample(r.unsqueeze(1), neg)).sum(1)
            total = total + w * _l1_per_sample(r, target) / den
        return total.mean()


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    x = x.flip(-1) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


def _dihedral_inverse(x: Tensor, k: int, flip: bool) -> Tensor:
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with replicate padding (a constant image stays exactly constant up to rounding)."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def strong_photometric(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Re-degrade ``x`` (B, 3, H, W) photometrically: Gaussian blur (sigma U(0.5, 1.5), one per batch) and a
    contrast cut towards each image's per-channel mean (factor U(0.6, 0.9) per image). Both leave a constant
    image unchanged, and neither moves pixels."""
    draws = torch.rand(1 + x.shape[0], generator=generator)
    sigma = 0.5 + float(draws[0])
    factor = (0.6 + 0.3 * draws[1:]).to(x.device, x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return _gaussian_blur(mean + factor * (x - mean), sigma)


def clue_reuse_loss(
    restore: Callable[[Tensor], Tensor], restored: Tensor, gamma: float = 0.05, generator: torch.Generator | None = None
) -> Tensor:
    """ClearAIR's internal clue reuse: the restorer must give the same result on a weak and a strong view.

    Precisely:
      1. ``x = restored.detach()``: the loss trains the restorer's second passes, not the first output (letting
         it reach the first output would reward flat images, on which the two views agree trivially).
      2. Weak view: one random dihedral transform ``g`` (horizontal flip, then ``k`` quarter turns) for the batch.
      3. Strong view: :func:`strong_photometric` of the weak view (blur + contrast cut; no geometry).
      4. ``I_w = g^-1(restore(g(x)))`` without gradient (the target, as in FixMatch-style consistency);
         ``I_s = g^-1(restore(strong(g(x))))`` with gradient.
      5. Loss ``gamma * mean((I_w - I_s)^2)``.
    An identity ``restore`` on a constant image gives exactly 0 (both views equal the image); on any other image
    the strong view differs, so the loss is positive.
    """
    x = restored.detach()
    draws = torch.randint(0, 8, (1,), generator=generator)
    k, flip = int(draws) % 4, bool(int(draws) // 4)
    weak = _dihedral(x, k, flip)
    with torch.no_grad():
        i_w = _dihedral_inverse(restore(weak), k, flip)
    i_s = _dihedral_inverse(restore(strong_photometric(weak, generator)), k, flip)
    return gamma * (i_w - i_s).pow(2).mean()


@dataclass(frozen=True)
class LossWeights:
    """Perceive-IR stage-2 loss weights (authors' configuration)."""

    l1: float = 1.0
    con: float = 0.1
    clip: float = 0.05
    dpl: float = 0.1


@dataclass(frozen=True)
class ClearAIRLossWeights:
    """ClearAIR: ``L = l1 * L1 + inter * L_inter`` with ``L_inter = clue_reuse_loss(..., gamma)``."""

    l1: float = 1.0
    inter: float = 0.25
    gamma: float = 0.05


WEIGHTED_LOSSES: dict[str, type] = {"perceive_ir": LossWeights, "clearair": ClearAIRLossWeights}


def loss_weights(loss: str, values: dict[str, float] | None) -> LossWeights | ClearAIRLossWeights | None:
    """The weights of ``loss`` with ``values`` replacing its defaults (None for ``"l1"``, which takes none);
    a ValueError names an unknown weight and the valid ones."""
    if loss not in WEIGHTED_LOSSES:
        if values:
            raise ValueError(f"loss {loss!r} takes no loss_weights, got {sorted(values)}")
        return None
    cls = WEIGHTED_LOSSES[loss]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values or {}) - set(names))
    if unknown:
        raise ValueError(f"unknown loss_weights {unknown} for loss {loss!r}; valid: {', '.join(names)}")
    return cls(**(values or {}))


class PerceiveIRLoss(nn.Module):
    """The weighted sum of Perceive-IR's losses; a part with weight 0 or without its module is not computed."""

    def __init__(
        self,
        weights: LossWeights = LossWeights(),
        clip_loss: ClipAwareLoss | None = None,
        dpl: DifficultyAdaptivePerceptualLoss | None = None,
        tau: float = 0.1,
        pixel: str = "l1",
        gather: bool = False,
    ):
        super().__init__()
        self.pixel = pixel_loss(pixel)
        self.gather = gather
        self.weights = weights
        self.clip_loss = clip_loss
        self.dpl = dpl
        self.tau = tau
        active = [n for n in ("l1", "con", "clip", "dpl") if self._active(n)]
        log.info("Perceive-IR loss parts: %s (weights %s)", active, weights)

    def _active(self, part: str) -> bool:
        module = {"clip": self.clip_loss, "dpl": self.dpl}.get(part, True)
        return getattr(self.weights, part) != 0 and module is not None

    def forward(
        self,
        restored: Tensor,
        gt: Tensor,
        lq: Tensor,
        cfe_anchor: Tensor | None,
        cfe_positive: Tensor | None,
        task: Tensor | None,
        negatives: Tensor | None = None,
        neg_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss and each computed part (unweighted) as floats, plus ``"total"`` (and ``"con_coverage"``, the
        fraction of anchors with a negative, when the contrastive part is computed).

        ``cfe_anchor``/``cfe_positive`` (B, D) and ``task`` (B,) may be None only when the ``con`` weight is 0.
        """
        parts: dict[str, Tensor] = {}
        if self._active("l1"):
            parts["l1"] = self.pixel(restored, gt)  # the pixel term, weighted by ``weights.l1``
        if self._active("con"):
            if cfe_anchor is None or cfe_positive is None or task is None:
                raise ValueError("the contrastive part needs cfe_anchor, cfe_positive and task (or weight con=0)")
            parts["con"], coverage = cfe_infonce(cfe_anchor, cfe_positive, task, self.tau, self.gather)
        if self._active("clip"):
            parts["clip"] = self.clip_loss(restored)
        if self._active("dpl"):
            parts["dpl"] = self.dpl(restored, gt, lq, negatives, neg_weights)
        total = sum(getattr(self.weights, name) * value for name, value in parts.items())
        if not parts:
            total = restored.sum() * 0.0
        logged = {name: float(value.detach()) for name, value in parts.items()}
        if "con" in parts:
            logged["con_coverage"] = float(coverage)  # a derived figure, not a loss part: not in the total
        logged["total"] = float(total.detach())
        return total, logged

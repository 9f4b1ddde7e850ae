"""Region-mask sources for ClearAIR's "where" stage: frozen models that split an image into N_m regions.

A source is called on images ``(B, 3, H, W)`` in [0, 1] and returns float masks ``(B, M, h, w)`` in [0, 1] at its
own resolution (ClearAIRNet resizes them to each level). Sources are frozen and live outside the restorer, so a
pipeline stage can compute the masks once per image and store them as the ``"region_masks"`` prior.

- :class:`DinoClusterRegions` (default): k-means of DINOv2 patch features, one-hot masks on the patch grid. The
  masks partition the image (every pixel belongs to exactly one region) and are deterministic.
- :class:`Sam2Regions`: SAM2 (the paper's choice) through ``transformers``: a grid of point prompts, the best of
  SAM2's three masks per point, filtered by predicted IoU and stability, de-duplicated, the ``n_regions`` best kept
  and the rest padded with empty masks. SAM2 masks may overlap and need not cover the image.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.guidance import IMAGENET_MEAN, IMAGENET_STD
from clearair.models.pretrained import MissingWeightsError, freeze

log = logging.getLogger(__name__)


class RegionSource(nn.Module):
    """Base class: ``source(images)`` with images ``(B, 3, H, W)`` in [0, 1] gives masks ``(B, n_regions, h, w)``.

    Sources run without gradients and never train (their models are built frozen; a trainer holds them in
    :class:`clearair.models.pretrained.Frozen`); subclasses implement :meth:`forward`.
    """

    n_regions: int

    def forward(self, images: Tensor) -> Tensor:
        raise NotImplementedError


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")


# --------------------------------------------------------------------------------------------------------------
# DINOv2 patch-feature clustering
# --------------------------------------------------------------------------------------------------------------


def farthest_point_init(x: Tensor, k: int) -> Tensor:
    """Deterministic k-means seeds: start from the point nearest the mean, then repeatedly add the farthest point.

    Args:
        x: points ``(B, N, D)``, L2-normalised (distances are cosine distances).
        k: number of seeds.

    Returns:
        indices ``(B, k)`` into the N points.
    """
    start = (x @ F.normalize(x.mean(dim=1), dim=-1).unsqueeze(-1)).squeeze(-1).argmax(dim=1)  # (B,)
    idx = [start]
    min_dist = torch.full(x.shape[:2], float("inf"), device=x.device, dtype=x.dtype)  # (B, N)
    for _ in range(k - 1):
        last = x[torch.arange(x.shape[0], device=x.device), idx[-1]]  # (B, D)
        dist = 1 - (x @ last.unsqueeze(-1)).squeeze(-1)  # (B, N)
        min_dist = torch.minimum(min_dist, dist)
        idx.append(min_dist.argmax(dim=1))
    return torch.stack(idx, dim=1)


def spherical_kmeans(x: Tensor, k: int, iters: int = 10) -> Tensor:
    """Cluster labels ``(B, N)`` of each image's points ``x`` ``(B, N, D)`` (L2-normalised) by cosine k-means.

    Batched over images; seeds from :func:`farthest_point_init`, so the result depends only on ``x``. A cluster
    that loses all its points keeps its previous centre.
    """
    b = x.shape[0]
    centres = x[torch.arange(b, device=x.device).unsqueeze(1), farthest_point_init(x, k)]  # (B, k, D)
    labels = (x @ centres.transpose(1, 2)).argmax(dim=-1)  # (B, N)
    for _ in range(iters):
        onehot = F.one_hot(labels, k).to(x.dtype)  # (B, N, k)
        sums = onehot.transpose(1, 2) @ x  # (B, k, D)
        counts = onehot.sum(dim=1).unsqueeze(-1)  # (B, k, 1)
        centres = torch.where(counts > 0, F.normalize(sums, dim=-1), centres)
        new_labels = (x @ centres.transpose(1, 2)).argmax(dim=-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def dinov2_patch_features(dinov2: nn.Module, images: Tensor, image_size: int) -> Tensor:
    """Last-layer patch tokens of a ``transformers`` DINOv2 as a grid ``(B, D, g, g)``, ``g = image_size // patch``.

    Images are resized to ``image_size`` squared and ImageNet-normalised; the CLS token and any register tokens
    are dropped.
    """
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    param = next(dinov2.parameters())
    x = ((x - mean) / std).to(device=param.device, dtype=param.dtype)
    tokens = dinov2(pixel_values=x).last_hidden_state  # (B, 1 + R + N, D)
    g = image_size // dinov2.config.patch_size
    patches = tokens[:, tokens.shape[1] - g * g :]  # (B, N, D)
    return patches.transpose(1, 2).reshape(x.shape[0], -1, g, g)


class DinoClusterRegions(RegionSource):
    """Regions from k-means clustering of frozen DINOv2 patch features (the default "where" source).

    Each image's ``(image_size / patch)^2`` last-layer patch tokens are L2-normalised and clustered into
    ``n_regions`` groups by cosine k-means with farthest-point seeding, so the same image always gives the same
    masks. Output: one-hot masks ``(B, n_regions, g, g)`` on the patch grid; they sum to 1 at every position. A
    cluster can be empty (e.g. a flat image has fewer distinct features than regions): its mask is all zeros.

    Args:
        dinov2: a ``transformers`` ``Dinov2Model`` (e.g. from :func:`clearair.models.pretrained.load_dinov2`).
        n_regions: number of clusters N_m (16 as in the paper's SAM2 setting).
        image_size: side the images are resized to; a multiple of the patch size.
        iters: maximum k-means iterations (it stops early once assignments are stable).
    """

    def __init__(self, dinov2: nn.Module, n_regions: int = 16, image_size: int = 224, iters: int = 10) -> None:
        super().__init__()
        patch = dinov2.config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of the DINOv2 patch size {patch}")
        if (image_size // patch) ** 2 < n_regions:
            raise ValueError(f"{n_regions} regions need at least as many patches; image_size {image_size} is too small")
        self.dinov2 = freeze(dinov2)
        self.n_regions = n_regions
        self.image_size = image_size
        self.iters = iters

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        feats = dinov2_patch_features(self.dinov2, images, self.image_size)  # (B, D, g, g)
        b, _, g, _ = feats.shape
        x = F.normalize(feats.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, N, D)
        labels = spherical_kmeans(x, self.n_regions, self.iters)  # (B, N)
        masks = F.one_hot(labels, self.n_regions).transpose(1, 2)  # (B, M, N)
        return masks.reshape(b, self.n_regions, g, g).float()


# --------------------------------------------------------------------------------------------------------------
# SAM2 automatic masks
# --------------------------------------------------------------------------------------------------------------

SAM2_HOW = (
    "Download a SAM2 checkpoint converted for transformers where you have network "
    "(`hf download facebook/sam2.1-hiera-large`, or `Sam2Model.from_pretrained(NAME)"
    ".save_pretrained(DIR)` and `Sam2Processor.from_pretrained(NAME).save_pretrained(DIR)`), then point the "
    "config at DIR or copy the cache to $HF_HOME."
)


def load_sam2(source: str) -> tuple[nn.Module, object]:
    """A frozen ``transformers`` ``Sam2Model`` and its ``Sam2Processor`` from a local dir or a cached hub name."""
    from transformers import Sam2Model, Sam2Processor

    try:
        model = Sam2Model.from_pretrained(str(source), local_files_only=True)
        processor = Sam2Processor.from_pretrained(str(source), local_files_only=True)
    except OSError as err:
        raise MissingWeightsError(f"SAM2 weights {source!r} are not on this machine. {SAM2_HOW}") from err
    return freeze(model), processor


def stability_score(logits: Tensor, offset: float = 1.0) -> Tensor:
    """IoU between the mask thresholded at ``+offset`` and at ``-offset`` (SAM's stability), over the last 2 dims."""
    inner = (logits > offset).flatten(-2).sum(-1).float()
    outer = (logits > -offset).flatten(-2).sum(-1).float()
    return inner / outer.clamp(min=1)


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float) -> Tensor:
    """Indices of ``masks`` ``(P, h, w)`` (bool) kept by greedy NMS on mask IoU, in decreasing ``scores`` order."""
    order = scores.argsort(descending=True)
    flat = masks[order].flatten(1).float()  # (P, hw)
    inter = flat @ flat.T  # (P, P)
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
    keep: list[int] = []
    for i in range(len(order)):
        if all(iou[i, j] <= iou_thresh for j in keep):
            keep.append(i)
    return order[keep]


class Sam2Regions(RegionSource):
    """Regions from SAM2's automatic masks, as in the paper.

    SAM2 is prompted with a ``points_per_side``-squared grid of foreground points; for each point the most
    confident of its three masks is taken; masks whose predicted IoU or stability is below the thresholds are
    dropped; near-duplicates (mask IoU above ``nms_iou``) are suppressed; the ``n_regions`` best by predicted IoU x
    stability are kept, ordered by that score, and the remainder is filled with empty masks. Masks are binary
    ``(B, n_regions, h, w)`` with the longest side equal to SAM2's low-resolution mask side (256 for released
    checkpoints) and the input's aspect ratio.

    Args:
        source: a directory written by ``save_pretrained`` (model and processor) or a hub name already in the
            local cache; nothing is downloaded.
        n_regions: N_m, 16 in the paper.
        points_per_side: grid of point prompts per side.
        pred_iou_thresh: minimum predicted IoU.
        stability_thresh: minimum stability score.
        nms_iou: mask IoU above which the weaker of two masks is dropped.
    """

    def __init__(
        self,
        source: str,
        n_regions: int = 16,
        points_per_side: int = 8,
        pred_iou_thresh: float = 0.7,
        stability_thresh: float = 0.85,
        nms_iou: float = 0.7,
    ) -> None:
        super().__init__()
        self.model, self.processor = load_sam2(source)
        self.n_regions = n_regions
        self.points_per_side = points_per_side
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_thresh = stability_thresh
        self.nms_iou = nms_iou

    def _point_grid(self, h: int, w: int) -> list[list[float]]:
        """Centres of a regular grid of ``points_per_side``^2 cells, as (x, y) in input pixels."""
        n = self.points_per_side
        steps = [(i + 0.5) / n for i in range(n)]
        return [[[x * w, y * h]] for y in steps for x in steps]

    def _select(self, logits: Tensor, iou: Tensor) -> Tensor:
        """The kept masks' logits ``(K, h, w)`` (K <= n_regions) from one image's ``(P, 3, h, w)`` logits."""
        best = iou.argmax(dim=1)  # (P,)
        rows = torch.arange(len(best), device=best.device)
        logits, iou = logits[rows, best], iou[rows, best]  # (P, h, w), (P,)
        stab = stability_score(logits)
        ok = (iou >= self.pred_iou_thresh) & (stab >= self.stability_thresh) & (logits > 0).flatten(1).any(1)
        logits, score = logits[ok], (iou * stab)[ok]
        if len(logits) == 0:
            return logits
        keep = mask_nms(logits > 0, score, self.nms_iou)
        return logits[keep[: self.n_regions]]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        b, _, h, w = images.shape
        pixels = [(img.clamp(0, 1) * 255).round().to(torch.uint8).cpu() for img in images]
        points = [self._point_grid(h, w)] * b
        inputs = self.processor(images=pixels, input_points=points, return_tensors="pt")
        param = next(self.model.parameters())
        out = self.model(
            pixel_values=inputs["pixel_values"].to(device=param.device, dtype=param.dtype),
            input_points=inputs["input_points"].to(device=param.device, dtype=param.dtype),
            multimask_output=True,
        )
        side = out.pred_masks.shape[-1]
        size = (max(1, round(side * h / max(h, w))), max(1, round(side * w / max(h, w))))
        masks = images.new_zeros(b, self.n_regions, *size)
        for i in range(b):
            kept = self._select(out.pred_masks[i].float(), out.iou_scores[i].float())  # (K, s, s)
            if len(kept):
                resized = F.interpolate(kept[None], size=size, mode="bilinear", align_corners=False)[0]
                masks[i, : len(kept)] = (resized > 0).to(masks.dtype)
        log.debug("SAM2 kept %s masks per image", (masks.flatten(2).amax(-1) > 0).sum(1).tolist())
        return masks

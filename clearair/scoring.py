"""No-reference quality scores from the learned perceiver, with one view everywhere.

The perceiver learns its prompts on the restorer's training crops resized to CLIP's input (``view:
train_crop``), and the CLIP-aware loss sees exactly such crops. So an image of any size is scored on a fixed grid
of crops of that size: the three tier probabilities are averaged over the grid, and the image's quality score is
P(excellent), the mean probability of the "high" tier. ``clearair score``, the perceiver stage's held-out report
and the tests all use :func:`grid_probabilities`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from clearair.models.perceiver import TIERS, QualityPerceiver
from synth.read import to_tensor

HIGH = TIERS.index("high")
MAX_GRID = 4  # at most MAX_GRID x MAX_GRID crops per image


def grid_origins(size: int, crop: int, n: int) -> list[int]:
    """``n`` evenly spaced starts of ``crop`` inside ``size`` (first at 0, last flush with the end)."""
    if n <= 1 or size <= crop:
        return [max(0, (size - crop) // 2)]
    return [round(i * (size - crop) / (n - 1)) for i in range(n)]


def grid_crops(img: np.ndarray, crop: int, max_grid: int = MAX_GRID) -> list[np.ndarray]:
    """The fixed grid of ``crop`` squares of an image: as many per side as fit without overlap, at most
    ``max_grid``, evenly spread; an image smaller than ``crop`` is taken whole."""
    h, w = img.shape[:2]
    c = min(crop, h, w)
    ys = grid_origins(h, c, min(max_grid, max(1, h // c)))
    xs = grid_origins(w, c, min(max_grid, max(1, w // c)))
    return [img[y : y + c, x : x + c] for y in ys for x in xs]


@torch.no_grad()
def grid_probabilities(perceiver: QualityPerceiver, img: np.ndarray, crop: int | None) -> np.ndarray:
    """Tier probabilities ``(3,)`` of an ``(H, W, 3)`` uint8 image: the mean over its crop grid, or of the whole
    image resized to CLIP's input when ``crop`` is None."""
    crops = [img] if crop is None else grid_crops(img, crop)  # all of one size
    batch = torch.stack([to_tensor(np.ascontiguousarray(c)) for c in crops]).to(perceiver.mean.device)
    return perceiver.probabilities(batch).mean(0).cpu().numpy()


def quality_score(probs: np.ndarray) -> float:
    """The one number per image: P(excellent)."""
    return float(probs[HIGH])


@dataclass(frozen=True)
class Scored:
    """One held-out tier image: its task, its sample key, its true tier (0 low, 1 medium, 2 high), probabilities."""

    task: str
    key: str
    tier: int
    probs: np.ndarray


def score_tier_samples(perceiver: QualityPerceiver, samples, crop: int | None) -> list[Scored]:
    """Every tier image (low, medium, high) of ``samples`` (decoded tier samples) scored on its grid."""
    out = []
    for s in samples:
        for tier, name in enumerate(("lq", "medium", "gt")):
            probs = grid_probabilities(perceiver, s[name], crop)
            out.append(Scored(s["meta"]["task"], s["key"], tier, probs))
    return out


def tier_report(scored: list[Scored]) -> dict[str, float]:
    """What the perceiver gets right on held-out tiers: 3-way accuracy, each tier's recall, and per task the
    accuracy, how often the clean image scores above its degraded input (``win``) and the Spearman correlation of
    the score with the tier rank (``spearman``)."""
    from scipy.stats import spearmanr

    if not scored:
        return {}
    pred = np.array([int(np.argmax(s.probs)) for s in scored])
    true = np.array([s.tier for s in scored])
    report = {"accuracy": float((pred == true).mean())}
    for i, tier in enumerate(TIERS):
        report[f"recall_{tier}"] = float((pred[true == i] == i).mean()) if (true == i).any() else float("nan")
    by_task: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_task[s.task].append(s)
    for task, items in sorted(by_task.items()):
        ok = [int(np.argmax(s.probs)) == s.tier for s in items]
        scores = {(s.key, s.tier): quality_score(s.probs) for s in items}
        keys = sorted({s.key for s in items})
        wins = [scores[(k, 2)] > scores[(k, 0)] for k in keys if (k, 2) in scores and (k, 0) in scores]
        rho = spearmanr([quality_score(s.probs) for s in items], [s.tier for s in items]).statistic
        report[f"{task}.accuracy"] = float(np.mean(ok))
        report[f"{task}.win"] = float(np.mean(wins)) if wins else float("nan")
        report[f"{task}.spearman"] = float(rho) if np.isfinite(rho) else float("nan")
    return report


def confusion(scored: list[Scored]) -> np.ndarray:
    """3x3 counts, rows the true tier, columns the predicted one."""
    out = np.zeros((len(TIERS), len(TIERS)), dtype=np.int64)
    for s in scored:
        out[s.tier, int(np.argmax(s.probs))] += 1
    return out

"""Pretraining the small quality-aware CLIP that ships with clearair (``clearair pretrain-clip``).

The quickstart cannot use OpenAI's CLIP (no network, no weights), and a random-init CLIP carries no quality
signal: learned prompts cannot separate tiers on it. So, in the spirit of DA-CLIP, this project pretrains its
own tiny CLIP (open_clip architecture ``clearair/models/configs/qclip-tiny.json``, image and text towers)
contrastively on the quickstart's *training* photographs only (the demo's photo split), degraded by
:mod:`synth.degradations` and captioned with what was done to them: ``"a clean photo"``, ``"a photo with heavy
noise"``, ``"a photo with light haze and light blur"``...

Every sample is drawn from its own seeded stream (seed, index): a demo-sized tile (``tile``) of a random
training photo, degraded, then a random ``view``-sized crop, the view the perceiver stage and the CLIP-aware loss
look at. Each step scores the batch against every caption (the caption set is small and fixed), image-to-text
cross entropy plus text-to-image cross entropy over the images of each caption, averaged. Same seed, same lock,
same machine kind: the same weights, byte for byte (fixed thread count, no data-loader workers).

The result is an open_clip model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``, fp16) with
a model card (``card.json``, ``MODEL_CARD.md``): it loads through open_clip's own ``local-dir:`` loader like any
hub checkpoint, and ``clearair.models.pretrained`` names it ``bundled:qclip-tiny``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from synth import storage
from synth.config import DemoConfig
from synth.degradations import PHYSICAL_ORDER, SEVERITIES, Context, apply_steps
from synth.imageio import fit_long_side, load_rgb
from synth.read import to_tensor
from synth.sources import demo_photo_splits

log = logging.getLogger(__name__)

ARCH_FILE = "qclip-tiny.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
CLEAN = "a clean photo"
NOUNS = {  # degradation -> what the captions call it
    "gaussian_noise": "noise",
    "haze": "haze",
    "rain": "rain streaks",
    "gaussian_blur": "blur",
    "jpeg": "compression artifacts",
}


@dataclass(frozen=True)
class Caption:
    text: str
    steps: tuple[tuple[str, str], ...]  # (degradation, severity) in physical order; () for a clean photo

    @property
    def kind(self) -> str:
        """What the caption says irrespective of severity (``clean``, ``noise``, ``haze+blur``...)."""
        return "+".join(NOUNS[d].split()[0] for d, _ in self.steps) or "clean"


def captions() -> list[Caption]:
    """The fixed caption set: clean, each degradation at each severity, each pair of light degradations."""
    out = [Caption(CLEAN, ())]
    out += [Caption(f"a photo with {s} {NOUNS[d]}", ((d, s),)) for d in NOUNS for s in SEVERITIES]
    for a, b in itertools.combinations(sorted(NOUNS, key=PHYSICAL_ORDER.index), 2):
        out.append(Caption(f"a photo with light {NOUNS[a]} and light {NOUNS[b]}", ((a, "light"), (b, "light"))))
    return out


@dataclass(frozen=True)
class PretrainConfig:
    """How the shipped model is trained; recorded whole in its card."""

    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 150
    weight_decay: float = 0.05
    seed: int = 0
    tile: int = 128  # the demo's tile size: degradations see the image scale of the quickstart's shards
    view: int = 48  # the crop the perceiver and the CLIP-aware loss see (the quickstart's training crop)
    min_scale: float = 0.5  # photographs are shrunk by a random factor in [min_scale, 1] before a tile is cut
    clean_fraction: float = 0.25
    pair_fraction: float = 0.2
    threads: int = 2  # torch threads; part of what makes the weights reproducible
    eval_samples: int = 480


def training_photos(split: str = "train") -> dict[str, np.ndarray]:
    """The demo's photographs of one split (the photo split), at the demo's scale, by file name."""
    import skimage

    demo = DemoConfig(split_by="photo")
    chosen = sorted(p for p, (s, _) in demo_photo_splits(demo, folds=2).items() if s == split)
    return {p: fit_long_side(load_rgb(Path(skimage.data_dir) / p)[0], demo.long_side)[0] for p in chosen}


def photo_digests(names: list[str]) -> dict[str, str]:
    import skimage

    return {n: storage.sha256(Path(skimage.data_dir) / n) for n in names}


def draw_sample(
    photos: list[np.ndarray], caps: list[Caption], cfg: PretrainConfig, stream: int, index: int
) -> tuple[np.ndarray, int]:
    """Sample ``index`` of stream ``stream`` (0 training, 1 evaluation): a degraded ``view`` crop and its caption."""
    rng = np.random.default_rng([cfg.seed, stream, index])
    photo = photos[int(rng.integers(len(photos)))]
    scale = rng.uniform(cfg.min_scale, 1.0)  # content at several scales: more variety from few photographs
    if scale < 1.0:
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    h, w = photo.shape[:2]
    t = min(cfg.tile, h, w)
    y, x = int(rng.integers(h - t + 1)), int(rng.integers(w - t + 1))
    tile = np.rot90(photo[y : y + t, x : x + t], int(rng.integers(4)))
    tile = np.ascontiguousarray(tile[:, ::-1] if rng.random() < 0.5 else tile)
    u = rng.random()
    singles = [i for i, c in enumerate(caps) if len(c.steps) == 1]
    pairs = [i for i, c in enumerate(caps) if len(c.steps) == 2]
    if u < cfg.clean_fraction:
        cap = 0
    elif u < cfg.clean_fraction + cfg.pair_fraction:
        cap = pairs[int(rng.integers(len(pairs)))]
    else:
        cap = singles[int(rng.integers(len(singles)))]
    steps = [{"degradation": d, "severity": s} for d, s in caps[cap].steps]
    img, _ = apply_steps(tile, steps, rng, Context()) if steps else (tile, [])
    v = min(cfg.view, t)
    vy, vx = int(rng.integers(t - v + 1)), int(rng.integers(t - v + 1))
    return np.ascontiguousarray(img[vy : vy + v, vx : vx + v]), cap


def _batch(photos, caps, cfg: PretrainConfig, stream: int, start: int, size: int):
    import torch

    samples = [draw_sample(photos, caps, cfg, stream, start + i) for i in range(size)]
    images = torch.stack([to_tensor(img) for img, _ in samples])
    return images, torch.tensor([c for _, c in samples])


def _arch() -> dict[str, Any]:
    return json.loads((resources.files("clearair.models") / "configs" / ARCH_FILE).read_text())


def _contrastive_loss(logits, labels):
    """Image-to-text cross entropy over the caption set, plus text-to-image cross entropy over the images of each
    caption present in the batch (every image with that caption is a positive); the mean of the two."""
    import torch
    import torch.nn.functional as F

    i2t = F.cross_entropy(logits, labels)
    present = labels.unique()
    cols = logits[:, present].T  # (C, B)
    positive = labels[None, :] == present[:, None]  # (C, B)
    t2i = (torch.logsumexp(cols, dim=1) - torch.logsumexp(cols.masked_fill(~positive, float("-inf")), dim=1)).mean()
    return 0.5 * (i2t + t2i)


def _schedule(cfg: PretrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def pretrain(cfg: PretrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train the quality-aware CLIP and write it to ``out_dir`` as an open_clip folder with its card."""
    import open_clip
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    arch, caps = _arch(), captions()
    photos = training_photos("train")
    with resources.as_file(resources.files("clearair.models") / "configs" / ARCH_FILE) as path:
        open_clip.add_model_config(path)
    name = Path(ARCH_FILE).stem
    model = open_clip.create_model(name, pretrained=None)
    tokens = open_clip.get_tokenizer(name)([c.text for c in caps])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    started, losses = time.perf_counter(), []
    mean, std = _norm(model)
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _schedule(cfg, step)
        images, labels = _batch(list(photos.values()), caps, cfg, 0, step * cfg.batch, cfg.batch)
        img = torch.nn.functional.normalize(model.encode_image((_fit(images, arch) - mean) / std), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = _contrastive_loss(model.logit_scale.exp() * img @ txt.T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log.info("pretrain-clip step %d/%d loss %.3f", step + 1, cfg.steps, np.mean(losses[-100:]))
    seconds = time.perf_counter() - started
    model.eval()
    metrics = evaluate(model, tokens, caps, cfg, arch)
    return write_model(model, arch, out_dir, cfg, photos, metrics, seconds, float(np.mean(losses[-100:])))


def _norm(model):
    import torch

    cfg = model.visual.preprocess_cfg
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def _fit(images, arch: dict[str, Any]):
    import torch.nn.functional as F

    size = arch["vision_cfg"]["image_size"]
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def evaluate(model, tokens, caps: list[Caption], cfg: PretrainConfig, arch: dict[str, Any]) -> dict[str, float]:
    """Zero-shot figures on the photographs it never saw (the demo's validation and test photos): caption and
    degradation-kind accuracy, and how often a clean crop scores "a clean photo" above its degraded copy."""
    import torch

    held = training_photos("val") | training_photos("test")
    photos = list(held.values())
    mean, std = _norm(model)
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        images, labels = _batch(photos, caps, cfg, 1, 0, cfg.eval_samples)
        pred = torch.nn.functional.normalize(model.encode_image((_fit(images, arch) - mean) / std), -1) @ txt.T
        pred = pred.argmax(-1)
    kinds = [c.kind for c in caps]
    same_kind = [kinds[p] == kinds[t] for p, t in zip(pred.tolist(), labels.tolist(), strict=True)]
    clean = [i for i, c in enumerate(labels.tolist()) if c == 0]
    return {
        "caption_accuracy": float((pred == labels).float().mean()),
        "kind_accuracy": float(np.mean(same_kind)),
        "clean_recall": float((pred[clean] == 0).float().mean()) if clean else float("nan"),
        "eval_samples": float(len(labels)),
    }


def write_model(
    model, arch: dict[str, Any], out_dir: str | Path, cfg: PretrainConfig, photos: dict, metrics: dict,
    seconds: float, final_loss: float,
) -> dict[str, Any]:  # fmt: skip
    """The open_clip folder (weights first, card last) and the card as a dict."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in sorted(model.state_dict().items())}
    with storage.staged(out / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    preprocess = {k: list(model.visual.preprocess_cfg[k]) for k in ("mean", "std")}
    storage.write_text(out / CONFIG_NAME, json.dumps({"model_cfg": arch, "preprocess_cfg": preprocess}, indent=2))
    card = {
        "name": "qclip-tiny",
        "what": "a tiny CLIP (open_clip architecture) pretrained by clearair to tell degradations and their "
        "severity apart; not OpenAI's CLIP, and not a general-purpose image-text model",
        "used_by": "the quickstart's quality perceiver and CLIP-aware loss; the paper pipelines use ViT-B/32",
        "command": "clearair pretrain-clip --out clearair/models/weights/qclip-tiny",
        "training_photographs": photo_digests(sorted(photos)),
        "captions": [c.text for c in captions()],
        "architecture": arch,
        "pretrain": dataclasses.asdict(cfg),
        "final_loss": round(final_loss, 4),
        "held_out": {k: round(v, 4) for k, v in metrics.items()},
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "weights_sha256": storage.sha256(out / WEIGHTS_NAME),
        "parameters": int(sum(v.numel() for v in state.values())),
    }
    storage.write_text(out / "MODEL_CARD.md", model_card_text(card))
    storage.write_text(out / "card.json", json.dumps(card, indent=2) + "\n")
    return card


def model_card_text(card: dict[str, Any]) -> str:
    photos = "\n".join(f"- `{n}` sha256 `{h}`" for n, h in card["training_photographs"].items())
    held = ", ".join(f"{k} {v}" for k, v in card["held_out"].items())
    return (
        f"# {card['name']}\n\n{card['what'][0].upper() + card['what'][1:]}.\n\nUsed by {card['used_by']}.\n\n"
        f"Regenerate: `{card['command']}` ({card['train_seconds']} s here, torch {card['torch']}).\n\n"
        f"Trained on these scikit-image photographs only (the quickstart's training photos), degraded by "
        f"`synth.degradations`:\n{photos}\n\nCaptions: {len(card['captions'])}, e.g. "
        f"{', '.join(repr(c) for c in card['captions'][:3])}.\n\n"
        f"{card['parameters']:,} parameters (fp16), weights sha256 `{card['weights_sha256']}`.\n\n"
        f"On held-out photographs (the demo's validation and test photos): {held}.\n"
    )


def weights_digest(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / WEIGHTS_NAME).read_bytes()).hexdigest()

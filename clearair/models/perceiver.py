"""The three-tier quality perceiver: a frozen CLIP with CoOp-style learnable prompts (Perceive-IR stage 1).

Each quality class ("terrible", "mediocre", "excellent") owns ``n_ctx`` learnable context vectors; the prompt
``[SOS] ctx_1 .. ctx_n [EOS]`` runs through CLIP's frozen text tower. Images are scored by the cosine similarity of
their CLIP embedding with the three prompt embeddings, scaled by CLIP's logit scale. Only the contexts train.
After stage 1 the prompts are frozen and drive the CLIP-aware loss and the quality tier of any image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.pretrained import Frozen, MissingWeightsError, load_open_clip
from clearair.optim import adamw_cosine
from synth import storage

log = logging.getLogger(__name__)

TIERS = ("low", "medium", "high")  # index-aligned with PerceiverConfig.class_words


@dataclass(frozen=True)
class PerceiverConfig:
    """Architecture of the quality perceiver.

    ``clip_model``/``pretrained`` are passed to :func:`clearair.models.pretrained.load_open_clip`; ``image_size``
    must equal the CLIP vision tower's input size.
    """

    clip_model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    n_ctx: int = 16
    class_words: tuple[str, ...] = ("terrible", "mediocre", "excellent")
    image_size: int = 224
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if len(self.class_words) != len(TIERS):
            raise ValueError(f"class_words needs one word per tier {TIERS}, got {self.class_words}")
        object.__setattr__(self, "class_words", tuple(self.class_words))  # JSON/YAML give lists

    @classmethod
    def tiny(cls) -> PerceiverConfig:
        """Random-init tiny CLIP (clearair/models/configs/clip-tiny.json), for tests of the machinery."""
        return cls(clip_model="clearair-tiny-clip", pretrained=None, n_ctx=4, image_size=32)

    @classmethod
    def qclip(cls) -> PerceiverConfig:
        """The small quality-aware CLIP clearair pretrains and ships (``bundled:qclip-tiny``), for the quickstart."""
        return cls(clip_model="qclip-tiny", pretrained="bundled:qclip-tiny", n_ctx=4, image_size=48)


class PromptLearner(nn.Module):
    """Class-specific learnable contexts and the frozen token embeddings around them.

    The CLIP model is passed to :meth:`forward` rather than held, so the perceiver owns it exactly once. Expects a
    CLIP BPE tokenizer (open_clip's ``SimpleTokenizer``): ``tokenizer([""])`` is ``[SOS, EOS, 0, ...]``.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable, class_words: tuple[str, ...], n_ctx: int, init_std: float):
        super().__init__()
        if n_ctx + 2 > clip.context_length:
            raise ValueError(f"n_ctx={n_ctx} leaves no room for SOS/EOS in context length {clip.context_length}")
        embed = clip.token_embedding
        empty = tokenizer([""])[0]  # (L,) = [SOS, EOS, 0, ...]
        sos, eos = empty[0], empty[1]
        tokens = torch.zeros(len(class_words), clip.context_length, dtype=torch.long)  # (K, L)
        tokens[:, 0] = sos
        tokens[:, n_ctx + 1] = eos
        with torch.no_grad():
            ctx = torch.randn(len(class_words), n_ctx, embed.embedding_dim) * init_std  # (K, n_ctx, W)
            for k, word in enumerate(class_words):
                ctx[k, -1] = self._word_embedding(embed, tokenizer, word, eos)
            fixed = embed(tokens)  # (K, L, W)
        self.n_ctx = n_ctx
        self.class_words = tuple(class_words)
        self.ctx = nn.Parameter(ctx)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", fixed[:, :1].clone(), persistent=False)  # (K, 1, W): SOS
        self.register_buffer("suffix", fixed[:, n_ctx + 1 :].clone(), persistent=False)  # (K, L-1-n_ctx, W): EOS, pad

    @staticmethod
    def _word_embedding(embed: nn.Embedding, tokenizer: Callable, word: str, eos: Tensor) -> Tensor:
        """Token embedding of ``word``; the mean over its BPE pieces when the tokenizer splits it."""
        ids = tokenizer([word])[0]
        end = int((ids == eos).nonzero()[0])
        return embed(ids[1:end]).mean(0)  # (W,)

    @property
    def width(self) -> int:
        return self.ctx.shape[-1]

    def forward(self, clip: nn.Module) -> Tensor:
        """Unnormalised text features ``(K, D)`` of the K class prompts through ``clip``'s frozen text tower."""
        from open_clip.transformer import text_global_pool

        cast = clip.transformer.get_cast_dtype()
        x = torch.cat([self.prefix, self.ctx, self.suffix], dim=1).to(cast)  # (K, L, W)
        x = x + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, self.tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (K, D)


class QualityPerceiver(nn.Module):
    """Frozen CLIP + learnable prompts: quality tier logits for images in [0, 1]."""

    TIERS = TIERS

    def __init__(self, clip: nn.Module, tokenizer: Callable, cfg: PerceiverConfig):
        super().__init__()
        visual_size = clip.visual.preprocess_cfg["size"]
        visual_size = visual_size if isinstance(visual_size, int) else visual_size[0]
        if visual_size != cfg.image_size:
            raise ValueError(f"PerceiverConfig.image_size={cfg.image_size} but {cfg.clip_model} expects {visual_size}")
        self.cfg = cfg
        self.clip = Frozen(clip)  # only the prompts train; the CLIP stays out of checkpoints
        self.prompt_learner = PromptLearner(clip, tokenizer, cfg.class_words, cfg.n_ctx, cfg.init_std)
        mean, std = clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned logit scale, as a log (``logit_scale.exp()`` multiplies the cosines)."""
        return self.clip.part.logit_scale

    def encode_image(self, x: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings ``(B, D)``, differentiable w.r.t. ``x`` (B, 3, H, W) in [0, 1].

        The whole image is resized (not cropped) to ``image_size``: quality is judged on all of it.
        """
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.normalize(self.clip.part.encode_image(x), dim=-1)

    def prompt_features(self) -> Tensor:
        """L2-normalised prompt embeddings ``(3, D)``, one per tier."""
        return F.normalize(self.prompt_learner(self.clip.part), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Tier logits ``(B, 3)``: CLIP's logit scale times image-prompt cosine similarity."""
        img = self.encode_image(x)  # (B, D)
        return self.logit_scale.exp() * img @ self.prompt_features().T

    def probabilities(self, x: Tensor) -> Tensor:
        """Tier probabilities ``(B, 3)``; index 2 is "high" (the "excellent" prompt)."""
        return self.forward(x).softmax(dim=-1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(tier index (B,), probabilities (B, 3))``; ``TIERS[index]`` names the tier."""
        probs = self.probabilities(x)
        return probs.argmax(dim=-1), probs

    def _metadata(self) -> dict[str, str]:
        return {
            "format": "clearair-perceiver-prompts",
            "config": json.dumps(dataclasses.asdict(self.cfg)),
            "class_words": json.dumps(list(self.cfg.class_words)),
            "n_ctx": str(self.cfg.n_ctx),
            "width": str(self.prompt_learner.width),
        }

    def save_prompts(self, path: str | Path, view: dict | None = None) -> Path:
        """Write the learned contexts to a safetensors file, with the config in its metadata (no pickle), and the
        view they were learned on (``{"view": "train_crop", "crop": 48}``: how :mod:`clearair.scoring` should crop
        an image to score it; ``crop`` None = the whole image resized)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"ctx": self.prompt_learner.ctx.detach().cpu().contiguous()}
        metadata = self._metadata() | ({"view": json.dumps(view)} if view is not None else {})
        save_file(tensors, str(path), metadata=metadata)
        return path

    def load_prompts(self, path: str | Path) -> None:
        """Load contexts written by :meth:`save_prompts`; fails naming the file when they don't fit this perceiver."""
        from safetensors import safe_open

        path = storage.local_copy(path)
        if not path.is_file():
            raise MissingWeightsError(
                f"Perceiver prompts {path} not found: train them (perceiver stage) or fix the path."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ctx = f.get_tensor("ctx") if "ctx" in f.keys() else None
        except Exception as err:  # safetensors raises its own error types for a corrupt or foreign file
            raise ValueError(f"Perceiver prompts {path} are not a readable safetensors file: {err}") from err
        expected = self._metadata()
        for key in ("class_words", "n_ctx", "width"):
            if meta.get(key) != expected[key]:
                raise ValueError(
                    f"Perceiver prompts {path} do not fit this perceiver: {key} is {meta.get(key)!r} in the file, "
                    f"{expected[key]!r} here."
                )
        if ctx is None or ctx.shape != self.prompt_learner.ctx.shape:
            raise ValueError(
                f"Perceiver prompts {path} hold no context tensor of shape {tuple(self.prompt_learner.ctx.shape)}"
            )
        saved = json.loads(meta.get("config", "{}"))
        for key in ("clip_model", "pretrained"):
            if saved.get(key) != getattr(self.cfg, key):
                log.warning(
                    "Prompts %s were learned with %s=%r, loading into %r",
                    path,
                    key,
                    saved.get(key),
                    getattr(self.cfg, key),
                )
        with torch.no_grad():
            self.prompt_learner.ctx.copy_(ctx)


def build_perceiver(cfg: PerceiverConfig) -> QualityPerceiver:
    """Load the frozen CLIP named by ``cfg`` (offline; see ``load_open_clip``) and attach fresh prompts."""
    clip, tokenizer = load_open_clip(cfg.clip_model, cfg.pretrained)
    return QualityPerceiver(clip, tokenizer, cfg)


def perceiver_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """3-way cross-entropy of tier logits ``(B, 3)`` against tier labels ``(B,)`` (0 low, 1 medium, 2 high)."""
    return F.cross_entropy(logits, labels)


def fit_prompts(
    perceiver: QualityPerceiver,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    lr: float = 4e-5,
    min_lr: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train the prompt contexts for ``steps`` steps (AdamW, cosine ``lr`` -> ``min_lr``); returns per-step losses.

    ``batches`` yields ``(images (B, 3, H, W) in [0, 1], tier labels (B,))``; a re-iterable (e.g. a DataLoader) is
    restarted when it runs out, a one-shot iterator that runs out is an error.
    """
    opt, sched = adamw_cosine(perceiver, lr, steps, min_lr, weight_decay)
    device = perceiver.prompt_learner.ctx.device
    perceiver.train()
    losses: list[float] = []
    it = iter(batches)
    for step in range(steps):
        try:
            images, labels = next(it)
        except StopIteration:
            it = iter(batches)
            try:
                images, labels = next(it)
            except StopIteration:
                raise ValueError(f"fit_prompts: batches ran out after {step} of {steps} steps") from None
        loss = perceiver_loss(perceiver(images.to(device)), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    perceiver.eval()
    return losses

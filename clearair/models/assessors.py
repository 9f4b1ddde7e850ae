"""Quality and degradation embeddings for ClearAIR's "how" and "what" stages, from frozen models.

Each assessor is called on images ``(B, 3, H, W)`` in [0, 1] and returns ``(B, dim)`` float32 without gradients;
``dim`` is the attribute to put in :class:`clearair.models.clearair_net.ClearAIRConfig`. They live outside the
restorer, so a pipeline stage can compute the priors once per image (:func:`compute_clearair_priors`).

Quality ("how", prior ``"quality_emb"``):
- :class:`PerceiverAssessor` (default): the quality perceiver's CLIP image embedding.
- :class:`MLLMAssessor`: an image-text-to-text model native to ``transformers`` (e.g. a Qwen2.5-VL-based IQA
  model); the last hidden state at the final token of a chat that asks for the image's quality and ends with the
  answer prefix. The paper's DeQA-Score (mPLUG-Owl2) needs remote code and is not supported.

Degradation ("what", prior ``"degradation_emb"``):
- :class:`DegradationEmbedder` (default): CFE feature + the perceiver's prompt similarities.
- :class:`DaClipEmbedder`: DA-CLIP's degradation embedding, when its open_clip fork and weights are installed.
"""

from __future__ import annotations

import inspect
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clearair.models.pretrained import MissingWeightsError, freeze, local_path

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenEmbedder(nn.Module):
    """Base of the assessors: ``forward(images) -> (B, dim)``; built frozen, never trained (a trainer holds them in
    :class:`clearair.models.pretrained.Frozen`)."""

    dim: int


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")


# --------------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------------


class PerceiverAssessor(FrozenEmbedder):
    """Quality embedding from the three-tier quality perceiver (the default "how" source).

    The embedding is the perceiver's L2-normalised CLIP image embedding ``(B, D)``: the space in which its
    learned "terrible / mediocre / excellent" prompts separate quality. With ``with_probabilities`` the three tier
    probabilities are appended, giving ``(B, D + 3)``: an explicit quality score next to the embedding.

    Args:
        perceiver: a :class:`clearair.models.perceiver.QualityPerceiver` (its prompts trained in stage 1).
        with_probabilities: append the tier probabilities.
    """

    def __init__(self, perceiver: nn.Module, with_probabilities: bool = False) -> None:
        super().__init__()
        self.perceiver = perceiver.eval()
        self.with_probabilities = with_probabilities
        with torch.no_grad():
            width = perceiver.prompt_features().shape[-1]
        self.dim = width + (3 if with_probabilities else 0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        emb = self.perceiver.encode_image(images)  # (B, D), unit norm
        if not self.with_probabilities:
            return emb.float()
        logits = self.perceiver.logit_scale.exp() * emb @ self.perceiver.prompt_features().T  # (B, 3)
        return torch.cat([emb, logits.softmax(dim=-1)], dim=-1).float()


MLLM_HOW = (
    "Download an image-text-to-text IQA model that transformers supports natively (e.g. a Qwen2.5-VL-based one) "
    "where you have network (`hf download ORG/NAME`, or `AutoModelForImageTextToText.from_pretrained"
    "(NAME).save_pretrained(DIR)` plus `AutoProcessor.from_pretrained(NAME).save_pretrained(DIR)`), then point the "
    "config at DIR or copy the cache to $HF_HOME."
)


class MLLMAssessor(FrozenEmbedder):
    """Quality embedding from a multimodal LLM, as in the paper's "how" stage.

    Builds the chat ``user: <image> {prompt}`` / ``assistant: {answer_prefix}`` with the processor's own chat
    template, leaving the assistant turn open (``continue_final_message``, no generation), runs one forward pass
    with ``output_hidden_states`` and returns the last layer's hidden state at the final token (the position that
    would predict the quality word), ``(B, hidden)`` float32. Images are quantised to 8 bits (the form the model
    was trained on) and preprocessed by the model's own image processor.

    Args:
        source: a directory written by ``save_pretrained`` (model and processor) or a hub name already in the
            local cache; nothing is downloaded.
        prompt: the user's question.
        answer_prefix: the start of the assistant's answer; its last token is the one read out.
        dtype: weights dtype passed to ``from_pretrained`` (``"auto"`` keeps the checkpoint's).
    """

    def __init__(
        self,
        source: str,
        prompt: str = "How would you rate the quality of this image?",
        answer_prefix: str = "The quality of the image is",
        dtype: torch.dtype | str = "auto",
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            model = AutoModelForImageTextToText.from_pretrained(str(source), local_files_only=True, dtype=dtype)
            self.processor = AutoProcessor.from_pretrained(str(source), local_files_only=True)
        except OSError as err:
            raise MissingWeightsError(f"MLLM assessor {source!r} is not on this machine. {MLLM_HOW}") from err
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor of {source!r} has no chat template; MLLMAssessor needs one")
        self.model = freeze(model)
        self.dim = model.config.get_text_config().hidden_size
        self.text = self.chat_text(prompt, answer_prefix)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def chat_text(self, prompt: str, answer_prefix: str) -> str:
        """The templated prompt: one user turn (image + question), an open assistant turn with the prefix."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer_prefix}]},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, continue_final_message=True)

    def inputs(self, images: Tensor) -> dict[str, Tensor]:
        """Processor outputs for a batch: 8-bit ``(H, W, 3)`` arrays and one chat text per image."""
        pixels = [(img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for img in images]
        batch = self.processor(text=[self.text] * len(pixels), images=pixels, return_tensors="pt", padding=True)
        return dict(batch)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        param = next(self.model.parameters())
        batch = {
            k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
            for k, v in self.inputs(images).items()
        }
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(**batch, output_hidden_states=True, return_dict=True, **extra)
        last = out.hidden_states[-1]  # (B, L, hidden)
        mask = batch["attention_mask"]  # (B, L); padding may sit on either side
        positions = torch.arange(mask.shape[1], device=mask.device)
        final = (mask * positions).argmax(dim=1)  # (B,) index of each row's last real token
        return last[torch.arange(last.shape[0], device=last.device), final].float().to(images.device)


# --------------------------------------------------------------------------------------------------------------
# Degradation
# --------------------------------------------------------------------------------------------------------------


class DegradationEmbedder(FrozenEmbedder):
    """Degradation embedding from the CFE and the quality perceiver (the default "what" source).

    Concatenates the CFE's unit-norm degradation feature ``(B, 128)`` with, by default, the perceiver's prompt
    similarities ``(B, 3)`` (cosines of the image embedding with the three tier prompts, i.e. its logits without
    CLIP's logit scale, so both parts have unit scale); with ``perceiver_part="embedding"`` the perceiver's image
    embedding ``(B, D)`` instead, which carries more about the degradation type than three tier scores.

    Args:
        cfe: a trained :class:`clearair.models.guidance.CFE`, e.g. ``PerceiveIR.cfe`` after training with its
            InfoNCE loss (a fresh CFE gives random features).
        perceiver: a :class:`clearair.models.perceiver.QualityPerceiver`.
        perceiver_part: ``"similarities"`` or ``"embedding"``.
    """

    def __init__(
        self,
        cfe: nn.Module,
        perceiver: nn.Module,
        perceiver_part: Literal["similarities", "embedding"] = "similarities",
    ) -> None:
        super().__init__()
        if perceiver_part not in ("similarities", "embedding"):
            raise ValueError(f"perceiver_part must be 'similarities' or 'embedding', got {perceiver_part!r}")
        self.cfe = cfe.eval()
        self.perceiver = perceiver.eval()
        self.perceiver_part = perceiver_part
        with torch.no_grad():
            prompts = perceiver.prompt_features()  # (3, D)
            cfe_dim = cfe(torch.zeros(1, 3, 32, 32, device=next(cfe.parameters()).device)).shape[-1]
        self.dim = cfe_dim + (prompts.shape[0] if perceiver_part == "similarities" else prompts.shape[-1])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        feat = self.cfe(images)  # (B, cfe_dim)
        emb = self.perceiver.encode_image(images)  # (B, D)
        if self.perceiver_part == "similarities":
            emb = emb @ self.perceiver.prompt_features().T  # (B, 3)
        return torch.cat([feat.float(), emb.float()], dim=-1)


DACLIP_HOW = (
    "Download the DA-CLIP checkpoint (daclip_ViT-B-32.pt, released with 'Controlling Vision-Language Models for "
    "Universal Image Restoration') where you have network and give its local path."
)


class DaClipEmbedder(FrozenEmbedder):
    """DA-CLIP's degradation embedding, the paper's "what" source, through ``open_clip``.

    DA-CLIP adds a controller copy of CLIP's image encoder; its architecture (``daclip_ViT-B-32``) and the
    ``encode_image(x, control=True) -> (content, degradation)`` call exist only in DA-CLIP's fork of open_clip.
    Plain ``open_clip`` cannot build it: with plain open_clip installed this raises a RuntimeError saying so,
    after checking that the weights file exists (MissingWeightsError otherwise). Output: the L2-normalised
    degradation embedding ``(B, 512)`` for ViT-B/32.

    Args:
        source: local path of the DA-CLIP weights file.
        model_name: the fork's architecture name.
        image_size: CLIP input size; images are resized (not cropped) and CLIP-normalised.
    """

    def __init__(self, source: str, model_name: str = "daclip_ViT-B-32", image_size: int = 224) -> None:
        super().__init__()
        import open_clip

        path = local_path(source, "DA-CLIP weights", DACLIP_HOW)
        try:
            model = open_clip.create_model(model_name, pretrained=str(path))
        except RuntimeError as err:
            if model_name not in open_clip.list_models():
                raise RuntimeError(
                    f"open_clip {open_clip.__version__} has no {model_name!r} architecture: DA-CLIP needs the "
                    f"open_clip fork in DA-CLIP's repository (github.com/Algolzw/daclip-uir) installed in place of "
                    f"open_clip_torch. Use DegradationEmbedder otherwise."
                ) from err
            raise
        self.model = freeze(model)
        self.image_size = image_size
        self.dim = int(getattr(model.visual, "output_dim", 512))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        _check_images(images)
        param = next(self.model.parameters())
        x = F.interpolate(images.float(), size=(self.image_size,) * 2, mode="bicubic", antialias=True).clamp(0, 1)
        x = (x - x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        _, degradation = self.model.encode_image(x.to(param.device, param.dtype), control=True)
        return F.normalize(degradation.float(), dim=-1).to(images.device)


# --------------------------------------------------------------------------------------------------------------
# All three priors
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_clearair_priors(
    lq: Tensor, assessor: nn.Module, regions: nn.Module, degrader: nn.Module
) -> dict[str, Tensor]:
    """The three ClearAIR priors of degraded images ``lq`` ``(B, 3, H, W)`` in [0, 1], on ``lq``'s device.

    Returns ``{"quality_emb": (B, Dq), "region_masks": (B, M, h, w), "degradation_emb": (B, Dd)}``, float32.
    """
    priors = {"quality_emb": assessor(lq), "region_masks": regions(lq), "degradation_emb": degrader(lq)}
    return {k: v.to(device=lq.device, dtype=torch.float32) for k, v in priors.items()}

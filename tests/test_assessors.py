"""Region-mask sources and quality/degradation assessors: tiny random-init models, built and loaded offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clearair.models.assessors import (
    DaClipEmbedder,
    DegradationEmbedder,
    MLLMAssessor,
    PerceiverAssessor,
    compute_clearair_priors,
)
from clearair.models.guidance import CFE
from clearair.models.perceiver import PerceiverConfig, build_perceiver
from clearair.models.pretrained import MissingWeightsError, load_dinov2
from clearair.models.regions import DinoClusterRegions, Sam2Regions, spherical_kmeans
from tests.tiny import REGION_DINO

TINY_DINO = REGION_DINO




@pytest.fixture(scope="module")
def dino_regions() -> DinoClusterRegions:
    torch.manual_seed(0)
    return DinoClusterRegions(load_dinov2({**TINY_DINO, "image_size": 64}), n_regions=6, image_size=64)


@pytest.fixture(scope="module")
def perceiver():
    torch.manual_seed(0)
    return build_perceiver(PerceiverConfig.tiny())


# --- regions ----------------------------------------------------------------------------------------------------


def test_dino_masks_partition_the_image_and_are_deterministic(dino_regions):
    images = torch.rand(3, 3, 40, 56)
    masks = dino_regions(images)
    assert masks.shape == (3, 6, 8, 8)  # the 64 / 8 patch grid
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(dim=1), torch.ones(3, 8, 8))  # every position in exactly one region
    assert torch.equal(dino_regions(images), masks)
    # an image's masks do not depend on the other images of the batch
    assert torch.equal(dino_regions(images[1:2]), masks[1:2])


def test_dino_regions_follow_image_content(dino_regions):
    """Two flat halves of very different colours never share a region."""
    image = torch.zeros(1, 3, 64, 64)
    image[:, 0, :, :32] = 1.0
    image[:, 2, :, 32:] = 1.0
    masks = dino_regions(image)[0]  # (M, 8, 8)
    left, right = masks[:, :, :4].flatten(1).amax(1), masks[:, :, 4:].flatten(1).amax(1)
    assert not (left.bool() & right.bool()).any()


def test_spherical_kmeans_recovers_separated_clusters():
    centres = F.normalize(torch.eye(4, 16), dim=-1)
    truth = torch.arange(4).repeat_interleave(25)
    points = F.normalize(centres[truth] + 0.05 * torch.randn(100, 16), dim=-1)
    labels = spherical_kmeans(points[None], k=4)[0]
    # same partition up to renaming: each true cluster maps to exactly one label, and all labels are used
    assert all(len(labels[truth == c].unique()) == 1 for c in range(4))
    assert len(labels.unique()) == 4


def test_dino_regions_reject_more_regions_than_patches():
    dino = load_dinov2({**TINY_DINO, "image_size": 16})
    with pytest.raises(ValueError, match="regions"):
        DinoClusterRegions(dino, n_regions=16, image_size=16)


def _tiny_sam2_dir(tmp_path: Path) -> Path:
    """A random-init SAM2 (128-pixel input, 32-pixel masks) and its processor, saved with save_pretrained."""
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "image_size": [128, 128],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        "window_size_per_stage": [4, 4, 4, 2],
        "global_attention_blocks": [3],
        "window_positional_embedding_background_size": [2, 2],
    }
    cfg = Sam2Config(
        vision_config={
            "backbone_config": backbone,
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
            "fpn_hidden_size": 32,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": 128, "patch_size": 16},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )
    torch.manual_seed(0)
    out = tmp_path / "sam2-tiny"
    Sam2Model(cfg).save_pretrained(out)
    processor = Sam2ImageProcessor(size={"height": 128, "width": 128}, mask_size={"height": 32, "width": 32})
    Sam2Processor(image_processor=processor).save_pretrained(out)
    return out


def test_sam2_regions_from_a_saved_tiny_model(tmp_path):
    source = Sam2Regions(
        str(_tiny_sam2_dir(tmp_path)), n_regions=5, points_per_side=3, pred_iou_thresh=0.0, stability_thresh=0.0
    )
    images = torch.rand(2, 3, 48, 64)
    masks = source(images)
    assert masks.shape == (2, 5, 24, 32)  # longest side = SAM2's mask side, input aspect kept
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(source(images), masks)
    # kept masks first, padding (empty masks) after
    present = masks.flatten(2).amax(-1) > 0  # (B, M)
    assert present.any()
    assert all(torch.equal(row, row.sort(descending=True).values) for row in present.int())


def test_sam2_regions_pad_with_empty_masks_when_nothing_passes(tmp_path):
    source = Sam2Regions(str(_tiny_sam2_dir(tmp_path)), n_regions=4, points_per_side=2, pred_iou_thresh=2.0)
    masks = source(torch.rand(1, 3, 32, 32))
    assert masks.shape == (1, 4, 32, 32) and masks.sum() == 0


def test_sam2_missing_weights_fail_fast(tmp_path):
    with pytest.raises(MissingWeightsError, match="SAM2"):
        Sam2Regions(str(tmp_path / "no-such-sam2"))
    with pytest.raises(MissingWeightsError, match="hf download"):
        Sam2Regions("facebook/sam2.1-hiera-large-not-cached")


# --- quality and degradation embeddings -------------------------------------------------------------------------


def test_perceiver_assessor_embeddings(perceiver):
    images = torch.rand(2, 3, 40, 48)
    assessor = PerceiverAssessor(perceiver)
    emb = assessor(images)
    assert emb.shape == (2, assessor.dim) and not emb.requires_grad
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with_probs = PerceiverAssessor(perceiver, with_probabilities=True)
    out = with_probs(images)
    assert out.shape == (2, assessor.dim + 3) == (2, with_probs.dim)
    assert torch.allclose(out[:, :-3], emb, atol=1e-6)
    assert torch.allclose(out[:, -3:], perceiver.probabilities(images), atol=1e-5)


def test_degradation_embedder_concatenates_cfe_and_prompt_similarities(perceiver):
    torch.manual_seed(0)
    cfe = CFE()
    images = torch.rand(2, 3, 32, 40)
    embedder = DegradationEmbedder(cfe, perceiver)
    out = embedder(images)
    assert out.shape == (2, embedder.dim) == (2, 128 + 3)
    assert torch.allclose(out[:, :128], cfe(images), atol=1e-6)
    assert out[:, 128:].abs().max() <= 1 + 1e-5  # cosines
    assert DegradationEmbedder(cfe, perceiver, "embedding").dim == 128 + perceiver.prompt_features().shape[-1]
    with pytest.raises(ValueError, match="perceiver_part"):
        DegradationEmbedder(cfe, perceiver, "logits")


def test_compute_clearair_priors(perceiver, dino_regions):
    lq = torch.rand(2, 3, 32, 48)
    priors = compute_clearair_priors(
        lq, PerceiverAssessor(perceiver), dino_regions, DegradationEmbedder(CFE(), perceiver)
    )
    assert set(priors) == {"quality_emb", "region_masks", "degradation_emb"}
    assert priors["quality_emb"].shape[0] == priors["degradation_emb"].shape[0] == 2
    assert priors["region_masks"].shape[:2] == (2, 6)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in priors.values())


def test_daclip_needs_weights_and_the_daclip_fork(tmp_path):
    with pytest.raises(MissingWeightsError, match="DA-CLIP"):
        DaClipEmbedder(str(tmp_path / "daclip_ViT-B-32.pt"))
    weights = tmp_path / "daclip_ViT-B-32.pt"
    weights.write_bytes(b"not really weights")
    with pytest.raises(RuntimeError, match="fork"):
        DaClipEmbedder(str(weights))


# --- MLLM assessor with a tiny Qwen2.5-VL ---------------------------------------------------------------------

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_SPECIAL += ["<|image_pad|>", "<|video_pad|>"]
# The Qwen2-VL chat template's shape: turns in <|im_start|>role ... <|im_end|>, the image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands <|image_pad|> to one token per merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_qwen_dir(tmp_path: Path) -> Path:
    """A random-init Qwen2.5-VL (hidden 32, 2 layers, 1-block vision tower), a word-level tokenizer trained on a
    few sentences and the model's image processor, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["How would you rate the quality of this image?", "The quality of the image is good.", "user assistant"]
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", *QWEN_SPECIAL]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=QWEN_SPECIAL,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    text = {
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [0],
        "window_size": 56,
    }
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    out = tmp_path / "qwen-iqa-tiny"
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_mllm_assessor_reads_the_last_hidden_state_at_the_final_token(tmp_path):
    source = _tiny_qwen_dir(tmp_path)
    assessor = MLLMAssessor(str(source), dtype=torch.float32)
    assert assessor.text.endswith("<|im_start|>assistant\nThe quality of the image is")
    images = torch.randint(0, 256, (2, 3, 56, 56)).float() / 255  # exact in 8 bits
    emb = assessor(images)
    assert emb.shape == (2, assessor.dim) == (2, 32)

    # the same computation written out with the plain transformers API
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    for i in range(2):
        pixels = (images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        inputs = processor(text=[assessor.text], images=[pixels], return_tensors="pt")
        assert inputs["input_ids"][0, -1] == processor.tokenizer.convert_tokens_to_ids("is")
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]  # (1, L, 32)
        assert torch.allclose(emb[i], hidden[0, -1], atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])  # the image matters


def test_mllm_assessor_missing_weights_fail_fast(tmp_path):
    with pytest.raises(MissingWeightsError, match="image-text-to-text"):
        MLLMAssessor(str(tmp_path / "no-such-model"))
    with pytest.raises(MissingWeightsError):
        MLLMAssessor("Qwen/Qwen2.5-VL-7B-Instruct-not-cached")

"""The quality perceiver on a tiny random-init CLIP, offline; and the open_clip loader's missing-weight errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time

import pytest
import torch
import torch.nn.functional as F

from clearair.models.perceiver import (
    TIERS,
    PerceiverConfig,
    QualityPerceiver,
    build_perceiver,
    fit_prompts,
)
from clearair.models.pretrained import MissingWeightsError, load_open_clip


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(3, 1, 5, 5).contiguous(), groups=3)


def toy_tiers(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images per tier: low = heavy noise, medium = blurred + mild noise, high = clean blocky textures."""
    g = torch.Generator().manual_seed(seed)
    clean = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="nearest")
    low = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    medium = (_blur(_blur(clean)) + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return torch.cat([low, medium, clean]), torch.arange(3).repeat_interleave(n)


@pytest.fixture(scope="module")
def tiny_clip():
    return load_open_clip("clearair-tiny-clip", None)


def test_only_the_contexts_train(tiny_clip):
    perceiver = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny())
    trainable = [name for name, p in perceiver.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]
    assert perceiver.prompt_learner.ctx.shape[:2] == (3, PerceiverConfig.tiny().n_ctx)


def test_last_context_slot_starts_from_the_class_word(tiny_clip):
    clip, tokenizer = tiny_clip
    perceiver = QualityPerceiver(clip, tokenizer, PerceiverConfig.tiny())
    ids = tokenizer(["excellent"])[0]
    word = clip.token_embedding(ids[1 : int((ids == ids.max()).nonzero()[0])]).mean(0)
    torch.testing.assert_close(perceiver.prompt_learner.ctx[2, -1], word)


def test_scores_images_of_any_size_and_backprops_to_pixels(tiny_clip):
    perceiver = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny())
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    probs = perceiver.probabilities(x)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    probs[:, 2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    tier, _ = perceiver.predict(x)
    assert all(TIERS[int(t)] in TIERS for t in tier)


def test_prompt_round_trip_gives_identical_logits(tiny_clip, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    trained = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny())
    path = trained.save_prompts(tmp_path / "prompts.safetensors")
    torch.manual_seed(2)
    fresh = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny())
    with torch.no_grad():
        assert not torch.equal(fresh(x), trained(x))
        fresh.load_prompts(path)
        assert torch.equal(fresh(x), trained(x))


def test_load_prompts_with_other_metadata_fails_naming_the_file(tiny_clip, tmp_path):
    path = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny()).save_prompts(tmp_path / "p.safetensors")
    for cfg in (
        PerceiverConfig(clip_model="clearair-tiny-clip", pretrained=None, n_ctx=3, image_size=32),
        PerceiverConfig(
            clip_model="clearair-tiny-clip", pretrained=None, n_ctx=4, image_size=32, class_words=("bad", "ok", "good")
        ),
    ):
        with pytest.raises(ValueError, match="p.safetensors"):
            QualityPerceiver(*tiny_clip, cfg).load_prompts(path)
    with pytest.raises(MissingWeightsError, match="absent.safetensors"):
        QualityPerceiver(*tiny_clip, PerceiverConfig.tiny()).load_prompts(tmp_path / "absent.safetensors")


def test_perceiver_learns_three_synthetic_tiers():
    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.tiny())
    batches = [toy_tiers(8, seed) for seed in range(10)]
    held_out, labels = toy_tiers(32, seed=100)
    losses = fit_prompts(perceiver, batches, steps=200, lr=1e-2)
    tier, _ = perceiver.predict(held_out)
    accuracy = (tier == labels).float().mean().item()
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert accuracy > 0.6, f"held-out accuracy {accuracy:.2f} (chance 0.33)"


def test_fit_prompts_refuses_a_spent_iterator(tiny_clip):
    perceiver = QualityPerceiver(*tiny_clip, PerceiverConfig.tiny())
    with pytest.raises(ValueError, match="ran out after 1"):
        fit_prompts(perceiver, iter([toy_tiers(1, 0)]), steps=3, lr=1e-3)


def test_clip_weights_round_trip_from_a_local_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    clip, _ = tiny_clip
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    loaded, _ = load_open_clip("clearair-tiny-clip", str(path))
    for (name, a), b in zip(clip.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_local_weights_raise(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        load_open_clip("clearair-tiny-clip", str(tmp_path / "nope.pt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "open_clip_config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="no open_clip weights"):
        load_open_clip("clearair-tiny-clip", f"local-dir:{tmp_path / 'folder'}")


def test_uncached_pretrained_tag_fails_fast_and_says_what_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # empty ~/.cache/clip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(MissingWeightsError, match="laion/CLIP-ViT-B-32-laion2B-s34B-b79K") as err:
        load_open_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - start < 5
    assert "HF_HOME" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)

"""The small quality-aware CLIP clearair ships: regenerated reproducibly, loaded offline through open_clip, and
carrying a real quality signal (the quickstart's perceiver is learned on it)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from clearair.models.perceiver import PerceiverConfig, build_perceiver, fit_prompts
from clearair.models.pretrained import bundled_clip_dir, load_open_clip
from clearair.scoring import grid_probabilities, quality_score
from synth.degradations import degrade
from workflows.qclip import CLEAN, PretrainConfig, captions, pretrain, training_photos, weights_digest


def test_pretraining_is_reproducible_and_writes_an_open_clip_folder(tmp_path) -> None:
    cfg = dataclasses.replace(PretrainConfig(), steps=3, batch=8, eval_samples=16, warmup=1)
    first, second = pretrain(cfg, tmp_path / "a"), pretrain(cfg, tmp_path / "b")
    assert first["weights_sha256"] == second["weights_sha256"] == weights_digest(tmp_path / "a")
    assert set(first["training_photographs"]) == set(training_photos("train"))
    assert not set(first["training_photographs"]) & (set(training_photos("test")) | set(training_photos("val")))
    import open_clip

    model = open_clip.create_model(f"local-dir:{tmp_path / 'a'}")  # open_clip's own loader, as for a hub folder
    assert model.visual.preprocess_cfg["size"] == (48, 48)
    assert json.loads((tmp_path / "a" / "card.json").read_text())["pretrain"]["steps"] == 3


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load_open_clip("qclip-tiny", "bundled:qclip-tiny")
    return model, tokenizer


def test_the_shipped_model_matches_its_card(shipped) -> None:
    folder = bundled_clip_dir("qclip-tiny")
    card = json.loads((folder / "card.json").read_text())
    assert card["weights_sha256"] == weights_digest(folder)
    assert card["captions"] == [c.text for c in captions()]
    assert (folder / "open_clip_model.safetensors").stat().st_size < 5_000_000


def _clean_similarity(model, tokenizer, images: list[np.ndarray]) -> np.ndarray:
    from synth.read import to_tensor

    cfg = model.visual.preprocess_cfg
    x = torch.stack([to_tensor(i) for i in images])
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer([c.text for c in captions()])), dim=-1)
        return (100 * img @ txt.T).softmax(-1)[:, 0].numpy()  # P("a clean photo")


def test_the_shipped_model_prefers_a_clean_crop_to_its_noisy_copy(shipped) -> None:
    model, tokenizer = shipped
    assert captions()[0].text == CLEAN
    wins = []
    for photo in training_photos("test").values():  # photographs it never saw
        for y, x in ((40, 60), (150, 200), (220, 300)):
            clean = np.ascontiguousarray(photo[y : y + 48, x : x + 48])
            noisy, _ = degrade(clean, "gaussian_noise", seed=y + x, severity="medium")
            p_clean, p_noisy = _clean_similarity(model, tokenizer, [clean, noisy])
            wins.append(p_clean > p_noisy)
    assert np.mean(wins) >= 0.8, wins


def _toy_tiers(photos: list[np.ndarray], n: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """Toy tiers: heavy noise (low), light blur + light noise (medium), clean (high), 48-pixel crops."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = int(rng.integers(photo.shape[0] - 48)), int(rng.integers(photo.shape[1] - 48))
        clean = np.ascontiguousarray(photo[y : y + 48, x : x + 48])
        low, _ = degrade(clean, "gaussian_noise", seed=i, severity="heavy")
        medium, _ = degrade(degrade(clean, "gaussian_blur", seed=i, severity="light")[0], "gaussian_noise",
                            seed=i, severity="light")  # fmt: skip
        out += [(low, 0), (medium, 1), (clean, 2)]
    return out


def test_a_perceiver_on_the_shipped_model_separates_toy_tiers(shipped) -> None:
    from synth.read import to_tensor

    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.qclip())
    train = _toy_tiers(list(training_photos("train").values()), 24, 0)
    batch = (torch.stack([to_tensor(i) for i, _ in train]), torch.tensor([t for _, t in train]))
    fit_prompts(perceiver, [batch], steps=60, lr=0.01, min_lr=0.001)
    held = _toy_tiers(list(training_photos("test").values()), 20, 1)
    probs = [grid_probabilities(perceiver.eval(), img, 48) for img, _ in held]
    accuracy = np.mean([int(np.argmax(p)) == t for p, (_, t) in zip(probs, held, strict=True)])
    assert accuracy >= 0.7, accuracy  # chance is 1/3
    scores = [quality_score(p) for p in probs]
    assert all(scores[i + 2] > scores[i] for i in range(0, len(scores), 3))  # clean above heavy noise, each crop


def test_prompts_on_the_shipped_model_start_from_the_seed(shipped) -> None:
    """A pretrained CLIP's perceiver draws its starting prompts under the seed too, so a perceiver stage repeats."""
    from clearair.priors import perceiver_from_config

    config = dataclasses.asdict(PerceiverConfig.qclip())
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    first = perceiver_from_config(config, seed=0).prompt_learner.state_dict()
    again = perceiver_from_config(config, seed=0).prompt_learner.state_dict()
    other = perceiver_from_config(config, seed=1).prompt_learner.state_dict()
    ctx = [k for k in first if "ctx" in k]
    assert ctx and all(torch.equal(first[k], again[k]) for k in ctx)
    assert not all(torch.equal(first[k], other[k]) for k in ctx)  # ... and the seed must

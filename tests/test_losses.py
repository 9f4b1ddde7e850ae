"""Perceive-IR and ClearAIR losses on tiny random-init parts, offline; and the VGG16 loader."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clearair.losses import (
    DPL_LAYER_WEIGHTS,
    ClipAwareLoss,
    DifficultyAdaptivePerceptualLoss,
    LossWeights,
    PerceiveIRLoss,
    cfe_infonce,
    clue_reuse_loss,
    difficulty_weights,
    negative_coverage,
    strong_photometric,
)
from clearair.models.perceiver import PerceiverConfig, build_perceiver, fit_prompts
from clearair.models.pretrained import MissingWeightsError, load_vgg16_features
from clearair.models.vgg import PERCEIVE_IR_TAPS, RELEASE_TAPS, VGGFeatures, check_taps, vgg16_layer_names


def _blocky(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="nearest")


def _noisy(clean: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    return VGGFeatures(load_vgg16_features(None))


@pytest.fixture(scope="module")
def trained_perceiver():
    """Tiny perceiver taught low = heavy noise, medium = mild noise, high = clean."""
    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.tiny())
    batches = []
    for seed in range(8):
        clean = _blocky(8, seed)
        images = torch.cat([_noisy(clean, 0.3, seed), _noisy(clean, 0.1, seed), clean])
        batches.append((images, torch.arange(3).repeat_interleave(8)))
    fit_prompts(perceiver, batches, steps=150, lr=1e-2)
    return perceiver


def test_clip_aware_loss_falls_as_the_image_moves_to_its_ground_truth(trained_perceiver):
    loss = ClipAwareLoss(trained_perceiver)
    gt = _blocky(16, seed=50)
    lq = _noisy(gt, 0.3, seed=51)
    values = [loss(lq + t * (gt - lq)).item() for t in (0.0, 0.5, 1.0)]
    assert values[0] > values[1] > values[2], values
    restored = lq.clone().requires_grad_(True)
    loss(restored).backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in trained_perceiver.parameters())


@pytest.mark.parametrize("temperature", [1.0, 100.0, None])
def test_clip_aware_loss_is_its_formula(trained_perceiver, temperature):
    """1 - softmax(cos(img, prompts) / T)[excellent], by hand in float64; None: T = 1 / CLIP's logit scale."""
    images = _noisy(_blocky(4, seed=60), 0.2, seed=61)
    with torch.no_grad():
        cos = (trained_perceiver.encode_image(images) @ trained_perceiver.prompt_features().T).double()
        t = 1.0 / trained_perceiver.logit_scale.exp().item() if temperature is None else temperature
        p_excellent = torch.exp(cos[:, 2] / t) / torch.exp(cos / t).sum(dim=1)
        got = ClipAwareLoss(trained_perceiver, temperature)(images).item()
    assert got == pytest.approx(1.0 - p_excellent.mean().item(), abs=1e-6)
    if temperature == 100.0:
        assert abs(got - 2 / 3) < 0.01  # a hot softmax: every tier near a third
    with pytest.raises(ValueError, match="temperature"):
        ClipAwareLoss(trained_perceiver, 0.0)


def _features(n: int, seed: int, dim: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_infonce_prefers_matching_positives():
    anchor = _features(8, 0)
    positive = F.normalize(anchor + 0.1 * _features(8, 1), dim=-1)
    task = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    shuffled = positive[torch.tensor([3, 5, 7, 1, 0, 2, 4, 6])]
    assert cfe_infonce(anchor, positive, task)[0] < cfe_infonce(anchor, shuffled, task)[0]


def test_infonce_without_negatives_is_finite_zero():
    anchor = _features(4, 0).requires_grad_(True)
    loss, coverage = cfe_infonce(anchor, _features(4, 1), torch.zeros(4, dtype=torch.long))
    assert coverage.item() == 0.0
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(anchor.grad).all()


def test_infonce_matches_its_definition():
    """Per anchor: -log e^(a.p/tau) / (e^(a.p/tau) + sum over other-task anchors and positives e^(a.f/tau))."""
    anchor, positive = _features(5, 0), _features(5, 1)
    task = torch.tensor([0, 0, 1, 1, 2])
    terms = []
    for i in range(5):
        pos = anchor[i] @ positive[i] / 0.1
        negatives = [f for j in range(5) if task[j] != task[i] for f in (anchor[j], positive[j])]
        denominator = pos.exp() + sum((anchor[i] @ f / 0.1).exp() for f in negatives)
        terms.append(-(pos.exp() / denominator).log())
    loss, coverage = cfe_infonce(anchor, positive, task, tau=0.1)
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert coverage.item() == 1.0


def test_difficulty_weights_switch_exactly_at_the_model_psnr():
    weights = difficulty_weights(torch.tensor([25.0, 29.999, 30.0, 30.001, 40.0]), model_psnr=30.0)
    assert weights.tolist() == [1.25, 1.25, 1.25, 0.75, 0.75]
    custom = difficulty_weights(torch.tensor([[1.0, 3.0]]), model_psnr=2.0, hard=2.0, easy=0.5)
    assert custom.tolist() == [[2.0, 0.5]]


def test_vgg_taps(vgg):
    """The authors' taps, features[:16] at 3, 7, 11, 15; conv2_2 is its convolution's output, before the ReLU."""
    feats = vgg(torch.rand(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 256]
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 8]
    assert len(vgg.features) == 16 and sorted(vgg.tap_index) == [3, 7, 11, 15]
    assert (feats[1] < 0).any() and (feats[0] >= 0).all()  # conv2_2 keeps its negatives: no in-place ReLU after it
    assert not any(p.requires_grad for p in vgg.parameters())
    release = VGGFeatures(load_vgg16_features(None), RELEASE_TAPS)
    assert [f.shape[1] for f in release(torch.rand(1, 3, 32, 32))] == [64, 128, 256, 512]


def test_vgg16_layer_names_without_building_it_match_the_network():
    from clearair.models.vgg import _vgg_layer_names

    assert vgg16_layer_names() == _vgg_layer_names(load_vgg16_features(None))
    check_taps(PERCEIVE_IR_TAPS, DPL_LAYER_WEIGHTS)
    for taps, weights, message in (
        (["relu9_9"], [1.0], "unknown VGG16 taps"),
        (["relu3_3", "relu1_2"], [1.0, 1.0], "shallow to deep"),
        (["relu1_2", "relu1_2"], [1.0, 1.0], "distinct"),
        (["relu1_2"], [1.0, 2.0], "2 layer weights for 1"),
    ):
        with pytest.raises(ValueError, match=message):
            check_taps(taps, weights)


def test_pipeline_defaults_are_the_authors_taps_and_weights():
    from synth.config import NEUTRAL
    from workflows.config import PerceptualConfig, TrainConfig

    default = TrainConfig().perceptual
    assert tuple(default.taps) == PERCEIVE_IR_TAPS and tuple(default.layer_weights) == DPL_LAYER_WEIGHTS
    neutral = TrainConfig.model_fields["perceptual"].json_schema_extra[NEUTRAL]
    assert tuple(PerceptualConfig(**neutral).taps) == RELEASE_TAPS  # clearair 0.1.0's, as its cache keys assume


def test_dpl_is_safe_at_zero_and_falls_as_restoration_approaches_gt(vgg):
    dpl = DifficultyAdaptivePerceptualLoss(vgg)
    gt = _blocky(2, seed=1)
    lq = _noisy(gt, 0.3, seed=2)
    negatives = torch.stack([_noisy(gt, 0.1, seed=3), _noisy(gt, 0.15, seed=4)], dim=1)  # (B, 2, 3, H, W)
    neg_weights = torch.tensor([[1.25, 0.75], [0.75, 0.75]])

    same = gt.clone().requires_grad_(True)
    at_zero = dpl(same, gt, gt, negatives=gt[:, None].clone(), neg_weights=torch.ones(2, 1))
    at_zero.backward()
    assert at_zero.item() == 0.0 and torch.isfinite(same.grad).all()

    values = [dpl(lq + t * (gt - lq), gt, lq, negatives, neg_weights).item() for t in (0.0, 0.5, 0.9)]
    assert values[0] > values[1] > values[2] >= 0, values
    restored = (lq + 0.5 * (gt - lq)).requires_grad_(True)
    dpl(restored, gt, lq).backward()  # without negatives: only the 2 |R - LQ| term below the line
    assert torch.isfinite(restored.grad).all() and restored.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="both or neither"):
        dpl(restored, gt, lq, negatives=negatives)


class _MustNotRun(nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("a part with weight 0 was computed")


def test_loss_parts_with_zero_weight_are_not_computed():
    gt = _blocky(4, seed=0)
    lq = _noisy(gt, 0.2, seed=1)
    restored = lq.clone().requires_grad_(True)
    anchor, positive = _features(4, 0), _features(4, 1)
    task = torch.tensor([0, 0, 1, 1])
    loss = PerceiveIRLoss(LossWeights(clip=0.0, dpl=0.0), clip_loss=_MustNotRun(), dpl=_MustNotRun())
    total, parts = loss(restored, gt, lq, anchor, positive, task)
    assert set(parts) == {"l1", "con", "con_coverage", "total"} and parts["con_coverage"] == 1.0
    assert parts["total"] == pytest.approx(parts["l1"] + 0.1 * parts["con"], rel=1e-6)
    total.backward()
    assert restored.grad is not None

    total, parts = PerceiveIRLoss(LossWeights(con=0.0))(restored, gt, lq, None, None, None)
    assert set(parts) == {"l1", "total"}  # clip and dpl have no module, con has weight 0
    with pytest.raises(ValueError, match="cfe_anchor"):
        PerceiveIRLoss()(restored, gt, lq, None, None, None)


def test_perceive_ir_loss_with_every_part(vgg, trained_perceiver):
    gt = _blocky(2, seed=0)
    lq = _noisy(gt, 0.3, seed=1)
    restored = (0.5 * (gt + lq)).requires_grad_(True)
    negatives = _noisy(gt, 0.1, seed=2)[:, None]
    loss = PerceiveIRLoss(LossWeights(), ClipAwareLoss(trained_perceiver), DifficultyAdaptivePerceptualLoss(vgg))
    total, parts = loss(
        restored, gt, lq, _features(2, 0), _features(2, 1), torch.tensor([0, 1]), negatives, torch.ones(2, 1)
    )
    assert set(parts) == {"l1", "con", "con_coverage", "clip", "dpl", "total"}
    expected = parts["l1"] + 0.1 * parts["con"] + 0.05 * parts["clip"] + 0.1 * parts["dpl"]
    assert parts["total"] == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert torch.isfinite(restored.grad).all()


def test_clue_reuse_is_zero_for_identity_on_a_constant_image_and_positive_otherwise():
    identity = lambda x: x  # noqa: E731
    constant = torch.full((2, 3, 16, 16), 0.4) * torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        assert clue_reuse_loss(identity, constant, generator=g).item() == pytest.approx(0.0, abs=1e-12)
    textured = _blocky(2, seed=0, size=16)
    assert clue_reuse_loss(identity, textured, generator=torch.Generator().manual_seed(0)).item() > 1e-6


def test_clue_reuse_trains_the_restorer_not_the_first_output():
    restorer = nn.Conv2d(3, 3, 3, padding=1)
    restored = _blocky(2, seed=0, size=16).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    loss = clue_reuse_loss(restorer, restored, gamma=0.05, generator=g)
    loss.backward()
    assert loss.item() > 0
    assert restored.grad is None
    assert restorer.weight.grad is not None and restorer.weight.grad.abs().sum() > 0
    again = clue_reuse_loss(restorer, restored, gamma=0.05, generator=torch.Generator().manual_seed(0))
    assert again.item() == pytest.approx(loss.item())  # same generator seed, same draws


def test_strong_augmentation_keeps_pixels_in_place():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8, 8] = 1.0
    y = strong_photometric(x, torch.Generator().manual_seed(0))
    assert y[0, 0].argmax().item() == 8 * 16 + 8  # blur + contrast: no geometric move


def test_vgg16_loader_from_files_and_missing_cache(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    features = load_vgg16_features(None)
    state = {k: v.contiguous() for k, v in features.state_dict().items()}
    save_file(state, str(tmp_path / "vgg.safetensors"))
    torch.save(
        {f"features.{k}": v for k, v in state.items()} | {"classifier.0.bias": torch.zeros(2)}, tmp_path / "v.pth"
    )
    for source in ("vgg.safetensors", "v.pth"):
        loaded = load_vgg16_features(str(tmp_path / source))
        assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
        assert not any(p.requires_grad for p in loaded.parameters())

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*torch/hub/checkpoints"):
        load_vgg16_features("torchvision")
    with pytest.raises(MissingWeightsError, match="absent.pth"):
        load_vgg16_features(str(tmp_path / "absent.pth"))


def _paper_family_labels(n: int, seed: int) -> torch.Tensor:
    """``n`` draws of degradation-family labels from perceive_ir_3task's resampled data epoch (PromptIR's training
    sets: BSD400 + WED's 5,144 clean images per sigma, RESIDE OTS's 72,135, Rain100L's 200 pairs)."""
    from clearair.data import TaskIndex, resampled_shares
    from workflows.config import load_pipeline

    cfg = load_pipeline("perceive_ir_3task")
    counts = {"denoise_15": 5144, "denoise_25": 5144, "denoise_50": 5144, "derain": 200, "dehaze": 72135}
    shares, _ = resampled_shares(counts, cfg.train.resample)
    tasks = TaskIndex(counts)
    drawn = np.random.default_rng(seed).choice(list(shares), size=n, p=list(shares.values()))
    return torch.tensor([tasks.family_index(t) for t in drawn])


def test_gathered_family_labels_give_nearly_every_anchor_a_negative():
    """4 ranks x 2 images (the 3-task recipe's per-GPU batch) over 500 steps: with the negatives of all ranks
    and the noise levels one label, >= 90% of anchors have a negative; each rank alone leaves a third without."""
    gathered, local = [], []
    for step in range(500):
        labels = _paper_family_labels(8, step).view(4, 2)  # (rank, image)
        gathered += [negative_coverage(labels[r], labels.flatten()) for r in range(4)]
        local += [negative_coverage(labels[r], labels[r]) for r in range(4)]
    assert float(torch.stack(gathered).mean()) >= 0.9
    assert float(torch.stack(local).mean()) < 0.75


def test_noise_levels_are_one_family_and_other_tasks_their_own():
    from clearair.data import TaskIndex
    from synth.recipes import task_family

    assert {task_family(t) for t in ("denoise_15", "denoise_25", "denoise_50")} == {"denoise"}
    assert [task_family(t) for t in ("dehaze", "derain", "l_h_r", "outdoor_rain")] == [
        "dehaze", "derain", "l_h_r", "outdoor_rain"
    ]  # fmt: skip
    tasks = TaskIndex(["denoise_15", "denoise_50", "derain"])
    assert tasks.family_index("denoise_15") == tasks.family_index("denoise_50") != tasks.family_index("derain")


def _gathered_infonce_worker(rank: int, world: int, init: str, features: torch.Tensor, labels: torch.Tensor, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        n = len(labels) // world
        anchor = features[0, rank * n : (rank + 1) * n].clone().requires_grad_(True)
        positive = features[1, rank * n : (rank + 1) * n].clone().requires_grad_(True)
        loss, coverage = cfe_infonce(anchor, positive, labels[rank * n : (rank + 1) * n], tau=0.1, gather=True)
        loss.backward()
        # plain lists: a tensor would cross the queue as a shared-memory handle that dies with this process
        out.put((rank, float(loss.detach()), float(coverage), anchor.grad.tolist(), positive.grad.tolist()))
    finally:
        dist.destroy_process_group()


def test_gathered_infonce_on_two_gloo_workers_matches_the_single_process_loss(tmp_path):
    """Each of 2 real gloo workers holds 3 images: its loss and its features' gradients are those of one process
    holding all 6 as the bank, its own anchors, and only its own slice differentiable."""
    import torch.multiprocessing as mp

    world, n = 2, 3
    features = torch.stack([_features(world * n, 0), _features(world * n, 1)])  # (anchor|positive, 6, 16)
    labels = torch.tensor([0, 0, 0, 0, 1, 2])  # ranks: [0, 0, 0] (no negative of its own) and [0, 1, 2]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_gathered_infonce_worker, args=(r, world, init, features, labels, out))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    results = {r: (loss, cov, torch.tensor(ga), torch.tensor(gp))
               for r, loss, cov, ga, gp in (out.get(timeout=120) for _ in procs)}  # fmt: skip
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (loss, coverage, grad_anchor, grad_positive) in results.items():
        local = slice(rank * n, (rank + 1) * n)
        bank = features.clone()
        anchor = bank[0, local].clone().requires_grad_(True)
        positive = bank[1, local].clone().requires_grad_(True)
        pos = (anchor * positive).sum(-1) / 0.1
        bank_a = torch.cat([bank[0, : rank * n], anchor, bank[0, (rank + 1) * n :]])
        bank_p = torch.cat([bank[1, : rank * n], positive, bank[1, (rank + 1) * n :]])
        everything, everything_labels = torch.cat([bank_a, bank_p]), labels.repeat(2)
        terms = []
        for i in range(n):
            negatives = everything[everything_labels != labels[local][i]]
            logits = torch.cat([pos[i : i + 1], anchor[i] @ negatives.T / 0.1])
            terms.append(torch.logsumexp(logits, 0) - pos[i])
        expected = torch.stack(terms).mean()
        expected.backward()
        # float32 sums in other kernels: a worker spawned after the CLI pinned os.environ to AVX2 runs other GEMM
        # code than this process; a bank without the other rank's images changes the loss by > 0.1
        assert loss == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
        assert coverage == 1.0
        torch.testing.assert_close(grad_anchor, anchor.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_positive, positive.grad, rtol=1e-4, atol=1e-5)
    local_only = cfe_infonce(features[0, :n], features[1, :n], labels[:n])[1]
    assert float(local_only) == 0.0  # alone, rank 0's one-label batch has no negative: its loss would be 0

"""ClearAIRNet: shapes, gradients, priors, QGM identity, mask dropout, O(HW x regions) attention, a few steps."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from clearair.models.clearair_net import (
    GUIDED_STAGES,
    ClearAIRConfig,
    ClearAIRNet,
    QualityGuidance,
    SemanticCrossAttention,
    drop_masks,
)
from tests.tiny import REGION_DINO


def _priors(cfg: ClearAIRConfig, b: int, mask_size: tuple[int, int] = (8, 8), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.n_regions, (b, *mask_size), generator=g)
    return {
        "quality_emb": torch.randn(b, cfg.quality_dim, generator=g),
        "degradation_emb": torch.randn(b, cfg.degradation_dim, generator=g),
        "region_masks": F.one_hot(labels, cfg.n_regions).permute(0, 3, 1, 2).float(),  # (B, M, h, w)
    }


def test_tiny_forward_backward_with_priors_from_the_tiny_sources():
    from clearair.models.assessors import DegradationEmbedder, PerceiverAssessor, compute_clearair_priors
    from clearair.models.guidance import CFE
    from clearair.models.perceiver import PerceiverConfig, build_perceiver
    from clearair.models.pretrained import load_dinov2
    from clearair.models.regions import DinoClusterRegions

    torch.manual_seed(0)
    perceiver = build_perceiver(PerceiverConfig.tiny())
    dino = load_dinov2(REGION_DINO)
    assessor, degrader = PerceiverAssessor(perceiver), DegradationEmbedder(CFE(), perceiver)
    regions = DinoClusterRegions(dino, n_regions=4, image_size=64)
    cfg = dataclasses.replace(ClearAIRConfig.tiny(), quality_dim=assessor.dim, degradation_dim=degrader.dim)
    model = ClearAIRNet(cfg)
    lq = torch.rand(3, 3, 32, 48)
    out = model(lq, compute_clearair_priors(lq, assessor, regions, degrader))
    assert out.shape == lq.shape
    out.abs().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.arch == "clearair" and model.size_multiple == 8 and model.config is cfg


def test_paper_config_parameter_count():
    model = ClearAIRNet(ClearAIRConfig.paper())
    n = sum(p.numel() for p in model.parameters())
    assert 26e6 < n < 36e6  # the paper reports ~31M
    assert model.config.backbone.num_blocks == (3, 5, 6, 8)
    assert dataclasses.asdict(model.config)["backbone"]["dim"] == 48


def test_missing_or_mismatched_priors_name_the_key_and_its_source():
    cfg = ClearAIRConfig.tiny()
    model = ClearAIRNet(cfg)
    lq = torch.rand(2, 3, 16, 16)
    sources = {"quality_emb": "Assessor", "region_masks": "Regions", "degradation_emb": "Embedder"}
    for key, source in sources.items():
        priors = _priors(cfg, 2)
        del priors[key]
        with pytest.raises(ValueError, match=f"(?s)'{key}'.*{source}"):
            model(lq, priors)
    with pytest.raises(ValueError, match="quality_emb"):
        model(lq, None)
    bad = _priors(cfg, 2) | {"quality_emb": torch.randn(2, cfg.quality_dim + 1)}
    with pytest.raises(ValueError, match="quality_dim"):
        model(lq, bad)
    bad = _priors(cfg, 2) | {"region_masks": torch.rand(2, cfg.n_regions + 1, 8, 8)}
    with pytest.raises(ValueError, match="n_regions"):
        model(lq, bad)


def test_fresh_qgm_keeps_features_unchanged():
    qgm = QualityGuidance(16, 8)
    x = torch.randn(2, 8, 5, 7)
    assert torch.equal(qgm(x, torch.randn(2, 16)), x)
    # and inside a fresh network, for every level
    cfg = ClearAIRConfig.tiny()
    model = ClearAIRNet(cfg)
    seen = []

    def check(module, args, output):
        seen.append(torch.equal(output, args[0]))

    for level in model.backbone.levels.values():
        if hasattr(level, "qgm"):
            level.qgm.register_forward_hook(check)
    model(torch.rand(2, 3, 16, 16), _priors(cfg, 2))
    assert len(seen) == 7 and all(seen)


def test_mask_dropout_only_in_training_and_never_drops_every_mask():
    cfg = dataclasses.replace(ClearAIRConfig.tiny(), mask_dropout=0.9)
    model = ClearAIRNet(cfg)
    lq = torch.rand(4, 3, 16, 16)
    priors = _priors(cfg, 4)
    priors["region_masks"][0, 1:] = 0  # image 0 has a single non-empty mask
    present = priors["region_masks"].flatten(2).amax(-1) > 0
    model.eval()
    assert torch.equal(model.guidance(lq, priors)["region_valid"], present)
    model.train()
    torch.manual_seed(0)
    draws = [model.guidance(lq, priors)["region_valid"] for _ in range(50)]
    for valid in draws:
        assert valid.any(dim=1).all()  # at least one mask per image
        assert not (valid & ~present).any()  # empty masks are never "kept"
        assert valid[0, 0]  # the only mask of image 0 survives
    assert len({tuple(v.flatten().tolist()) for v in draws}) > 1  # dropout is random
    # dropped masks are zeroed, kept ones unchanged
    masks, keep = drop_masks(priors["region_masks"], 0.5)
    assert torch.equal(masks, priors["region_masks"] * keep[:, :, None, None])


def test_images_without_regions_and_masks_at_any_resolution():
    cfg = ClearAIRConfig.tiny()
    model = ClearAIRNet(cfg).eval()
    lq = torch.rand(2, 3, 24, 32)
    for size in [(4, 4), (24, 32), (100, 60)]:
        assert model(lq, _priors(cfg, 2, size)).shape == lq.shape
    empty = _priors(cfg, 2) | {"region_masks": torch.zeros(2, cfg.n_regions, 8, 8)}
    assert torch.isfinite(model(lq, empty)).all()
    attn = SemanticCrossAttention(8, 2)
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(attn(x, torch.zeros(1, 3, 6, 6), torch.ones(1, 3, dtype=torch.bool)), x)


class _ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_region_attention_is_hw_by_regions_never_hw_by_hw():
    cfg = ClearAIRConfig.tiny()
    model = ClearAIRNet(cfg).eval()
    h, w = 64, 96
    pixels = {name: (h >> s) * (w >> s) for name, s in zip(GUIDED_STAGES, (3, 2, 1, 0), strict=True)}
    log = _ShapeLog()
    with log, torch.no_grad():
        model(torch.rand(1, 3, h, w), _priors(cfg, 1))
    full = h * w
    assert max(torch.Size(s).numel() for _, s in log.shapes) < full * full // 64
    products = [s for op, s in log.shapes if "mm" in op]  # every matrix product, attention maps included
    heads = dict(zip(GUIDED_STAGES, cfg.backbone.heads[::-1], strict=True))  # latent has the most heads
    for name, hw in pixels.items():
        assert not any(s[-1] == s[-2] == hw for s in products), f"{name}: an HW x HW attention map"
        attention_map = (heads[name], hw, cfg.n_regions)  # (B * heads, HW, M) with B = 1
        assert attention_map in products, f"{name}: no (heads, HW, M) attention map"


def test_a_few_steps_reduce_l1_on_a_toy_pair():
    torch.manual_seed(0)
    cfg = ClearAIRConfig.tiny()
    model = ClearAIRNet(cfg)
    gt = torch.rand(2, 3, 16, 16)
    lq = (gt + 0.2 * torch.randn_like(gt)).clamp(0, 1)
    priors = _priors(cfg, 2)

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.l1_loss(model(lq, priors), gt).item()

    before = loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(15):
        opt.zero_grad()
        F.l1_loss(model(lq, priors), gt).backward()
        opt.step()
    assert loss() < 0.8 * before

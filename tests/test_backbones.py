"""Restormer and NAFNet backbones, their blocks, the level-factory hook, and the model factory."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from clearair.models import factory
from clearair.models.nafnet import NAFBlock, NAFNet, NAFNetConfig, SimpleGate
from clearair.models.restormer import (
    GDFN,
    MDTA,
    STAGES,
    Downsample,
    LayerNorm2d,
    Level,
    LevelSpec,
    PatchEmbed,
    Restormer,
    RestormerConfig,
    TransformerBlock,
    Upsample,
    transformer_level,
)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def _assert_all_grads(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradients: {missing}"


@pytest.mark.parametrize(
    "block",
    [
        LayerNorm2d(16),
        MDTA(16, heads=2, bias=False),
        GDFN(16, expansion=2.66, bias=False),
        TransformerBlock(16, heads=4, expansion=2.66, bias=True),
        NAFBlock(16),
    ],
    ids=lambda b: type(b).__name__,
)
def test_blocks_keep_shape_and_pass_gradients(block):
    x = torch.randn(3, 16, 8, 24, requires_grad=True)  # odd batch, non-square
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    _assert_all_grads(block)


def test_sampling_blocks_change_resolution_and_channels():
    x = torch.randn(3, 8, 16, 24)
    assert PatchEmbed(3, 8)(torch.rand(3, 3, 16, 24)).shape == (3, 8, 16, 24)
    assert Downsample(8)(x).shape == (3, 16, 8, 12)
    assert Upsample(8)(x).shape == (3, 4, 32, 48)
    assert SimpleGate()(x).shape == (3, 4, 16, 24)


def test_layernorm2d_normalises_each_pixel_over_channels():
    y = LayerNorm2d(32)(torch.randn(2, 32, 5, 7) * 4 + 3)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


class _SoftmaxShapes(TorchDispatchMode):
    """Records the shape of every softmax input (the attention maps)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._softmax:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_mdta_attention_map_is_channels_by_channels():
    with _SoftmaxShapes() as rec, torch.no_grad():
        MDTA(16, heads=2)(torch.randn(3, 16, 64, 96))
    assert rec.shapes == [(3, 2, 8, 8)]  # (B, heads, C/heads, C/heads), independent of H x W


def test_mdta_cost_is_linear_in_pixels():
    mdta = MDTA(16, heads=2)
    small, large = _flops(mdta, torch.randn(1, 16, 32, 32)), _flops(mdta, torch.randn(1, 16, 128, 128))
    assert large == pytest.approx(16 * small, rel=1e-6)  # 16x the pixels, 16x the work (quadratic would be 256x)


def test_restormer_cost_is_linear_in_pixels_up_to_256():
    model = Restormer(RestormerConfig.tiny()).to("meta")  # meta tensors: shapes and FLOPs without compute
    small = _flops(model, torch.empty(1, 3, 64, 64, device="meta"))
    large = _flops(model, torch.empty(1, 3, 256, 256, device="meta"))
    assert large == pytest.approx(16 * small, rel=1e-6)


def test_restormer_shapes_gradients_and_residual():
    model = Restormer(RestormerConfig.tiny())
    lq = torch.rand(3, 3, 16, 24, requires_grad=True)
    out = model(lq)
    assert out.shape == lq.shape
    (out - 0.5).abs().mean().backward()
    _assert_all_grads(model)
    nn.init.zeros_(model.output.weight)
    assert torch.equal(model(lq), lq)  # global residual: a zero head returns the input


def test_restormer_rejects_sizes_off_its_multiple():
    model = Restormer(RestormerConfig.tiny())
    assert model.size_multiple == 8
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 20, 16))


def test_restormer_paper_configuration_matches_paper_size():
    model = Restormer(RestormerConfig.paper())
    n = factory.count_parameters(model)
    assert 25.5e6 < n < 26.7e6, n  # Restormer paper: 26.13M
    dims = {name: spec_dim(model, name) for name in ("enc1", "latent", "dec1", "refine")}
    assert dims == {"enc1": 48, "latent": 384, "dec1": 96, "refine": 96}


def spec_dim(model: Restormer, name: str) -> int:
    return model.levels[name].blocks[0].norm1.weight.numel()


def test_level_factory_builds_every_stage_and_levels_receive_priors():
    seen_specs, seen_priors = [], []

    class Recording(Level):
        def forward(self, x, priors=None):
            seen_priors.append(priors)
            return super().forward(x, priors)

    def factory_fn(spec: LevelSpec) -> nn.Module:
        seen_specs.append(spec)
        return Recording(transformer_level(spec).blocks)

    model = Restormer(RestormerConfig.tiny(), level_factory=factory_fn)
    assert tuple(s.name for s in seen_specs) == STAGES
    priors = {"side": torch.zeros(2, 5)}
    model(torch.rand(2, 3, 16, 16), priors)
    assert len(seen_priors) == len(STAGES) and all(p is priors for p in seen_priors)


def test_nafnet_shapes_gradients_and_multiple():
    model = NAFNet(NAFNetConfig.tiny())
    assert model.size_multiple == 16
    lq = torch.rand(3, 3, 16, 48)
    out = model(lq)
    assert out.shape == lq.shape
    (out - 0.5).abs().mean().backward()
    _assert_all_grads(model)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.rand(1, 3, 24, 16))


def test_nafnet_paper_configuration_size():
    n = factory.count_parameters(NAFNet(NAFNetConfig.paper()))
    assert 28e6 < n < 30.5e6, n  # NAFNet-width32: ~29.2M


@pytest.mark.parametrize("arch", factory.architecture_names())  # the lazily imported ones too
def test_factory_round_trip_through_json(arch):
    model = factory.build_model(arch, preset="tiny")
    assert model.arch == arch
    d = json.loads(json.dumps(factory.config_to_dict(model.config)))
    assert factory.config_from_dict(arch, d) == model.config
    rebuilt = factory.build_model(arch, d)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_factory_overrides_nested_fields_partially_and_converts_lists():
    model = factory.build_model("perceive_ir", {"backbone": {"dim": 16, "num_blocks": [1, 1, 2, 1]}}, preset="tiny")
    cfg = model.config
    assert cfg.backbone.dim == 16 and cfg.backbone.num_blocks == (1, 1, 2, 1)
    assert cfg.backbone.num_refinement == RestormerConfig.tiny().num_refinement  # kept from the preset
    assert cfg.dino_dim == 32
    hash(cfg)  # still a frozen, hashable config


def test_factory_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match="perceive_ir"):
        factory.build_model("promptir")
    with pytest.raises(ValueError, match="num_refinement"):
        factory.build_model("restormer", {"depth": 3}, preset="tiny")
    with pytest.raises(ValueError, match="dino_dim"):
        factory.config_from_dict("perceive_ir", {"backbone": {}, "dino": 3})
    with pytest.raises(ValueError, match="tiny"):
        factory.build_model("nafnet", preset="huge")
    assert "clearair" in factory.architecture_names()


def test_clearair_builds_through_the_factory():
    model = factory.build_model("clearair", preset="tiny")
    d = factory.config_to_dict(model.config)
    assert factory.config_from_dict("clearair", json.loads(json.dumps(d))) == model.config


def test_count_parameters_excludes_frozen_by_default():
    model = factory.build_model("restormer", preset="tiny")
    total = factory.count_parameters(model)
    model.patch_embed.requires_grad_(False)
    frozen = model.patch_embed.proj.weight.numel()
    assert factory.count_parameters(model) == total - frozen
    assert factory.count_parameters(model, trainable_only=False) == total


def test_configs_are_json_able_plain_dicts():
    cfg = factory.config_from_dict("nafnet_guided", {"backbone": {"width": 8}})
    d = factory.config_to_dict(cfg)
    assert d["backbone"]["enc_blocks"] == list(NAFNetConfig().enc_blocks)
    assert dataclasses.is_dataclass(cfg.backbone) and cfg.backbone.width == 8

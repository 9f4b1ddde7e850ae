"""VGG16 feature taps for perceptual losses: the layer names, the taps the Perceive-IR authors use, and a frozen
extractor over torchvision's ``vgg16().features`` (weights from :func:`clearair.models.pretrained.load_vgg16_features`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clearair.models.guidance import IMAGENET_MEAN, IMAGENET_STD
from clearair.models.pretrained import freeze

# Perceptual-loss taps of VGG16 ``features``: the Perceive-IR authors' (``features[:16]`` at indices 3, 7, 11, 15),
# and those clearair 0.1.0 used (one tap per block, deeper).
PERCEIVE_IR_TAPS = ("relu1_2", "conv2_2", "relu3_1", "relu3_3")
RELEASE_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
VGG16_CONVS = (2, 2, 3, 3, 3)  # convolutions per block of VGG16


def vgg16_layer_names() -> list[str]:
    """The names of VGG16's 31 ``features`` layers (``conv1_1, relu1_1, conv1_2, ..., pool5``), without building it:
    what a tap may be called."""
    names = []
    for block, convs in enumerate(VGG16_CONVS, 1):
        for conv in range(1, convs + 1):
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
        names.append(f"pool{block}")
    return names


def check_taps(taps: tuple[str, ...] | list[str], layer_weights: tuple[float, ...] | list[float]) -> None:
    """A ValueError unless ``taps`` are distinct VGG16 layer names, shallow to deep, one weight each."""
    names = vgg16_layer_names()
    unknown = [t for t in taps if t not in names]
    if unknown or not taps:
        raise ValueError(f"unknown VGG16 taps {unknown or '[]'}; valid: {', '.join(names)}")
    order = [names.index(t) for t in taps]
    if order != sorted(set(order)):
        raise ValueError(f"VGG16 taps must be distinct and shallow to deep, got {list(taps)}")
    if len(layer_weights) != len(taps):
        raise ValueError(f"{len(layer_weights)} layer weights for {len(taps)} VGG16 taps {list(taps)}")


def _vgg_layer_names(features: nn.Sequential) -> list[str]:
    """``conv1_1, relu1_1, ..., pool1, conv2_1, ...`` for each module of a torchvision VGG ``.features``."""
    names, block, conv = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        else:
            names.append(f"pool{block}")
            block, conv = block + 1, 0
    return names


class VGGFeatures(nn.Module):
    """Frozen VGG feature taps of images in [0, 1] (ImageNet normalisation applied here).

    Only the layers up to the deepest tap are kept; their ReLUs are made out-of-place so a tap is never
    overwritten by the next layer.
    """

    def __init__(self, features_module: nn.Sequential, taps: tuple[str, ...] = PERCEIVE_IR_TAPS):
        super().__init__()
        names = _vgg_layer_names(features_module)
        unknown = [t for t in taps if t not in names]
        if unknown:
            raise ValueError(f"unknown VGG taps {unknown}; available: {names}")
        tap_index = sorted(names.index(t) for t in taps)
        layers = [nn.ReLU() if isinstance(m, nn.ReLU) else m for m in list(features_module)[: tap_index[-1] + 1]]
        self.features = freeze(nn.Sequential(*layers))
        self.taps = tuple(taps)
        self.tap_index = frozenset(tap_index)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Tap activations, shallow to deep, each (B, C_l, H_l, W_l)."""
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.tap_index:
                out.append(x)
        return out

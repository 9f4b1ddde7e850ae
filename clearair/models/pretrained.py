"""Loading of frozen pretrained parts through their libraries' own loaders, offline.

Every loader takes either a local path, a name the user's cache already holds, or (for tests and the
quickstart) a plain dict describing a tiny architecture that is built with random weights. A name that is
neither on disk nor in the cache raises :class:`MissingWeightsError` explaining what to fetch and where to
put it; nothing here ever downloads or silently falls back to random weights.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class MissingWeightsError(FileNotFoundError):
    """A pretrained part was asked for by name or path, and neither the path nor the local cache holds it."""


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random initialisation of a frozen part from a fixed seed, without touching the caller's RNG state.

    A tiny random-init frozen part (tests, the quickstart) must be the same network in every process that builds
    it from the same config (training workers, evaluation, ``clearair restore``), or its features would change
    meaning between training and inference.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with gradients off; frozen parts never train and never enter a state dict we save."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Frozen(nn.Module):
    """A frozen part inside a trainable module: in eval mode whatever ``.train()`` asks, gradients off, out of the
    holder's ``parameters()`` (so of its optimiser and of DDP) and of its ``state_dict()`` (so of checkpoints), yet
    moved by its ``.to(device)``, ``.half()``, ... Calling it calls the part, which is :attr:`part`.

    The part sits outside the module tree (no registered child): :func:`full_state_dict` still names its weights,
    as ``<name>.<key>``, for checksums.
    """

    part: nn.Module

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "part", freeze(part))  # bypasses nn.Module's registration of children
        self.training = False

    def train(self, mode: bool = True) -> Frozen:
        self.part.eval()
        return super().train(False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Frozen:
        if recurse:
            self.part._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.part(*args, **kwargs)

    def extra_repr(self) -> str:
        return type(self.part).__name__


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with the weights of every :class:`Frozen` part it holds, named as if the part were
    a child where its wrapper is (``perceiver.clip.<key>``)."""
    state = dict(module.state_dict())
    for name, child in module.named_modules(remove_duplicate=False):
        if isinstance(child, Frozen):
            prefix = f"{name}." if name else ""
            state.update({prefix + key: value for key, value in full_state_dict(child.part).items()})
    return state


def load_dinov2(source: str | dict[str, Any], seed: int = 0) -> nn.Module:
    """A frozen ``transformers`` DINOv2 model.

    Args:
        source: a local directory written by ``save_pretrained``, a hub name already in the local cache
            (e.g. ``facebook/dinov2-base``), or a dict of ``Dinov2Config`` keyword arguments for a tiny
            random-init model (tests, quickstart), initialised under ``seed``.
    """
    from transformers import Dinov2Config, Dinov2Model

    if isinstance(source, dict):
        with seeded_init(seed):
            return freeze(Dinov2Model(Dinov2Config(**source)))
    try:
        model = Dinov2Model.from_pretrained(str(source), local_files_only=True)
    except OSError as err:
        raise MissingWeightsError(
            f"DINOv2 weights {source!r} are not on this machine. Download them where you have network "
            f"(`hf download facebook/dinov2-base`, or "
            f"`Dinov2Model.from_pretrained(...).save_pretrained(DIR)`), "
            f"then point the config at the local directory or copy the cache to $HF_HOME."
        ) from err
    return freeze(model)


def local_path(source: str | Path, what: str, how: str) -> Path:
    """``source`` as an existing local path, or :class:`MissingWeightsError` saying how to obtain ``what``."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"{what} not found at {path}. {how}")
    return path


def dinov2_cls_tokens(model: nn.Module, images: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """CLS tokens of the given hidden layers (1-based, as in the papers) for ImageNet-normalised ``images``.

    Returns ``(B, len(layers), hidden)``.
    """
    out = model(pixel_values=images, output_hidden_states=True)
    states = out.hidden_states  # tuple of (B, 1 + N, D); index 0 is the embedding output
    return torch.stack([states[i][:, 0] for i in layers], dim=1)


# --- open_clip --------------------------------------------------------------------------------------------------

# ClearAIR's own open_clip architectures: model name -> config file in clearair/models/configs. open_clip names a
# registered config after its file stem, so the name open_clip knows is the stem ("clip-tiny").
_CLEARAIR_CLIP_CONFIGS = {"clearair-tiny-clip": "clip-tiny.json"}
# CLIP models this project trains and ships as package data (open_clip folders under clearair/models/weights),
# named ``bundled:<name>`` as a ``pretrained`` source; ``clearair pretrain-clip`` regenerates them.
BUNDLED_CLIPS = ("qclip-tiny",)
BUNDLED_PREFIX = "bundled:"


def bundled_clip_dir(name: str) -> Path:
    """The open_clip folder of a model clearair ships (``bundled:qclip-tiny`` -> ``.../weights/qclip-tiny``)."""
    if name not in BUNDLED_CLIPS:
        raise MissingWeightsError(f"no bundled CLIP {name!r}; bundled: {', '.join(BUNDLED_CLIPS)}")
    folder = Path(str(importlib.resources.files("clearair.models") / "weights" / name))
    if not (folder / "open_clip_model.safetensors").is_file():
        raise MissingWeightsError(
            f"the bundled CLIP {name!r} is missing from {folder} (an incomplete install or checkout): regenerate it "
            f"with `clearair pretrain-clip --out {folder}`"
        )
    return folder


@functools.cache
def _register_clip_config(file_name: str) -> str:
    """Register one bundled config file with open_clip (once per process) and return the name open_clip uses."""
    import open_clip

    resource = importlib.resources.files("clearair.models") / "configs" / file_name
    with importlib.resources.as_file(resource) as path:
        open_clip.add_model_config(path)
    return Path(file_name).stem


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 for the duration of a load, so hub-backed libraries look only at the local cache."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _cached_clip_tag_file(model_name: str, tag: str, tag_cfg: dict[str, Any]) -> tuple[str | None, str]:
    """Where an open_clip pretrained tag's weights sit in the local caches, without any network access.

    Looks in the Hugging Face cache (the tag's ``hf_hub`` repo, safetensors first, as open_clip does) and in
    open_clip's URL cache (``~/.cache/clip``). Returns ``(path or None, what to download)``.
    """
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag_cfg.get("file"):
        return tag_cfg["file"], f"the file {tag_cfg['file']}"
    hints = []
    if tag_cfg.get("hf_hub"):
        repo_id, file_name = os.path.split(tag_cfg["hf_hub"])
        file_name = file_name or HF_WEIGHTS_NAME
        candidates = [HF_SAFE_WEIGHTS_NAME] if file_name == HF_WEIGHTS_NAME else []
        if file_name.endswith((".bin", ".pth")):
            candidates.append(file_name[:-4] + ".safetensors")
        for name in [*candidates, file_name]:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found, ""
        hints.append(f"the Hugging Face repo {repo_id!r} (file {candidates[0] if candidates else file_name})")
    if tag_cfg.get("url"):
        url_file = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        if url_file.is_file():
            return str(url_file), ""
        hints.append(f"{tag_cfg['url']} into {url_file.parent}")
    return None, " or ".join(hints) or f"weights for open_clip {model_name}/{tag}"


def _create_clip_from_tag(name: str, tag: str) -> nn.Module:
    """Build ``name`` with the weights of pretrained tag ``tag`` from the local cache only."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    path, what = _cached_clip_tag_file(name, tag, tag_cfg)
    if path is None:
        hf_home = os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
        raise MissingWeightsError(
            f"open_clip weights {name!r} / {tag!r} are not in the local cache. Where you have network, download "
            f"{what} (e.g. run `open_clip.create_model({name!r}, pretrained={tag!r})` once), then copy the Hugging "
            f"Face cache to HF_HOME={hf_home}, or put the weights file on this machine and set the perceiver's "
            f"`pretrained` to its path."
        )
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    return open_clip.create_model(
        name, pretrained=path, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)), force_preprocess_cfg=preprocess
    )


def _create_clip_from_dir(source: str) -> tuple[nn.Module, str]:
    """Build from an open_clip ``local-dir:`` folder (``open_clip_config.json`` + weights); refuse a weightless one."""
    import open_clip

    folder = local_path(
        source.removeprefix("local-dir:"),
        "open_clip model folder",
        "Save one with open_clip's push_to_hf_hub helpers or download a hub repo (open_clip_config.json + weights).",
    )
    if not any((folder / n).is_file() for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        raise MissingWeightsError(
            f"{folder} holds no open_clip weights (open_clip_model.safetensors or open_clip_pytorch_model.bin): "
            f"copy the weights file next to open_clip_config.json."
        )
    name = f"local-dir:{folder}"
    return open_clip.create_model(name), name


def load_open_clip(model_name: str, pretrained: str | None) -> tuple[nn.Module, Callable]:
    """A frozen ``open_clip`` CLIP model and its tokenizer, loaded offline.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32"``) or one of ClearAIR's bundled configs
            (``"clearair-tiny-clip"``).
        pretrained: ``None`` for random weights (tiny/test configs only); ``"bundled:qclip-tiny"`` for the small
            quality-aware CLIP clearair ships (architecture and weights from its folder); a local weights file;
            ``"local-dir:/path"``
            (an open_clip folder with ``open_clip_config.json``, which then also defines the architecture); or an
            open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``) whose weights are already in the local
            Hugging Face cache (HF_HOME) or in ``~/.cache/clip``. Nothing is ever downloaded. A tag brings its own
            QuickGELU and mean/std settings; a bare file of OpenAI weights needs the ``-quickgelu`` model name
            (``"ViT-B-32-quickgelu"``).

    Raises:
        MissingWeightsError: the file, folder or cached tag is not on this machine.
    """
    import open_clip

    name = model_name
    if model_name in _CLEARAIR_CLIP_CONFIGS:
        name = _register_clip_config(_CLEARAIR_CLIP_CONFIGS[model_name])
    with _hub_offline():
        if pretrained is None:
            log.info("open_clip %s: random initialisation (pretrained=None, seeded)", model_name)
            with seeded_init():
                model = open_clip.create_model(name, pretrained=None)
        elif pretrained.startswith(BUNDLED_PREFIX):
            folder = bundled_clip_dir(pretrained.removeprefix(BUNDLED_PREFIX))
            model, name = _create_clip_from_dir(f"local-dir:{folder}")
        elif pretrained.startswith("local-dir:"):
            model, name = _create_clip_from_dir(pretrained)
        elif pretrained in open_clip.list_pretrained_tags_by_model(name):
            model = _create_clip_from_tag(name, pretrained)
        else:
            path = local_path(
                pretrained,
                f"open_clip weights for {model_name} ({pretrained!r} is neither a known pretrained tag of this model "
                f"nor an existing file)",
                f"Known tags: {open_clip.list_pretrained_tags_by_model(name)}; use one whose weights are cached, or "
                f"a local weights file.",
            )
            model = open_clip.create_model(name, pretrained=str(path))
        tokenizer = open_clip.get_tokenizer(name)
    return freeze(model), tokenizer


# --- VGG16 --------------------------------------------------------------------------------------------------------


def _vgg16_features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept a full ``vgg16`` state dict (``features.N.*``, ``classifier.*``) or a ``.features`` one (``N.*``)."""
    if any(k.startswith("features.") for k in state):
        return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    return state


def load_vgg16_features(source: str | None) -> nn.Module:
    """torchvision's ``vgg16().features``, frozen, for perceptual losses.

    Args:
        source: a local state-dict file (``.safetensors``, or a torch file read with ``weights_only=True``) of a
            whole vgg16 or of its ``.features``; ``"torchvision"`` for the ImageNet weights already in the torch
            hub cache (``$TORCH_HOME/hub/checkpoints``); ``None`` for random weights (tests only).
    """
    from torchvision.models import VGG16_Weights
    from torchvision.models.vgg import cfgs, make_layers

    with seeded_init():
        features = make_layers(cfgs["D"], batch_norm=False)  # == vgg16().features, without the classifier
    if source is None:
        log.info("VGG16 features: random initialisation (source=None)")
        return freeze(features)
    if source == "torchvision":
        weights = VGG16_Weights.IMAGENET1K_V1
        file_name = os.path.basename(weights.url)
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        path = cache_dir / file_name
        if not path.is_file():
            raise MissingWeightsError(
                f"VGG16 ImageNet weights {file_name} are not in the torch hub cache. Download {weights.url} where "
                f"you have network and put it in {cache_dir} (set TORCH_HOME to move the cache), or give a local "
                f"state-dict file instead."
            )
    else:
        path = local_path(source, "VGG16 weights file", "Save `torchvision.models.vgg16(weights=...).state_dict()`.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    features.load_state_dict(_vgg16_features_state(state))
    return freeze(features)

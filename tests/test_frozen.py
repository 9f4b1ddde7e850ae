"""The one wrapper for frozen parts: eval mode, no gradients, out of state dicts and optimisers, moved with its
holder; and the checksums that still cover what it holds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from clearair.models.assessors import PerceiverAssessor
from clearair.models.pretrained import Frozen, full_state_dict
from clearair.optim import adamw_cosine
from clearair.priors import perceiver_from_config

TINY_CLIP = {"clip_model": "clearair-tiny-clip", "pretrained": None, "n_ctx": 4, "image_size": 32}


def holder_of(part: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.net = nn.Linear(4, 4)
    holder.frozen = Frozen(part)
    return holder


def test_a_frozen_part_stays_in_eval_mode_and_out_of_state_dicts_and_optimisers():
    part = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    holder = holder_of(part).train()
    assert holder.net.training and not holder.frozen.training and not any(m.training for m in part.modules())
    assert not any(p.requires_grad for p in part.parameters())
    assert set(holder.state_dict()) == {"net.weight", "net.bias"}
    holder.load_state_dict(holder.state_dict())  # strict: nothing of the part is expected
    opt, _ = adamw_cosine(holder, 1e-3, 10, 1e-6)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in holder.net.parameters()}
    x = torch.rand(8, 4)
    torch.testing.assert_close(holder.frozen(x), part(x))  # calls the part; no dropout in eval mode
    torch.testing.assert_close(holder.frozen(x), holder.frozen(x))


def test_a_frozen_part_moves_with_its_holder():
    part = nn.Linear(4, 4)
    holder = holder_of(part).to(torch.float64)
    assert part.weight.dtype == torch.float64 and holder.net.weight.dtype == torch.float64
    holder.to("meta")
    assert part.weight.device.type == "meta"


def test_checksums_name_a_frozen_part_as_the_child_it_was():
    """A perceiver's CLIP is a Frozen part: out of its state dict, yet in the sums recorded for exports under the
    names it had as a plain child (``perceiver.clip.*``), so sums recorded before the wrapper still match."""
    perceiver = perceiver_from_config(TINY_CLIP, allow_random=True)
    assessor = PerceiverAssessor(perceiver)
    perceiver.train()
    assert perceiver.prompt_learner.training and not perceiver.clip.part.training
    assert set(perceiver.state_dict()) == {"prompt_learner.ctx"}
    full = full_state_dict(assessor)
    clip = {f"perceiver.clip.{k}" for k in perceiver.clip.part.state_dict()}
    assert "perceiver.clip.logit_scale" in clip and set(full) == clip | {"perceiver.prompt_learner.ctx"}

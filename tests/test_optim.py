"""The one optimiser set-up: the fused AdamW kernel where it applies, the same updates as the per-tensor loop."""

from __future__ import annotations

import torch
from torch import nn

from clearair.optim import adamw_cosine


def test_fused_adamw_on_the_cpu_makes_the_updates_of_the_per_tensor_loop():
    torch.manual_seed(0)
    fused_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 3, 1))
    loop_net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 3, 1))
    loop_net.load_state_dict(fused_net.state_dict())
    before = fused_net[0].weight.detach().clone()
    fused, fused_sched = adamw_cosine(fused_net, 1e-2, 20, 1e-4, weight_decay=1e-4)
    assert fused.defaults["fused"]
    loop = torch.optim.AdamW(loop_net.parameters(), lr=1e-2, weight_decay=1e-4)
    loop_sched = torch.optim.lr_scheduler.CosineAnnealingLR(loop, T_max=20, eta_min=1e-4)
    x = torch.rand(4, 3, 16, 16)
    for _ in range(20):
        for net, opt, sched in ((fused_net, fused, fused_sched), (loop_net, loop, loop_sched)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            sched.step()
    for a, b in zip(fused_net.parameters(), loop_net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert (fused_net[0].weight - before).abs().max() > 1e-2  # it trained


def test_parameters_off_cpu_and_cuda_keep_the_default_kernel():
    net = nn.Linear(4, 4).to("meta")
    opt, _ = adamw_cosine(net, 1e-3, 10, 1e-6)
    assert not opt.defaults["fused"]

"""Parameters, FLOPs, training-step speed, peak memory and MFU of the restorers (a script, not a test).

    python benchmarks/bench_models.py                  # CPU: params, FLOPs, one fwd+bwd at 128x128 (paper configs)
    python benchmarks/bench_models.py --quick          # the same on tiny configs (seconds)
    python benchmarks/bench_models.py --device cuda    # + the training-step matrix (samples/s, memory, MFU)
    python benchmarks/bench_models.py --device cuda --profile   # + top kernels of the Perceive-IR step

Needs torch only (``--frozen`` also needs transformers). Prints markdown tables to stdout, progress to stderr.

Training step = forward + L1 loss + backward + AdamW step (fused on CUDA), on fixed random tensors (data loading
is excluded; measure it apart), with random priors of the right shapes for the guided networks. Timings are
CUDA-synchronised per step; warm-up steps (which include torch.compile's compilation) are excluded; the median of
``--steps`` steps is reported.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one sample (matmuls, convolutions and
attention; elementwise ops and norms are not counted), as is usual for MFU. MFU = (3 x forward FLOPs of the
trained network + forward FLOPs of frozen parts run in the step, with ``--frozen``) x batch / step time / peak.
Peaks default to the H100 SXM dense figures: bf16 989 TFLOP/s, TF32 494.7 TFLOP/s (fp32 rows when TF32 is
enabled, the default here), fp32 66.9 TFLOP/s (with ``--no-tf32``); pass ``--peak-*`` for other GPUs (an H200
has the same compute peaks, an H100 PCIe about 0.76x).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from clearair.models.factory import build_model, count_parameters  # noqa: E402

log = logging.getLogger("bench_models")

ARCHS = ("restormer", "perceive_ir", "nafnet_guided", "clearair")
ALL_ARCHS = (*ARCHS, "nafnet")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
H100_PEAKS = {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}

PriorsFn = Callable[[torch.Tensor], "dict[str, torch.Tensor] | None"]


# ----------------------------------------------------------------------------------------------- models and priors


def build(arch: str, quick: bool, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, preset="tiny" if quick else "paper").to(device)


def random_priors(model: nn.Module, batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Random priors shaped as the model's forward expects (None for networks without guidance)."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(1)
    if hasattr(cfg, "dino_dim"):  # perceive_ir, nafnet_guided
        return {"dino_cls": torch.randn(batch, 4, cfg.dino_dim, generator=g).to(device)}
    if hasattr(cfg, "n_regions"):  # clearair: one-hot random regions at 1/4 resolution, like SAM2's masks
        side = max(size // 4, 4)
        labels = torch.randint(cfg.n_regions, (batch, side // 4, side // 4), generator=g)
        labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (B, side, side), blocky regions
        masks = F.one_hot(labels, cfg.n_regions).permute(0, 3, 1, 2).float()  # (B, M, side, side)
        return {
            "quality_emb": torch.randn(batch, cfg.quality_dim, generator=g).to(device),
            "degradation_emb": torch.randn(batch, cfg.degradation_dim, generator=g).to(device),
            "region_masks": masks.to(device),
        }
    return None


def frozen_prior_net(model: nn.Module, quick: bool, device: torch.device) -> nn.Module | None:
    """The frozen prior extractor a training step runs (``--frozen``): random-init DINOv2 for the DINO-guided nets."""
    if not hasattr(model.config, "dino_dim"):
        return None
    from clearair.models.guidance import SemanticGuidance
    from clearair.models.pretrained import load_dinov2

    dim = model.config.dino_dim
    tiny = {"hidden_size": dim, "num_hidden_layers": 12, "num_attention_heads": 2, "mlp_ratio": 1}
    return SemanticGuidance(load_dinov2(tiny if quick else {"hidden_size": dim})).to(device)


def make_priors_fn(model: nn.Module, batch: int, size: int, device: torch.device, frozen: nn.Module | None):
    if frozen is not None:
        return frozen
    priors = random_priors(model, batch, size, device)
    return lambda lq: priors


def forward(model: nn.Module, lq: torch.Tensor, priors: dict[str, torch.Tensor] | None) -> torch.Tensor:
    return model(lq) if priors is None else model(lq, priors=priors)


def forward_flops(model: nn.Module, size: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one (1, 3, size, size) sample."""
    lq = torch.rand(1, 3, size, size, device=device)
    priors = random_priors(model, 1, size, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(model, lq, priors)
    return int(counter.get_total_flops())


def frozen_flops(frozen: nn.Module | None, size: int, device: torch.device) -> int:
    if frozen is None:
        return 0
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        frozen(torch.rand(1, 3, size, size, device=device))
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, lq, gt, priors_fn, dtype) -> Callable[[], None]:
    def step() -> None:
        priors = priors_fn(lq)
        with torch.autocast(lq.device.type, dtype=dtype, enabled=dtype is not None):
            out = forward(model, lq, priors)
        loss = F.l1_loss(out.float(), gt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per step over ``steps`` synchronised steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup_step(arch: str, args, device, patch: int, dtype, channels_last: bool, compile_: bool):
    model = build(arch, args.quick, device).train()
    frozen = frozen_prior_net(model, args.quick, device) if args.frozen else None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4, fused=device.type == "cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lq = torch.rand(args.batch, 3, patch, patch, device=device).contiguous(memory_format=fmt)
    gt = torch.rand(args.batch, 3, patch, patch, device=device).contiguous(memory_format=fmt)
    run_model = torch.compile(model) if compile_ else model
    priors_fn = make_priors_fn(model, args.batch, patch, device, frozen)
    return model, frozen, make_step(run_model, opt, lq, gt, priors_fn, dtype)


def peak_for(dtype_name: str, args) -> tuple[float, str]:
    if dtype_name == "bf16":
        return args.peak_bf16, "bf16"
    return (args.peak_tf32, "tf32") if args.tf32 else (args.peak_fp32, "fp32")


def matrix_row(arch: str, args, device, patch: int, dtype_name: str, channels_last: bool, compile_: bool) -> dict:
    row = {"arch": arch, "patch": patch, "batch": args.batch, "dtype": dtype_name}
    row.update({"channels_last": "y" if channels_last else "n", "compile": "y" if compile_ else "n"})
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, frozen, step = setup_step(arch, args, device, patch, DTYPES[dtype_name], channels_last, compile_)
        sec = time_steps(step, device, args.warmup, args.steps)
        flops = args.batch * (3 * forward_flops(model, patch, device) + frozen_flops(frozen, patch, device))
    except torch.cuda.OutOfMemoryError:
        return {**row, "step ms": "OOM"}
    except Exception as err:  # one failing configuration (e.g. a compile error) must not end the matrix
        log.exception("%s failed", row)
        return {**row, "step ms": f"error: {type(err).__name__}"}
    finally:
        gc.collect()
        torch._dynamo.reset()
    row.update({"step ms": f"{sec * 1e3:.1f}", "samples/s": f"{args.batch / sec:.1f}"})
    if device.type == "cuda":
        row["TFLOP/s"] = f"{flops / sec / 1e12:.1f}"
        peak, name = peak_for(dtype_name, args)
        row["peak mem GiB"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
        row["MFU %"] = f"{100 * flops / sec / peak:.1f} (of {name})"
    else:
        row["GFLOP/s"] = f"{flops / sec / 1e9:.1f}"
    return row


# ----------------------------------------------------------------------------------------------- tables


def markdown(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(args, device) -> list[dict]:
    """Per arch: parameters, forward FLOPs at 128 and 256, one forward+backward at 128x128 batch 1."""
    rows = []
    for arch in args.archs:
        log.info("summary: %s", arch)
        model = build(arch, args.quick, device).train()
        lq = torch.rand(1, 3, 128, 128, device=device)
        priors = random_priors(model, 1, 128, device)

        def fwd_bwd(model=model, lq=lq, priors=priors) -> None:
            forward(model, lq, priors).abs().mean().backward()

        cpu = device.type == "cpu"
        sec = time_steps(fwd_bwd, device, warmup=1 if cpu else 3, steps=1 if cpu else 10)
        row = {"arch": arch, "preset": "tiny" if args.quick else "paper"}
        row["params M"] = f"{count_parameters(model) / 1e6:.2f}"
        row["GFLOPs fwd 128"] = f"{forward_flops(model, 128, device) / 1e9:.2f}"
        row["GFLOPs fwd 256"] = f"{forward_flops(model, 256, device) / 1e9:.2f}"
        if args.frozen:
            frozen = frozen_prior_net(model, args.quick, device)
            row["GFLOPs frozen"] = f"{frozen_flops(frozen, 128, device) / 1e9:.2f}" if frozen is not None else "-"
        row[f"fwd+bwd 128 b1 ms ({device.type})"] = f"{sec * 1e3:.0f}"
        rows.append(row)
        del model
        gc.collect()
    return rows


MATRIX_COLUMNS = ["arch", "patch", "batch", "dtype", "channels_last", "compile", "step ms", "samples/s"]
CUDA_COLUMNS = ["TFLOP/s", "peak mem GiB", "MFU %"]


def print_matrix(args, device) -> None:
    """The training-step matrix, one markdown row printed as each configuration finishes (a timeout keeps them)."""
    cols = MATRIX_COLUMNS + (CUDA_COLUMNS if device.type == "cuda" else ["GFLOP/s"])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    grid = itertools.product(args.archs, args.patches, args.dtypes, _switch(args.channels_last), _switch(args.compile))
    for arch, patch, dtype_name, cl, comp in grid:
        log.info("matrix: %s patch %d %s channels_last=%s compile=%s", arch, patch, dtype_name, cl, comp)
        row = matrix_row(arch, args, device, patch, dtype_name, cl, comp)
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |", flush=True)
    print()


def inference_memory_rows(args, device) -> list[dict]:
    """Peak activation bytes per pixel of whole-image inference (batch 1) at two sizes, and the slope between them.

    These calibrate ``clearair.inference.BYTES_PER_PIXEL`` (used where no CUDA probe runs).
    """
    rows = []
    for arch in args.archs:
        model = build(arch, args.quick, device).eval()
        for dtype_name in args.dtypes:
            peaks = {}
            for side in (256, 512):
                lq = torch.rand(1, 3, side, side, device=device)
                priors = random_priors(model, 1, side, device)
                sync(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode(), torch.autocast("cuda", DTYPES[dtype_name], enabled=dtype_name != "fp32"):
                    forward(model, lq, priors)
                sync(device)
                peaks[side] = torch.cuda.max_memory_allocated(device) - base
            slope = (peaks[512] - peaks[256]) / (512**2 - 256**2)
            row = {"arch": arch, "dtype": dtype_name}
            row.update({f"B/px @{s}": f"{peaks[s] / s**2:.0f}" for s in peaks} | {"B/px slope": f"{slope:.0f}"})
            rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows


def _switch(choice: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[choice]


def profile(args, device) -> str:
    """torch.profiler's top kernels for the Perceive-IR step (last dtype given, first patch, no compile)."""
    arch = "perceive_ir"
    dtype_name, patch = args.dtypes[-1], args.patches[0]
    _, _, step = setup_step(arch, args, device, patch, DTYPES[dtype_name], args.channels_last == "on", False)
    for _ in range(args.warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(min(args.steps, 5)):
            step()
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    title = f"### Profile: {arch} training step, patch {patch}, batch {args.batch}, {dtype_name}, {device}\n\n"
    return title + "```\n" + prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows) + "\n```"


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--full", action="store_true", help="run the training-step matrix on CPU too (always on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny configs instead of the paper configs")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ALL_ARCHS)
    p.add_argument("--patches", nargs="+", type=int, default=[128, 256])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--channels-last", choices=["off", "on", "both"], default="both")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frozen", action="store_true", help="run the frozen DINOv2 prior net in the step (transformers)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="fp32 rows in true fp32 (default: TF32)")
    p.add_argument("--peak-bf16", type=float, default=H100_PEAKS["bf16"])
    p.add_argument("--peak-tf32", type=float, default=H100_PEAKS["tf32"])
    p.add_argument("--peak-fp32", type=float, default=H100_PEAKS["fp32"])
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top kernels of the Perceive-IR step")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--inference-memory", action="store_true", help="CUDA: activation bytes/pixel of inference")
    p.add_argument("--no-matrix", dest="matrix", action="store_false", help="skip the training-step matrix")
    return p.parse_args(argv)


def header(args, device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"## Restorer benchmark: {name}, torch {torch.__version__}", ""]
    if device.type == "cuda":
        lines.append(
            f"MFU peaks: bf16 {args.peak_bf16 / 1e12:.1f}, tf32 {args.peak_tf32 / 1e12:.1f}, "
            f"fp32 {args.peak_fp32 / 1e12:.1f} TFLOP/s; fp32 rows use {'TF32' if args.tf32 else 'true fp32'}."
        )
    lines.append(f"Frozen prior nets in the step: {'yes (random-init DINOv2)' if args.frozen else 'no'}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    print(header(args, device))
    print(markdown(summary_rows(args, device)) + "\n", flush=True)
    if args.inference_memory and device.type == "cuda":
        print(markdown(inference_memory_rows(args, device)) + "\n", flush=True)
    if args.matrix and (device.type == "cuda" or args.full):
        print_matrix(args, device)
    if args.profile:
        print(profile(args, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

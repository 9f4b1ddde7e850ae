"""The same CPU kernels on every x86-64 machine, so a seeded run gives the same numbers on any machine of a kind.

Each numeric library picks its code at run time by what the CPU offers: AVX-512 where it has it, AVX2 where not,
and the two round differently. A seeded training run amplifies one-ulp differences in its data or its gradients
into a different model: the quickstart's seed-0 dehaze result was 15.67, 14.64 and 14.23 dB on three 2-core x86-64
machines whose Torch kernels alone were pinned (input 14.04). So every library that dispatches is capped at AVX2,
which every x86-64 server of the last decade has:

- Torch's own kernels (``ATEN_CPU_CAPABILITY``), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's matrix
  products, Torch's linear layers and attention (``MKL_CBWR``, MKL's conditional numerical reproducibility);
- NumPy's ufuncs (``NPY_DISABLE_CPU_FEATURES``) and its OpenBLAS (``OPENBLAS_CORETYPE``): synthesis and metrics;
- OpenCV's own dispatched code (``OPENCV_CPU_DISABLE``, set only where the CPU has AVX-512: OpenCV warns about a
  feature the CPU lacks) and its Intel IPP (``OPENCV_IPP``): blur, resize and filtering in synthesis.

The variables are read when each library loads, so they must be in the environment before the first import of
NumPy, OpenCV or Torch: the ``clearair`` command applies them first thing, and Ray workers get them in their
runtime environment (``synth.distribute.WORKER_ENV``). Nothing is set on other architectures, or on an x86-64 CPU
without AVX2. A variable the user has set wins (e.g. ``ATEN_CPU_CAPABILITY=avx512`` for native speed). This module
imports only the standard library, for that reason.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PORTABLE_CPU: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENCV_IPP": "avx2",
}
OPENCV_AVX512 = {"OPENCV_CPU_DISABLE": "AVX512-SKX"}  # the one AVX-512 target of the locked OpenCV build


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def portable_cpu_env() -> dict[str, str]:
    """The variables this machine needs (none off x86-64 or without AVX2), with the values this process's
    environment already sets."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return {}
    flags = _cpu_flags()
    if "avx2" not in flags:
        return {}
    wanted = {**PORTABLE_CPU, **(OPENCV_AVX512 if "avx512f" in flags else {})}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def use_portable_cpu() -> None:
    """Apply :func:`portable_cpu_env` to this process: before NumPy, OpenCV or Torch is first imported."""
    os.environ.update(portable_cpu_env())

"""Every process of a run computes with the same CPU kernels, so machines of one kind give the same figures."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from synth.portable import OPENCV_AVX512, PORTABLE_CPU, portable_cpu_env

REPO = Path(__file__).resolve().parent.parent
X86 = platform.machine() in ("x86_64", "AMD64")


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _capability_of(ray):
    def probe():
        import cv2
        import numpy._core._multiarray_umath as npy
        import torch

        names = {**PORTABLE_CPU, **OPENCV_AVX512}
        env = {k: os.environ[k] for k in names if k in os.environ}
        return env, torch.backends.cpu.get_cpu_capability(), npy.__cpu_features__.get("X86_V4"), cv2.ipp.getIppVersion()

    return ray.get(ray.remote(probe).remote())


def test_ray_workers_run_the_portable_kernels(ray_session):
    env, capability, numpy_avx512, ipp = _capability_of(ray_session)
    assert env == portable_cpu_env()
    if X86 and _has_avx2():
        assert set(PORTABLE_CPU) <= set(env)
        assert capability == "AVX2"  # not AVX512, even where the CPU has it
        assert not numpy_avx512 and "AVX-512" not in ipp, ipp  # NumPy's ufuncs and OpenCV's IPP too


@pytest.mark.skipif(not (X86 and _has_avx2()), reason="the pins name x86-64 kernels; this CPU has no AVX2")
def test_the_cli_pins_its_own_process_before_the_first_tensor_and_keeps_a_users_choice(tmp_path):
    code = (
        "import sys; from workflows.cli import main; "
        "assert not {'numpy', 'cv2', 'torch'} & set(sys.modules), 'loaded before the pins'; "
        "main(['workdir', 'list', '--workdir', sys.argv[1]]); "
        "import torch; print(torch.backends.cpu.get_cpu_capability())"
    )
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU}
    pinned = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=REPO, check=True)  # fmt: skip
    chosen = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={**env, "ATEN_CPU_CAPABILITY": "default"}, cwd=REPO, check=True)  # fmt: skip
    assert pinned.stdout.split()[-1] == "AVX2"
    assert chosen.stdout.split()[-1] == "DEFAULT"

"""Every process of a run computes with the same CPU kernels, so machines of one kind give the same figures."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from synth.distribute import PORTABLE_CPU

REPO = Path(__file__).resolve().parent.parent
X86 = platform.machine() in ("x86_64", "AMD64")


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _capability_of(ray):
    def probe():
        import torch

        return {k: os.environ.get(k) for k in PORTABLE_CPU}, torch.backends.cpu.get_cpu_capability()

    return ray.get(ray.remote(probe).remote())


def test_ray_workers_run_the_portable_kernels(ray_session):
    env, capability = _capability_of(ray_session)
    assert env == PORTABLE_CPU
    if X86 and _has_avx2():
        assert capability == "AVX2"  # not AVX512, even where the CPU has it


@pytest.mark.skipif(not (X86 and _has_avx2()), reason="the pins name x86-64 kernels; this CPU has no AVX2")
def test_the_cli_pins_its_own_process_before_the_first_tensor_and_keeps_a_users_choice(tmp_path):
    code = (
        "import sys; from workflows.cli import main; main(['workdir', 'list', '--workdir', sys.argv[1]]); "
        "import torch; print(torch.backends.cpu.get_cpu_capability())"
    )
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU}
    pinned = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=REPO, check=True)  # fmt: skip
    chosen = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            env={**env, "ATEN_CPU_CAPABILITY": "default"}, cwd=REPO, check=True)  # fmt: skip
    assert pinned.stdout.split()[-1] == "AVX2"
    assert chosen.stdout.split()[-1] == "DEFAULT"

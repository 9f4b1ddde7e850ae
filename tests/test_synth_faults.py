"""A synthesis run killed with SIGKILL mid-way and rerun ends with the shards of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def cli(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "workflows.cli",
        "synth",
        "--source",
        "demo",
        "--recipe",
        "mixed",
        "--seed",
        "3",
        "--samples-per-shard",
        "4",
        "--variants",
        "2",
        "--num-workers",
        "1",
        "--no-progress",
        *args,
    ]


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli("--out", str(killed)), env=env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "state").glob("*-0*.json"))) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every worker
    proc.wait()
    done_before = len(list((killed / "state").glob("*-0*.json")))
    assert 3 <= done_before and not (killed / "manifest.json").exists()
    subprocess.run(cli("--out", str(killed)), env=env, check=True, timeout=600)
    subprocess.run(cli("--out", str(tmp_path / "clean")), env=env, check=True, timeout=600)
    names = sorted(p.name for p in (tmp_path / "clean" / "shards").glob("*.tar"))
    assert names == sorted(p.name for p in (killed / "shards").iterdir())  # no partial file left behind
    for name in names:
        assert (killed / "shards" / name).read_bytes() == (tmp_path / "clean" / "shards" / name).read_bytes(), name

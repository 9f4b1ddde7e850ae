"""Shared fixtures: offline hubs, one local Ray per test session, small real images on disk, a throwaway PostgreSQL."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # the CLI's --tracking-uri default: tests pick their stores themselves

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tests.objectstore import MotoServer  # noqa: E402  (sets the S3 environment before Ray starts)
from tests.servers import REQUIRE_POSTGRES_ENV, PostgresUnavailable, find_postgres, running_postgres  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run several times faster on one thread, and far faster than on two while Ray workers share
    the two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that needs one (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        from synth.distribute import WORKER_ENV

        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": WORKER_ENV},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL on 127.0.0.1 for the session (tests/servers.py). Skipped when this machine has no
    PostgreSQL binaries, unless CLEARAIR_REQUIRE_POSTGRES=1 (set by CI), which turns the skip into a failure."""
    try:
        tools = find_postgres()
    except PostgresUnavailable as err:
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{err} ({REQUIRE_POSTGRES_ENV}=1)", pytrace=False)
        pytest.skip(str(err))
    with running_postgres(tools) as cluster:
        yield cluster


@pytest.fixture
def postgres_uri(postgres_cluster) -> str:
    """``postgresql+psycopg2://clearair:PASSWORD@127.0.0.1:PORT/DB``: a new, empty database for this test."""
    return postgres_cluster.create_database(f"test_{os.urandom(4).hex()}")


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour gradients plus edges, different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(5, 30) + c) * np.cos(y / rng.uniform(5, 30)) for c in range(3)], -1)
    blocks = (rng.random((h // 16 + 1, w // 16 + 1, 3)) > 0.5).repeat(16, 0).repeat(16, 1)[:h, :w]
    return np.clip((base * 0.35 + 0.5 + 0.15 * blocks) * 255, 0, 255).astype(np.uint8)


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A folder of 12 clean PNG/JPEG photos of 160x200, two of them in a nested folder."""
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    for i in range(12):
        folder = root / "nested" if i < 2 else root
        ext = "jpg" if i % 3 == 0 else "png"
        Image.fromarray(textured(160, 200, i)).save(folder / f"img{i:02d}.{ext}", quality=95)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the session (tests/objectstore.py)."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """``s3://clearair-XXXX``: a new, empty bucket on the session's S3 server."""
    return s3_server.new_bucket()

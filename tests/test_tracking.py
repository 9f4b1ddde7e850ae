"""MLflow tracking: lineage read back from a real sqlite store and a real `mlflow server`, metrics that survive an
outage, cross-process nesting, and a registered model that loads without pickle and restores like its export."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from tests.servers import free_port, start_mlflow_server  # noqa: E402
from workflows.provenance import run_tags  # noqa: E402
from workflows.tracking import Tracker, TrackingUnavailable, check_tracking, default_tracking_uri  # noqa: E402
from workflows.tracking.registry import MODEL_CODE_PATH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _git_head() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _history(tracker: Tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module (creating one costs seconds); tests use their own experiments."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture
def workdir(shared_workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The workdir, with the process working directory moved to an empty folder to catch relative writes."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return shared_workdir


def _assert_cwd_untouched() -> None:
    assert sorted(os.listdir(".")) == [], "MLflow wrote into the working directory"


def test_default_tracking_uri_is_absolute_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("rel/work"))
    assert uri == f"sqlite:///{tmp_path.resolve()}/rel/work/mlflow.db"
    assert uri.startswith("sqlite:////")


def test_parent_and_child_runs_read_back(workdir: Path) -> None:
    uri = default_tracking_uri(workdir)
    check_tracking(uri)
    tracker = Tracker(uri, "lineage")
    parent = tracker.start_run("pipeline", tags={"clearair.pipeline": "test"})
    child = tracker.start_run("train", parent_run_id=parent)
    config = {"train": {"lr": 3e-4, "sizes": [1, 2]}, "notes": "x" * 7000}
    tracker.log_params(parent, config)
    for step in range(0, 50, 10):
        tracker.log_metrics(child, {"loss": 1.0 / (step + 1), "psnr": 20.0 + step}, step=step)
    digest = "f" * 64
    tracker.log_dataset(child, "tiers", digest, str(workdir / "manifest.json"), "training", {"samples": 12})
    tracker.log_dict(parent, config, "config.json")
    tracker.end_run(child)
    tracker.end_run(parent)

    client = mlflow.MlflowClient(uri)
    p, c = client.get_run(parent), client.get_run(child)
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert c.info.experiment_id == p.info.experiment_id
    assert (p.info.status, c.info.status) == ("FINISHED", "FINISHED")
    assert p.data.params["train.lr"] == "0.0003" and p.data.params["train.sizes"] == "[1, 2]"
    assert len(p.data.params["notes"]) == 6000 and "truncated 7000 chars" in p.data.params["notes"]
    assert _history(tracker, child, "psnr") == [(s, 20.0 + s) for s in range(0, 50, 10)]
    (inp,) = c.inputs.dataset_inputs
    tags = {t.key: t.value for t in inp.tags}
    assert digest.startswith(inp.dataset.digest) and tags["clearair.digest"] == digest
    assert tags["mlflow.data.context"] == "training"
    for run in (p, c):
        assert run.data.tags["mlflow.source.git.commit"] == _git_head()
        assert run.data.tags["clearair.version.torch"] in {torch.__version__, torch.__version__.split("+")[0]}
    assert p.data.tags["clearair.pipeline"] == "test"
    assert (workdir / "mlartifacts").is_dir() and p.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())
    assert "config.json" in [f.path for f in client.list_artifacts(parent)]
    _assert_cwd_untouched()


def test_run_tags_hold_no_environment_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cr3t-token-value")
    tags = run_tags()
    assert {"mlflow.source.git.commit", "clearair.version.mlflow", "clearair.python", "clearair.host"} <= set(tags)
    assert not any("s3cr3t" in v for v in tags.values())


def test_child_run_from_another_process_is_nested(workdir: Path) -> None:
    uri = default_tracking_uri(workdir)
    tracker = Tracker(uri, "xproc")
    parent = tracker.start_run("pipeline")
    code = (
        "import sys\n"
        "from workflows.tracking import Tracker\n"
        f"t = Tracker({uri!r}, 'xproc')\n"
        f"rid = t.start_run('fold-1', parent_run_id={parent!r})\n"
        "t.log_metrics(rid, {'val_psnr': 25.5}, step=7)\n"
        "t.end_run(rid)\n"
        "print(rid, bool({'lightning', 'pytorch_lightning'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=os.getcwd(), capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    child, lightning_loaded = out.stdout.split()[-2:]
    assert lightning_loaded == "False"  # logging runs does not pay for importing Lightning
    run = tracker.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert _history(tracker, child, "val_psnr") == [(7, 25.5)]
    _assert_cwd_untouched()


def test_metrics_stay_queued_while_the_store_fails(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = Tracker(default_tracking_uri(workdir), "outage", flush_interval_s=0.0)
    run = tracker.start_run("train")
    real = tracker.client.log_batch

    def unavailable(*args, **kwargs):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(tracker.client, "log_batch", unavailable)
    before = int(time.time() * 1000)
    for step in range(5):
        tracker.log_metrics(run, {"loss": float(step)}, step=step)
    logged_until = int(time.time() * 1000)
    assert tracker.flush() == 5
    with pytest.raises(TrackingUnavailable):
        tracker.flush(raise_on_error=True)
    time.sleep(0.05)
    monkeypatch.setattr(tracker.client, "log_batch", real)
    assert tracker.flush() == 0
    history = tracker.client.get_metric_history(run, "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(5)]
    assert all(before <= m.timestamp <= logged_until for m in history)  # original times, not replay times


def test_metrics_refused_for_good_are_dropped_not_replayed(workdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker(default_tracking_uri(workdir), "refused", flush_interval_s=1e9)
    run = tracker.start_run("doomed")
    tracker.client.delete_run(run)
    tracker.log_metrics(run, {"loss": 1.0}, step=0)
    assert tracker.flush() == 0
    assert "refused 1 metrics" in caplog.text
    with pytest.raises(ValueError, match="non-numeric"):
        tracker.log_metrics(run, {"loss": "high"}, step=1)
    with pytest.raises(ValueError, match="invalid metric name"):
        tracker.log_metrics(run, {"loss/../x": 1.0}, step=1)
    assert tracker.pending == 0


def test_check_tracking_fails_fast_and_names_the_uri(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=dead.replace(".", r"\.")):
        check_tracking(dead, timeout=2.0)
    assert time.monotonic() - start < 3.0
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingUnavailable, match="not a writable directory"):
        check_tracking(f"sqlite:///{blocker}/sub/mlflow.db")
    check_tracking(default_tracking_uri(tmp_path / "new" / "work"))  # a workdir still to be created is fine


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clearair.export import export_model
    from clearair.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("restormer", preset="tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return export_model(model, tmp_path_factory.mktemp("export") / "restorer")


def test_registered_model_loads_without_pickle_and_matches_export(
    workdir: Path, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearair.export import load_model

    uri = default_tracking_uri(workdir)
    tracker = Tracker(uri, "models")
    run = tracker.start_run("train")
    with pytest.raises(ValueError, match="reserves"):
        tracker.register_model(run, exported, "clearair-tiny", alias="latest")
    assert tracker.register_model(run, exported, "clearair-tiny", alias="champion") == "1"
    assert str(tracker.client.get_model_version_by_alias("clearair-tiny", "champion").version) == "1"
    logged = [p for p in (workdir / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in logged) and any(p.name == "model_code.py" for p in logged)
    assert not [p for p in logged if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    assert MODEL_CODE_PATH.resolve() == REPO / "workflows" / "model_code.py"  # the package's parent, not the package
    assert MODEL_CODE_PATH.read_text() == next(p for p in logged if p.name == "model_code.py").read_text()

    images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)  # (B, H, W, 3)
    with torch.no_grad():
        x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)  # (B, 3, H, W)
        expected = load_model(exported)(x).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the global registry URI
    served = mlflow.pyfunc.load_model("models:/clearair-tiny@champion").predict(images)
    assert served.shape == images.shape and np.abs(served - expected).max() < 1e-5
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    again = tracker.load_registered_model("clearair-tiny", "champion", dst_path=workdir / "dl")
    assert np.abs(again.predict(images[:1], params={"output": "uint8"}) - np.round(expected[:1] * 255)).max() <= 1

    assert tracker.register_model(run, exported, "clearair-tiny", alias="champion") == "2"
    assert str(tracker.client.get_model_version_by_alias("clearair-tiny", "champion").version) == "2"
    _assert_cwd_untouched()


def test_metrics_callback_logs_from_lightning(workdir: Path) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from workflows.tracking.callback import MetricsCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.net(batch[0]).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self.net(batch[0]).pow(2).mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    tracker = Tracker(default_tracking_uri(workdir), "lightning", flush_interval_s=1e9)
    run = tracker.start_run("train")
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2)
    callback = MetricsCallback(tracker, run, every_n_steps=2)
    assert isinstance(callback, pl.Callback)
    trainer = pl.Trainer(
        max_epochs=2, limit_val_batches=2, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(Tiny(), data, data)
    assert tracker.pending == 0  # flushed at epoch and train end
    train_steps = [s for s, _ in _history(tracker, run, "train_loss")]
    assert train_steps[:4] == [2, 4, 6, 8] and len(train_steps) == len(set(train_steps))
    assert [s for s, _ in _history(tracker, run, "val_loss")] == [8, 16]
    _assert_cwd_untouched()


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "server"
    with start_mlflow_server(default_tracking_uri(root), root / "artifacts") as handle:
        yield handle


def test_against_a_real_server(server, exported: Path, tmp_path: Path) -> None:
    check_tracking(server.uri)
    tracker = Tracker(server.uri, "served")
    parent = tracker.start_run("pipeline")
    child = tracker.start_run("evaluate", parent_run_id=parent)
    tracker.log_metrics(child, {"psnr": 30.0}, step=1)
    tracker.log_dataset(child, "benchmark", "abc123", "s3://bucket/manifest.json", "evaluation")
    tracker.end_run(child)
    assert tracker.register_model(parent, exported, "served-tiny", alias="candidate") == "1"
    tracker.end_run(parent)
    assert _history(tracker, child, "psnr") == [(1, 30.0)]
    assert tracker.client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert tracker.client.get_run(child).inputs.dataset_inputs[0].dataset.source_type == "s3"
    model = tracker.load_registered_model("served-tiny", "candidate", dst_path=tmp_path / "dl")
    assert model.predict(np.zeros((1, 16, 16, 3), np.uint8)).shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_server_outage_loses_no_metrics(tmp_path: Path) -> None:
    root = tmp_path / "server"
    backend, artifacts = default_tracking_uri(root), root / "artifacts"
    server = start_mlflow_server(backend, artifacts)
    try:
        tracker = Tracker(server.uri, "outage")
        run = tracker.start_run("train")
        for step in range(3):
            tracker.log_metrics(run, {"loss": float(step)}, step=step)
        assert tracker.flush() == 0
        server.stop()
        start = time.monotonic()
        for step in range(3, 8):
            tracker.log_metrics(run, {"loss": float(step)}, step=step)
        assert tracker.flush() == 5 and time.monotonic() - start < 5.0  # training is not held up
        server = start_mlflow_server(backend, artifacts, port=server.port)
        assert tracker.close(timeout=30.0) == 0
        assert _history(tracker, run, "loss") == [(s, float(s)) for s in range(8)]
    finally:
        server.stop()

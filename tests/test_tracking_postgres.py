"""The MLflow tracking server on a real PostgreSQL backend store (the cluster deployments' setup), on 127.0.0.1."""

from __future__ import annotations

import pytest
import requests

# PostgreSQL comes from Debian's package, which `.ci/run` installs for the slow run; the default run needs no apt.
pytestmark = pytest.mark.slow


def rows(cluster, dbname: str, query: str) -> list[tuple]:
    conn = cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


def test_throwaway_postgres_listens_on_loopback_and_wants_the_password(postgres_cluster):
    import psycopg2

    settings = dict(
        rows(
            postgres_cluster,
            "postgres",
            "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', 'password_encryption')",
        )
    )
    assert settings == {"listen_addresses": "127.0.0.1", "password_encryption": "scram-sha-256"}
    assert postgres_cluster.password not in repr(postgres_cluster)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host="127.0.0.1",
            port=postgres_cluster.port,
            user=postgres_cluster.user,
            password="wrong",
            dbname="postgres",
            connect_timeout=5,
        )


def test_mlflow_server_on_postgres_as_the_deployments_start_it(postgres_cluster, tmp_path, monkeypatch):
    """The cluster/mlflow launchers' form: ``postgresql+psycopg2://user@host:port/db``, the password in PGPASSWORD."""
    from mlflow import MlflowClient

    from tests.servers import start_mlflow_server

    c, dbname = postgres_cluster, "deploy_form"
    c.create_database(dbname)
    monkeypatch.setenv("PGPASSWORD", c.password)
    backend = f"postgresql+psycopg2://{c.user}@{c.host}:{c.port}/{dbname}"
    with start_mlflow_server(backend, tmp_path / "artifacts") as server:
        assert requests.get(server.uri + "/health", timeout=5).text == "OK"
        experiment_id = MlflowClient(tracking_uri=server.uri).create_experiment("on-postgres")
    assert rows(c, dbname, "SELECT name FROM experiments WHERE experiment_id = " + str(int(experiment_id))) == [
        ("on-postgres",)
    ]


# The tiny pipeline logging through a PostgreSQL-backed server (with its workdir and artifacts in a bucket) is
# tests/test_storage.py::test_tiny_pipeline_on_a_bucket_tracked_by_a_postgres_backed_server.

"""An S3-compatible object store for tests: moto's standalone server on 127.0.0.1, one per test session.

Importing this module (conftest does, first thing) points every S3 client of the session at that server: the
endpoint, throwaway credentials and a region go into the environment before any Ray worker or subprocess
starts, so those inherit them, and no test can reach a real bucket. The server itself starts on first use.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}",
    "AWS_ACCESS_KEY_ID": "clearair-test",
    "AWS_SECRET_ACCESS_KEY": "clearair-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
os.environ.update(ENV)
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL"):
    os.environ.pop(var, None)


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1:PORT; :meth:`new_bucket` makes an empty bucket per test."""

    def __init__(self) -> None:
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(PORT)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(ENV["AWS_ENDPOINT_URL"], timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; log: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def new_bucket(self) -> str:
        import boto3

        name = f"clearair-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

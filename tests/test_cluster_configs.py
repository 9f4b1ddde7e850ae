"""cluster/: every launch config parses, carries what its launcher needs, runs only commands that exist
(clearair, ray start, mlflow server), keeps secrets and open dashboards out, and the SLURM Ray bring-up
really starts and stops a token-authenticated Ray on this machine."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
BRINGUP = CLUSTER / "slurm" / "ray-bringup.sh"
SBATCH = CLUSTER / "slurm" / "clearair.sbatch"
RAY_UP = sorted((CLUSTER / "ray-up").glob("*.yaml"))
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
SHELL_FILES = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")])
TEXT_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
CLI_CONTRACT = {"run", "synth", "doctor"}  # the subcommands the configs may call
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict:
    return next(d for d in load_docs(path) if d.get("kind") == name)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------- command extraction


def command_text(path: Path) -> str:
    """The file as command lines: comment markers dropped (usage examples count too), continuations joined."""
    lines = [line.strip().lstrip("#").strip() for line in path.read_text().splitlines()]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def shell_defaults(text: str) -> dict[str, str]:
    """NAME=${NAME:-default} and NAME=${1:-default} assignments, so commands can be parsed with real values."""
    out = {}
    for name, default in re.findall(r"^(\w+)=\$\{\w+:-([^}\n]*)\}", text, flags=re.M):
        out[name] = default
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """Substitute $VAR / ${VAR} / ${VAR:-x} as a shell would, with a placeholder for unknown variables."""
    text = text.replace('"$@"', "")

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return expand(env[name], env)
        return expand(m.group(2), env) if m.group(2) is not None else "1"

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", sub, text)


def looks_like_a_subcommand(word: str) -> bool:
    """A real subcommand, or a word close enough to one to be a misspelling of it (`rnu`, `dcotor`); prose such
    as "clearair installed" is not."""
    names = CLI_CONTRACT | set(cli_subcommands())
    return word in names or bool(difflib.get_close_matches(word, names, n=1, cutoff=0.6))


def clearair_commands(path: Path) -> list[list[str]]:
    """Every `clearair SUBCOMMAND ...` invocation in a file (misspelt ones too), as argv without the program."""
    text = command_text(path)
    env = shell_defaults(text)
    found = []
    for m in re.finditer(r"(?:^|(?<=[\s;&|(/]))clearair[ \t]+([a-z][\w-]*)[^\n;&|)><`]*", text, flags=re.M):
        if looks_like_a_subcommand(m.group(1)):
            found.append(shlex.split(expand(m.group(0), env))[1:])
    return found


@functools.cache
def cli_subcommands() -> dict[str, argparse.ArgumentParser]:
    from workflows.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


ALL_CLEARAIR = [(rel(p), argv) for p in TEXT_FILES for argv in clearair_commands(p)]


def test_configs_call_the_pipeline() -> None:
    """The launchers that run the pipeline do call `clearair run` (the parse test below is not vacuous)."""
    callers = {path for path, argv in ALL_CLEARAIR if argv[0] == "run"}
    assert {"cluster/slurm/clearair.sbatch", "cluster/kuberay/rayjob.yaml", "cluster/runtime_env.yaml"} <= callers


@pytest.mark.parametrize(("path", "argv"), ALL_CLEARAIR, ids=[f"{p}:{' '.join(a[:2])}" for p, a in ALL_CLEARAIR])
def test_clearair_command_parses(path: str, argv: list[str]) -> None:
    """Each `clearair ...` line in cluster/ is accepted by the real CLI parser."""
    from workflows.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{path}: `clearair {shlex.join(argv)}` does not parse (exit {exc.code}): {err.getvalue()}")


def test_a_misspelt_subcommand_in_a_launcher_is_caught(tmp_path: Path) -> None:
    launcher = tmp_path / "job.sh"
    launcher.write_text("# clearair installed on every node\nsrun clearair rnu quickstart --workdir /shared/w\n")
    (argv,) = clearair_commands(launcher)
    assert argv == ["rnu", "quickstart", "--workdir", "/shared/w"]
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_clearair_command_parses(str(launcher), argv)


# ----------------------------------------------------------------------------------------------- ray start


def parse_ray_start(args: list[str]) -> dict:
    """Validate `ray start` options with Ray's own CLI definition (nothing is started)."""
    from ray.scripts.scripts import start

    return start.make_context("start", args).params


def ray_up_start_commands(cfg: dict) -> list[tuple[str, str]]:
    return [(key, cmd) for key in ("head_start_ray_commands", "worker_start_ray_commands") for cmd in cfg[key]]


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_start_commands_use_token_auth_and_loopback_dashboard(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    starts = [(key, cmd) for key, cmd in ray_up_start_commands(cfg) if "ray start" in cmd]
    assert {key for key, _ in starts} == {"head_start_ray_commands", "worker_start_ray_commands"}
    for key, cmd in starts:
        # Each launcher command runs in a fresh shell: the mode must be set in the same command.
        assert "RAY_AUTH_MODE=token" in cmd.split("ray start")[0], f"{key}: {cmd}"
        args = shlex.split(cmd.split("ray start", 1)[1].replace("$RAY_HEAD_IP", "10.0.0.1"))
        params = parse_ray_start(args)
        if params["head"]:
            assert params["dashboard_host"] in LOOPBACK
            assert params["num_gpus"] == 0
        else:
            assert params["address"] == "10.0.0.1:6379"


def test_bringup_starts_ray_only_with_token_auth() -> None:
    """Every `ray start` of the SLURM scripts inherits the exported token mode; none calls `ray stop`."""
    for path in SHELL_FILES:
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"\bray stop\b", text), f"{rel(path)} would stop every Ray of the user"
        starts = [i for i, line in enumerate(text.splitlines()) if re.search(r"\bray start\b", line)]
        if starts:
            exports = [i for i, line in enumerate(text.splitlines()) if "export RAY_AUTH_MODE=token" in line]
            assert exports and min(exports) < min(starts), rel(path)


def test_no_dashboard_binds_beyond_loopback() -> None:
    pattern = re.compile(r"dashboard[-_]host[\"']?\s*[=: ]\s*[\"']?([\w.:\[\]]+)")
    for path in TEXT_FILES:
        for value in pattern.findall(path.read_text()):
            assert value in LOOPBACK, f"{rel(path)} binds a dashboard to {value}"


# --------------------------------------------------------------------------------------------- files parse


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    assert load_docs(path), rel(path)


@pytest.mark.parametrize("path", SHELL_FILES, ids=rel)
def test_shell_syntax(path: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------- ray up


@pytest.mark.parametrize("path", RAY_UP, ids=lambda p: p.name)
def test_ray_up_config(path: Path) -> None:
    import jsonschema
    import ray.autoscaler

    cfg = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    for field in ("cluster_name", "available_node_types", "head_node_type", "setup_commands"):
        assert cfg[field], field
    assert cfg["provider"]["type"] in {"aws", "gcp"}
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU") == 0  # a CPU head
    gpu_types = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types)  # autoscaled
    assert any("clearair" in cmd and "pip install" in cmd for cmd in cfg["setup_commands"])
    assert "~/.ray/auth_token" in cfg["file_mounts"]  # the token reaches every node
    assert any("/shared" in cmd and "mount" in cmd for cmd in cfg["setup_commands"])
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key, []):
            proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert proc.returncode == 0, f"{key}: {cmd}\n{proc.stderr}"


# ---------------------------------------------------------------------------------------------- KubeRay


def ray_groups(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    return groups + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def token_from_secret(env: dict[str, dict]) -> bool:
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    return mode == "token" and "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {})


def check_ray_cluster_spec(spec: dict) -> None:
    """Token auth on every Ray container, a GPU worker group, the shared RWX volume at /shared everywhere."""
    manual_auth = "authOptions" not in spec
    if manual_auth:
        assert token_from_secret(env_map(spec["autoscalerOptions"])), "autoscaler sidecar lacks the token"
    else:
        assert spec["authOptions"]["mode"] == "token"
    gpu_groups = set()
    for name, group in ray_groups(spec):
        params = {k: str(v) for k, v in group["rayStartParams"].items()}
        parse_ray_start([f"--{k}={v}" for k, v in params.items()])
        if manual_auth and name == "head":  # with authOptions the operator must reach it: KubeRay's default bind
            assert params["dashboard-host"] in LOOPBACK
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if v.get("persistentVolumeClaim")
        }
        for container in pod["containers"]:
            if manual_auth:
                assert token_from_secret(env_map(container)), f"{name}/{container['name']}"
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get("/shared")) == "clearair-shared", f"{name}: no shared volume"
            gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
            if name == "head":
                assert gpus == 0 and params["num-gpus"] == "0"
            elif gpus:
                gpu_groups.add(name)
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"


def test_kuberay_raycluster() -> None:
    path = CLUSTER / "kuberay" / "raycluster.yaml"
    cluster = kind(path, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    check_ray_cluster_spec(cluster["spec"])
    pvc = kind(path, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "clearair-shared" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_s3_settings_come_only_from_an_optional_secret() -> None:
    """An s3:// workdir needs the AWS settings on every node, never as literals, and a volume-only setup must still
    start without the Secret."""
    for path, name in (
        (CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster"),
        (CLUSTER / "kuberay" / "rayjob.yaml", "RayJob"),
    ):
        spec = kind(path, name)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                aws = [e for e in container.get("env", []) if e["name"].startswith("AWS_")]
                names = {e["name"] for e in aws}
                assert names == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
                for e in aws:
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert "value" not in e and ref["name"] == "clearair-s3" and ref["optional"] is True


def test_kuberay_rayjob() -> None:
    job = kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("clearair run ")
    assert "--workdir /shared/" in spec["entrypoint"] and "--tracking-uri http://mlflow:5000" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_ray_versions_match_the_installed_ray() -> None:
    """Image tag, rayVersion and the ray-up pin all name the Ray the client uses (mismatched Rays cannot talk)."""
    import ray

    version = ray.__version__
    for path in (CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "kuberay" / "rayjob.yaml"):
        for doc in load_docs(path):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            if doc["kind"] in {"RayCluster", "RayJob"}:
                assert spec["rayVersion"] == version, rel(path)
    assert f"rayproject/ray:{version}-" in (CLUSTER / "image" / "Dockerfile").read_text()
    for path in RAY_UP:
        pins = re.findall(r"ray\[[\w,]+\]==([\w.]+)", path.read_text())
        assert pins and set(pins) == {version}, rel(path)


# ------------------------------------------------------------------------------------------------ MLflow


def parse_mlflow_server(args: list[str]) -> dict:
    """Validate `mlflow server` options with MLflow's own CLI definition (nothing is started)."""
    from mlflow.cli import server

    return server.make_context("server", args).params


def check_tracking_server(params: dict) -> None:
    assert params["backend_store_uri"].startswith("postgresql")
    assert params["artifacts_destination"].startswith("s3://") and params["serve_artifacts"]
    # Behind authentication: the basic-auth app itself, or loopback only behind the TLS proxy.
    assert params["app_name"] == "basic-auth" or params["host"] in LOOPBACK


def test_mlflow_kubernetes_deployment() -> None:
    path = CLUSTER / "mlflow" / "k8s" / "mlflow.yaml"
    container = kind(path, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "server"
    params = parse_mlflow_server(container["args"][1:])
    check_tracking_server(params)
    assert params["app_name"] == "basic-auth"
    env = env_map(container)
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    ini = kind(path, "ConfigMap")["data"]["basic_auth.ini"]
    assert re.search(r"database_uri = postgresql\S*://\w+@", ini) and "admin_password" not in ini
    assert kind(path, "Service")["spec"]["type"] == "ClusterIP"
    postgres = kind(CLUSTER / "mlflow" / "k8s" / "postgres.yaml", "StatefulSet")
    pg_env = env_map(postgres["spec"]["template"]["spec"]["containers"][0])
    assert "secretKeyRef" in pg_env["POSTGRES_PASSWORD"]["valueFrom"]


def test_mlflow_vm_launcher(tmp_path: Path) -> None:
    """The VM launcher binds loopback, keeps secrets out of argv and its config file, and refuses to start
    without them."""
    script = CLUSTER / "mlflow" / "vm" / "mlflow-server.sh"
    secrets = {"PGPASSWORD": "pg-pass-must-not-leak", "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-must-not-leak"}
    env = {"PATH": os.environ["PATH"], "MLFLOW_RUN_DIR": str(tmp_path / "run"), **secrets}
    out = subprocess.run(["bash", str(script), "--print"], env=env, capture_output=True, text=True, check=True).stdout
    argv = shlex.split(out)
    assert argv[:2] == ["mlflow", "server"]
    params = parse_mlflow_server(argv[2:])
    check_tracking_server(params)
    assert params["host"] == "127.0.0.1" and params["app_name"] == "basic-auth"
    ini = tmp_path / "run" / "basic_auth.ini"
    assert ini.stat().st_mode & 0o777 == 0o600
    assert "postgresql" in ini.read_text()
    for value in secrets.values():
        assert value not in out and value not in ini.read_text()
    del env["PGPASSWORD"]
    refused = subprocess.run(["bash", str(script), "--print"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "PGPASSWORD" in refused.stderr


# ------------------------------------------------------------------------------------------------ secrets

SECRET_ASSIGNMENT = re.compile(
    r"(password|passwd|secret[_-]key|auth[_-]token|secret[_-]access[_-]key)[\"']?[ \t]*[=:][ \t]*[\"']?([^\s\"'},;)]*)",
    re.I,
)
CREDENTIAL_URI = re.compile(r"\w+://[^/\s:@]+:[^/\s@]+@")


def secret_literals(text: str) -> list[str]:
    """Credential-looking literal values: not empty, not a $-expansion, path or REPLACE_ME placeholder."""
    hits = [m.group(0) for m in CREDENTIAL_URI.finditer(text)]
    for m in SECRET_ASSIGNMENT.finditer(text):
        value = m.group(2)
        if len(value) >= 8 and not value.startswith(("$", "~", "/", "<")) and "REPLACE_ME" not in value:
            hits.append(m.group(0))
    return hits


def test_secret_detector_catches_literals() -> None:
    assert secret_literals("PGPASSWORD=hunter2hunter2")
    assert secret_literals("uri: postgresql://mlflow:hunter2@db:5432/mlflow")
    assert secret_literals('  "auth_token": "0123456789abcdef"')
    assert not secret_literals('PGPASSWORD=\nMLFLOW_TRACKING_PASSWORD="$(cat f)"\nauth_token=REPLACE_ME_TOKEN')


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_no_hard_coded_secrets(path: Path) -> None:
    assert not secret_literals(path.read_text())
    for doc in load_docs(path) if path.suffix == ".yaml" else []:
        assert not (doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData"))), rel(path)
        for container in _containers(doc):
            for name, entry in env_map(container).items():
                if re.search(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", name):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), f"{rel(path)}: {name}"


def _containers(node: object) -> list[dict]:
    """Every dict with `env` under a manifest (containers, autoscaler options), found recursively."""
    if isinstance(node, dict):
        found = [node] if isinstance(node.get("env"), list) else []
        return found + [c for v in node.values() for c in _containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    return []


def test_runtime_env() -> None:
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env = RuntimeEnv(**data)
    assert any(p.startswith("clearair @ ") for p in runtime_env.pip_config()["packages"])
    assert not [k for k in runtime_env.env_vars() if re.search(r"PASSWORD|TOKEN|SECRET|KEY", k)]


# ------------------------------------------------------------------------------------- SLURM bring-up


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def slurm_env(tmp_path: Path, temp_dir: str, nodelist: str, nnodes: int) -> dict[str, str]:
    """SLURM's variables as sbatch would set them, plus small per-node resources and free ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_", "CLEARAIR_RAY_"))}
    gcs, dashboard, client = free_ports(3)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID=f"pytest{os.getpid()}",
        SLURM_JOB_NODELIST=nodelist,
        SLURM_NNODES=str(nnodes),
        SLURM_SUBMIT_DIR=str(ROOT),
        RAY_AUTH_TOKEN_PATH=str(tmp_path / "home" / ".ray" / "auth_token"),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",
        CLEARAIR_RAY_PORT=str(gcs),
        CLEARAIR_RAY_DASHBOARD_PORT=str(dashboard),
        CLEARAIR_RAY_CLIENT_PORT=str(client),
        CLEARAIR_RAY_NUM_CPUS="1",
        CLEARAIR_RAY_MEMORY=str(1 << 30),
        CLEARAIR_RAY_OBJECT_STORE_MEMORY=str(100 << 20),
        CLEARAIR_RAY_TEMP_DIR=temp_dir,
        CLEARAIR_RAY_STATE_DIR=str(tmp_path / "state"),
        CLEARAIR_RAY_START_TIMEOUT="120",
    )
    return env


def processes_using(temp_dir: str) -> list[int]:
    """PIDs of live processes whose command line mentions temp_dir (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


@pytest.fixture
def ray_temp_dir():
    """A short per-test Ray temp dir (socket paths are length-limited); anything left using it is killed."""
    path = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield path
    for pid in processes_using(path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def decoy_raylet(tmp_path: Path):
    """A process named `raylet`: `ray stop` would kill it, stopping only our own Ray must not."""
    exe = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "600"])
    yield proc
    proc.kill()
    proc.wait()


def fake_clearair(directory: Path, exit_code: int) -> None:
    """A `clearair` that records how the sbatch called it and what the cluster looked like from the driver."""
    directory.mkdir()
    (directory / "clearair").write_text(
        "#!/bin/bash\n"
        'out=$CLEARAIR_SHARED/driver\nmkdir -p "$out"\n'
        'printf "%s\\n" "$@" > "$out/argv"\n'
        'echo "$RAY_AUTH_MODE" > "$out/auth_mode"\n'
        'ray status --address "$CLEARAIR_RAY_HEAD_ADDRESS" > "$out/status" 2>&1\n'
        'RAY_AUTH_MODE=disabled timeout 60 ray status --address "$CLEARAIR_RAY_HEAD_ADDRESS" >/dev/null 2>&1\n'
        'echo $? > "$out/unauthenticated_rc"\n'
        'pgrep -f -- "$CLEARAIR_RAY_TEMP_DIR" > "$out/pids"\n'
        f"exit {exit_code}\n"
    )
    (directory / "clearair").chmod(0o755)


def run_script(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def active_nodes(status: str) -> int:
    block = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(int(line.split()[0]) for line in block.splitlines() if line.strip()[:1].isdigit())


@pytest.mark.slow
def test_sbatch_on_one_machine(tmp_path: Path, ray_temp_dir: str, decoy_raylet: subprocess.Popen) -> None:
    """clearair.sbatch with SLURM's variables set by hand and no srun: a real token-authenticated Ray head on
    127.0.0.1, the driver pointed at it, the job's exit status kept, and exactly that Ray stopped afterwards."""
    env = slurm_env(tmp_path, ray_temp_dir, "localhost", 1)
    fake_clearair(tmp_path / "bin", exit_code=3)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"
    env.update(CLEARAIR_SHARED=str(tmp_path / "shared"), MLFLOW_TRACKING_URI="http://127.0.0.1:5999")
    proc = run_script([str(SBATCH), "quickstart", "--set", "synth.max_samples=8"], env, tmp_path)
    driver = tmp_path / "shared" / "driver"
    assert proc.returncode == 3, proc.stderr  # the pipeline's failure is the job's failure
    head = f"127.0.0.1:{env['CLEARAIR_RAY_PORT']}"
    workdir = str(tmp_path / "shared" / "runs" / "quickstart")
    expected = f"run quickstart --ray-address {head} --workdir {workdir} --tracking-uri http://127.0.0.1:5999"
    assert (driver / "argv").read_text().split() == [*expected.split(), "--set", "synth.max_samples=8"]
    assert (driver / "auth_mode").read_text().strip() == "token"
    assert active_nodes((driver / "status").read_text()) == 1
    assert (driver / "unauthenticated_rc").read_text().strip() != "0"  # the head enforces the token
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    started = [int(p) for p in (driver / "pids").read_text().split()]
    assert started, "no Ray process used the job's temp dir"
    assert processes_using(ray_temp_dir) == []  # torn down
    assert decoy_raylet.poll() is None  # and nothing else


@pytest.mark.slow
def test_bringup_two_nodes_through_srun(tmp_path: Path, ray_temp_dir: str) -> None:
    """Two 'nodes' of one machine started through an srun stand-in: the worker joins with the shared token,
    tasks run on both nodes, and the workers then the head are stopped."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = slurm_env(tmp_path, ray_temp_dir, "localhost,localhost", 2)
    env.update(PATH=f"{srun.parent}{os.pathsep}{env['PATH']}", CLEARAIR_RAY_HEAD_IP="127.0.0.1")
    probe = (
        "import json, ray\n"
        "ray.init(log_to_driver=False)\n"
        "ctx = ray.get_runtime_context\n"
        "node = ray.remote(num_cpus=1)(lambda: __import__('time').sleep(1) or ctx().get_node_id())\n"
        "alive = [n for n in ray.nodes() if n['Alive']]\n"
        "print(json.dumps({'alive': len(alive), 'used': len(set(ray.get([node.remote() for _ in range(4)])))}))\n"
    )
    proc = run_script([str(BRINGUP), sys.executable, "-c", probe], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"alive": 2, "used": 2}
    assert "stopping 1 Ray worker(s)" in proc.stderr and "stopping the Ray head" in proc.stderr
    assert processes_using(ray_temp_dir) == []


def test_bringup_refuses_unreachable_nodes_before_starting(tmp_path: Path, ray_temp_dir: str) -> None:
    """Without srun, a node list naming another machine fails at once, before any Ray is started."""
    env = slurm_env(tmp_path, ray_temp_dir, "localhost,gpu-node-7", 2)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "srun").exists())
    proc = subprocess.run(["bash", str(BRINGUP), "true"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "gpu-node-7" in proc.stderr
    assert not (tmp_path / "state" / "head.pid").exists() and processes_using(ray_temp_dir) == []


def test_bringup_requires_slurm_variables(tmp_path: Path, ray_temp_dir: str) -> None:
    env = slurm_env(tmp_path, ray_temp_dir, "localhost", 1)
    del env["SLURM_JOB_NODELIST"]
    proc = subprocess.run(["bash", str(BRINGUP), "true"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "SLURM_JOB_NODELIST" in proc.stderr


def test_token_created_once_with_private_mode(tmp_path: Path) -> None:
    token = tmp_path / "home" / ".ray" / "auth_token"
    script = f"source {shlex.quote(str(BRINGUP))}; ray_token_init && echo $RAY_AUTH_MODE"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "RAY_AUTH_TOKEN_PATH": str(token)}
    first = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    value = token.read_text()
    assert first.stdout.strip() == "token" and re.fullmatch(r"[0-9a-f]{64}", value)
    assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
    subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert token.read_text() == value  # generated once, reused by later jobs

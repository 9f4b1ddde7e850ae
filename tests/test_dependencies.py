"""Everything the code imports is declared (pyproject) and pinned (constraints.txt, the lock the README uses).

Imports are read from the source with ``ast`` (those inside functions too), mapped to the distributions that
provide them through the installed metadata, and checked against the requirements of the installed clearair
distribution (its ``Requires-Dist``, written from pyproject.toml at install time) and the lock.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

import clearair

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
OURS = {"synth", "clearair", "workflows", "tests", "benchmarks"}
RUNTIME_CODE = ("synth", "clearair", "workflows", "benchmarks")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(folder: str) -> dict[str, str]:
    """Top-level third-party module -> one file importing it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        local = {p.stem for p in path.parent.glob("*.py")}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS and top not in local:
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def _declared() -> tuple[set[str], set[str]]:
    """(runtime, dev-extra) distribution names required by the installed clearair."""
    runtime, dev = set(), set()
    for req in md.requires("clearair") or []:
        name = _canonical(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
        (dev if 'extra == "dev"' in req else runtime).add(name)
    return runtime, dev


def _locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt pins exact versions, got {line!r}"
            pins[_canonical(name.split("[")[0])] = version
    return pins


def _distributions(module: str) -> set[str]:
    return {_canonical(d) for d in md.packages_distributions().get(module, [])}


def test_the_installed_clearair_is_this_checkout() -> None:
    assert md.version("clearair") == clearair.__version__, "reinstall: pip install -c constraints.txt -e '.[dev]'"


@pytest.mark.parametrize("folder", [*RUNTIME_CODE, "tests"])
def test_every_import_is_declared_and_locked(folder: str) -> None:
    runtime, dev = _declared()
    allowed = runtime | (dev if folder == "tests" else set())
    locked = _locked()
    problems = []
    for module, where in sorted(_imported_modules(folder).items()):
        dists = _distributions(module)
        if not dists:
            problems.append(f"{module} (imported in {where}) is provided by no installed distribution")
        elif not dists & allowed:
            problems.append(f"{module} (in {where}) comes from {sorted(dists)}, not declared in pyproject.toml")
        elif not dists & set(locked):
            problems.append(f"{module} (in {where}) comes from {sorted(dists)}, not pinned in constraints.txt")
    assert not problems, "\n".join(problems)


def test_every_declared_requirement_is_locked_at_the_installed_version() -> None:
    runtime, dev = _declared()
    locked = _locked()
    missing = sorted((runtime | dev) - set(locked))
    assert not missing, f"declared but not in constraints.txt: {missing}"
    drift = {n: (locked[n], md.version(n)) for n in runtime | dev if md.version(n) != locked[n]}
    assert not drift, f"installed versions differ from the lock (lock, installed): {drift}"


def test_version_names_the_package_and_the_commit(capsys: pytest.CaptureFixture) -> None:
    import subprocess

    from workflows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"clearair {clearair.__version__} (commit {head}")


def test_stage_results_record_version_and_commit() -> None:
    from workflows.context import StageResult
    from workflows.provenance import commit, stamp

    result = StageResult("synth", "k" * 64, {}, **stamp())
    assert result.to_json()["clearair_version"] == clearair.__version__ and result.to_json()["commit"] == commit()
    old = {"stage": "synth", "key": "k", "outputs": {}, "metrics": {}, "run_id": None, "skipped": None, "seconds": 1}
    assert StageResult(**old).commit is None  # a result.json written by 0.1.0 still reads


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]


def test_synth_imports_neither_the_model_library_nor_the_workflows() -> None:
    """The layers: synth (formats, storage, synthesis) stands alone, so a synthesis driver or worker never loads
    torch, and the model library never reaches up into workflows. Checked in a fresh interpreter."""
    import subprocess

    synth_modules = sorted(f"synth.{p.stem}" for p in (REPO / "synth").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {synth_modules!r}: importlib.import_module(m)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'clearair', 'workflows', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
    upward = {  # imports inside functions too, which importing the modules does not run
        f"{path.relative_to(REPO)}:{node.lineno}"
        for layer, above in (("synth", ("clearair", "workflows")), ("clearair", ("workflows",)))
        for path in (REPO / layer).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(name.split(".")[0] in above for name in _imported(node))
    }
    assert not upward, sorted(upward)
    code = (
        "import clearair, clearair.models.factory, sys\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'workflows', 'cv2', 'PIL', 'ray', 'mlflow'}))"
    )  # the public model library: Torch, no image I/O, no workflows
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


# Imports sit at a module's top, with one exception, for start-up time: a heavy library (Torch, Ray, MLflow,
# Lightning, transformers, open_clip, ...) may be imported inside the function that needs it, so a Ray worker that
# runs a task does not load what the task never uses. The light modules below (the CLI's entry points, the records
# and contexts the driver passes around, the Ray Train loop, synthesis) must not load Torch on import, so that
# `clearair --help` and a synthesis worker start fast: they alone may import our own model library lazily too.
HEAVY = {"torch", "torchvision", "ray", "lightning", "mlflow", "transformers", "open_clip", "huggingface_hub",
         "safetensors", "albumentations", "cv2", "PIL", "skimage", "scipy", "pyarrow", "webdataset"}  # fmt: skip
LIGHT = ("synth", "workflows.cli", "workflows.commands", "workflows.context", "workflows.faults",
         "workflows.records", "workflows.stages.common", "workflows.training")  # fmt: skip
# Our modules that bring a heavy library of their own (MLflow, Lightning, albumentations, OpenCV): lazy anywhere.
HEAVY_OURS = ("workflows.tracking", "workflows.progress", "clearair.lightning", "synth.degradations.albu",
              "synth.imageio")  # fmt: skip


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _lazy_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function of ``path``."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    found += [(node.lineno, name) for name in _imported(node)]
    return sorted(set(found))


def test_imports_sit_at_the_top_except_heavy_libraries() -> None:
    """A light module may import any of ours lazily (synthesis modules bring NumPy, which the CLI pins first)."""
    misplaced = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for layer in ("synth", "clearair", "workflows")
        for path in sorted((REPO / layer).rglob("*.py"))
        for line, name in _lazy_imports(path)
        if name.split(".")[0] not in HEAVY
        and not _within(name, HEAVY_OURS)
        and not (_within(_module(path), LIGHT) and _within(name, ("clearair", "synth", "workflows")))
    ]
    assert not misplaced, "\n".join(misplaced)


def test_the_light_modules_load_no_torch() -> None:
    """What `clearair --help`, the driver's records and a synthesis worker import stays free of Torch."""
    import subprocess

    light = sorted(
        m for layer in ("synth", "workflows") for p in (REPO / layer).rglob("*.py")
        if _within(m := _module(p), LIGHT) and not _within(m, HEAVY_OURS)
    )  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for m in {light!r}: importlib.import_module(m)\n"
        "from workflows.cli import build_parser; build_parser()\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'clearair', 'ray', 'mlflow', 'lightning'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def _top_level_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports when it is imported (module body, outside ``if TYPE_CHECKING``)."""
    modules = {_module(p): p for layer in ("synth", "clearair", "workflows") for p in (REPO / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = submodules or [node.module]  # `from package import module` needs the module only
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycles() -> None:
    graph, state, cycles = _top_level_graph(), {}, []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [module, nxt]))
            elif nxt not in state:
                visit(nxt, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert len(graph) > 50 and not cycles, cycles

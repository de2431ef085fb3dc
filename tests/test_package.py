"""The package as users import it: one `edgesmith` namespace, imports that go one way, small files, and the Python API
working from any folder (a user's own `models/` package included)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

FOLDERS = ("pipeline", "models", "targets", "benchmarks")
# What each sub-package may import of edgesmith (the leaf modules edgesmith.errors and edgesmith.config_files are
# open to all). The pipeline uses the rest; nothing uses the pipeline back.
ALLOWED = {"pipeline": {"pipeline", "models", "targets", "benchmarks"}, "models": {"models"},
           "targets": {"targets", "models"}, "benchmarks": {"benchmarks", "targets"}}
LEAVES = {"edgesmith", "edgesmith.errors", "edgesmith.config_files"}
# The only files that may import the toolchains: their backends, and the standalone scripts that ship in bundles and
# run on the device (never imported by edgesmith for their toolchain parts).
TOOLCHAIN_FILES = {"tvm": {"targets/backends/tvm.py", "targets/bundle_files/edgesmith_runtime.py",
                           "targets/bundle_files/edgesmith_rpc.py"},
                   "tensorrt": {"targets/backends/tensorrt.py", "targets/bundle_files/build_tensorrt_engine.py",
                                "targets/bundle_files/edgesmith_runtime.py"}}
MAX_LINES = 400


def source_files():
    for folder in (*FOLDERS, "edgesmith"):
        yield from sorted((REPO / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "edgesmith"}
    return found


def test_imports_go_one_way_and_toolchains_stay_in_their_backends():
    wrong = []
    for path in source_files():
        relative = path.relative_to(REPO).as_posix()
        folder = relative.split("/")[0]
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in FOLDERS:
                wrong.append(f"{relative}: bare '{module}' (import edgesmith.{module})")
            elif top == "edgesmith" and folder in ALLOWED and module not in LEAVES:
                sub = module.split(".")[1]
                if sub in FOLDERS and sub not in ALLOWED[folder]:
                    wrong.append(f"{relative} imports {module}")
            elif top in TOOLCHAIN_FILES and relative not in TOOLCHAIN_FILES[top]:
                wrong.append(f"{relative} imports {top}")
    assert wrong == []


def test_every_source_file_stays_small():
    long = {p.relative_to(REPO).as_posix(): n for p in source_files() if (n := len(p.read_text().splitlines()))
            > MAX_LINES}
    assert long == {}


def test_pyproject_names_every_package_folder():
    tomllib = pytest.importorskip("tomllib")   # Python ≥ 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {f"edgesmith.{init.parent.relative_to(REPO).as_posix().replace('/', '.')}"
               for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert folders | {"edgesmith"} == set(config["packages"])
    assert {f"edgesmith.{f}": f for f in FOLDERS} == config["package-dir"]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generic_top_level_names_are_not_installed(tmp_path):
    for name in FOLDERS:
        done = run_python(f"import {name}", tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, name


def test_the_api_works_beside_a_users_own_models_package(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user models package was imported')\n")
    code = ("import edgesmith, sys\n"
            "fields = {'name': 'api', 'model': {'name': 'mnist_cnn'}, 'data': {'name': 'digits'}}\n"
            "recipe = edgesmith.load_recipe(fields, ['stages=[]', 'targets=[x86-host]'])\n"
            "print(recipe.name, edgesmith.load_profile('x86-host').name, edgesmith.default_cache_dir().name)\n"
            "try:\n    edgesmith.load_recipe(None, ['stages.0.epochs=-1'])\n"
            "except edgesmith.EdgesmithError as exc:\n    print('error:', exc)\n")
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "api x86-host edgesmith"
    assert "stages.0.epochs" in done.stdout
    cli = subprocess.run([sys.executable, "-m", "edgesmith", "models"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert cli.returncode == 0 and "mnist_cnn" in cli.stdout, cli.stderr


def test_importing_edgesmith_loads_no_heavy_dependency(tmp_path):
    done = run_python("import sys, edgesmith; print(sorted(m for m in ('torch', 'onnx', 'tvm') if m in sys.modules))",
                      tmp_path)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("name", ["load_recipe", "run", "evaluate", "load_profile", "default_cache_dir"])
def test_api_functions_are_documented(name):
    import edgesmith

    assert callable(getattr(edgesmith, name)) and getattr(edgesmith, name).__doc__

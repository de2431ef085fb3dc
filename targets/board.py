"""An emulated aarch64 board: a private sysroot of Debian arm64 packages (Python 3.11 and the C/C++ runtime) plus the
aarch64 wheels of TVM and ONNX Runtime, run under qemu-user. Nothing is installed system-wide: apt works on private
state and cache folders inside the board, packages are unpacked with `dpkg -x`, wheels go into a private site folder.

It answers "does the cross-compiled artifact load and compute the right numbers on aarch64" — never "how fast":
emulation is 7–15× slower than a real board, so nothing measured here is reported as latency.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgesmith.targets.backends import BUNDLE_FILES, BackendError
from edgesmith.targets.bundle_files.edgesmith_runtime import EMULATED


@dataclass(frozen=True)
class BoardSpec:
    arch: str
    debian_arch: str
    qemu: str
    wheel_platforms: tuple[str, ...]


BOARDS = {"aarch64": BoardSpec("aarch64", "arm64", "qemu-aarch64-static",
                               ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"))}
DEBIAN_PACKAGES = ("python3.11", "libstdc++6", "libgomp1")
PYTHON = "usr/bin/python3.11"
# onnxruntime 1.31's aarch64 wheel crashes at import under Debian 12's qemu-user 7.2 (SIGSEGV); 1.23.2 runs.
# apache-tvm-ffi 0.1.14.post1: the release TVM 0.27 works with (DESIGN.md §3).
WHEELS = ("numpy", "onnxruntime==1.23.2", "apache-tvm-ffi==0.1.14.post1", "tornado", "psutil", "cloudpickle")
READY = "board.json"
LAYOUT = 2   # bumped when the board's layout changes (2: the wrapper marks processes as emulated); older ones rebuild


class BoardError(BackendError):
    """The emulated board cannot be prepared or run; the message names the missing tool and how to install it."""


def spec(arch: str) -> BoardSpec:
    if arch not in BOARDS:
        raise BoardError(f"unknown board architecture '{arch}'; valid: {', '.join(BOARDS)}")
    return BOARDS[arch]


def is_ready(root: Path) -> bool:
    ready = Path(root) / READY
    return ready.is_file() and json.loads(ready.read_text()).get("layout") == LAYOUT


def prepare(root: Path, arch: str = "aarch64", log=print) -> Path:
    """Builds the board in a scratch folder next to `root` and renames it into place (a killed build leaves none)."""
    board = spec(arch)
    root = Path(root)
    if is_ready(root):
        return root
    for tool, package in ((board.qemu, "qemu-user-static"), ("apt-get", "apt"), ("dpkg", "dpkg")):
        if shutil.which(tool) is None:
            raise BoardError(f"'{tool}' not found; install it: apt-get install {package}")
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        log(f"downloading Debian {board.debian_arch} packages: {', '.join(DEBIAN_PACKAGES)}")
        for deb in _download_debs(scratch / "apt", board):
            subprocess.run(["dpkg", "-x", str(deb), str(scratch / "sysroot")], check=True)
        shutil.rmtree(scratch / "apt")
        log(f"downloading {board.arch} wheels: apache-tvm {_tvm_version()}, {', '.join(WHEELS)}")
        _install_wheels(scratch / "site", board)
        _write_wrapper(scratch, root, board)
        (scratch / READY).write_text(json.dumps({"layout": LAYOUT, "arch": arch, "packages": DEBIAN_PACKAGES,
                                                 "wheels": [f"apache-tvm=={_tvm_version()}", *WHEELS]}, indent=2))
        if root.exists():
            shutil.rmtree(root)
        os.rename(scratch, root)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return root


def _download_debs(state: Path, board: BoardSpec) -> list[Path]:
    """apt on private state: the host's package lists, status and cache are never touched."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True)
    (state / "status").touch()
    options = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::State::status={state / 'status'}",
               "-o", f"Dir::Cache={state / 'cache'}", "-o", f"APT::Architecture={board.debian_arch}",
               "-o", f"APT::Architectures::={board.debian_arch}", "-o", "Debug::NoLocking=1", "-q"]
    _run(["apt-get", *options, "update"], "apt-get update (the board's private package lists)")
    # An empty dpkg status makes apt resolve the whole dependency closure, which --download-only then fetches.
    _run(["apt-get", *options, "install", "-y", "--download-only", "--no-install-recommends", *DEBIAN_PACKAGES],
         "apt-get download of the board's packages")
    return sorted((state / "cache" / "archives").glob("*.deb"))


def _install_wheels(site: Path, board: BoardSpec) -> None:
    platforms = [arg for p in board.wheel_platforms for arg in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), *platforms, "--python-version",
          "3.11", "--only-binary=:all:", f"apache-tvm=={_tvm_version()}", *WHEELS], "pip install of aarch64 wheels")


def _tvm_version() -> str:
    """The board runs the TVM release that compiled the artifacts (runtime and compiler must match)."""
    from importlib.metadata import version

    return version("apache-tvm")


def _write_wrapper(scratch: Path, root: Path, board: BoardSpec) -> None:
    """bin/python3 starts the board's Python under qemu; binfmt_misc is absent, so the path has to be explicit."""
    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    # EDGESMITH_EMULATED: edgesmith_runtime reports it, so timings taken under qemu are never taken for latency.
    wrapper.write_text(f'#!/bin/sh\nROOT="$(cd "$(dirname "$0")/.." && pwd)"\n'
                       f'PYTHONPATH="$ROOT/site${{PYTHONPATH:+:$PYTHONPATH}}" PYTHONNOUSERSITE=1 '
                       f'{EMULATED}={board.qemu} '
                       f'exec {board.qemu} -L "$ROOT/sysroot" "$ROOT/sysroot/{PYTHON}" "$@"\n')
    wrapper.chmod(0o755)
    (bin_dir / "python").symlink_to("python3")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise BoardError(f"{what} failed (exit {done.returncode}): {tail[-1] if tail else 'no output'}")


def python(root: Path) -> Path:
    return Path(root) / "bin" / "python3"


def run(root: Path, command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs `command` with the board's bin/ first on PATH, so `python3 script.py` runs on the emulated board."""
    if not is_ready(root):
        raise BoardError(f"no emulated board at {root}; prepare it with `edgesmith board emulate aarch64 --prepare`")
    if not command:
        raise BoardError("no command given; e.g. `edgesmith board emulate aarch64 -- python3 -c 'import tvm'`")
    env = {**os.environ, "PATH": f"{Path(root) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(command, env=env, **kwargs)


def rpc_server_command(root: Path, tracker: str, key: str, port: int = 9090) -> list[str]:
    """The bundles' RPC server (`edgesmith_runtime.py --rpc-server`) on the board, registered with `tracker`
    (host:port) under `key`. Its worker processes are started through sys.executable, which must be the qemu
    wrapper for them to run at all."""
    runtime = BUNDLE_FILES / "edgesmith_runtime.py"
    argv = [str(runtime), "--rpc-server", f"--tracker={tracker}", f"--key={key}", "--host=127.0.0.1",
            f"--port={port}"]
    code = (f"import sys, runpy; sys.executable = {str(python(root))!r}; sys.argv = {argv!r}; "
            f"runpy.run_path({str(runtime)!r}, run_name='__main__')")
    return [str(python(root)), "-c", code]

"""NNCF's torch C++ extension, built once at a known point before QAT needs it.

NNCF compiles its quantizer kernels on first use (torch.utils.cpp_extension, under TORCH_EXTENSIONS_DIR) and gives
that 60 seconds: a loaded 2-core machine takes longer, and QAT dies with ExtensionLoaderTimeoutException. A build
killed midway leaves torch's `lock` file (a FileBaton, which records no owner), and every later load on the machine
then waits on it forever. So, before QAT:
- the build runs here, in this process, with no time limit (and NNCF's own later load gets a generous one);
- edgesmith processes take an flock beside the build folder first: the kernel releases it when its holder dies, so
  a waiting process knows a `lock` file it finds was left by a killed build, unless another program (not
  edgesmith) is compiling in that folder right now, which /proc tells;
- a failure is one line with the folder and what to do.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edgesmith.errors import TrainingError
from edgesmith.pipeline.progress import info, quiet, warn

LOAD_TIMEOUT_ENV = "NNCF_EXTENSION_LOAD_TIMEOUT"
LOAD_TIMEOUT_S = "1800"   # NNCF's own load after our build only checks it; a user's setting wins


def ensure_built() -> None:
    """Builds (or verifies) NNCF's CPU extensions; raises TrainingError in one line if that is impossible."""
    os.environ.setdefault(LOAD_TIMEOUT_ENV, LOAD_TIMEOUT_S)
    import nncf.torch.quantization.extensions  # noqa: F401 (registers the quantizer kernels' loaders)
    from nncf.torch.extensions import EXTENSIONS, ExtensionsType

    cpu = [loader for loader in EXTENSIONS.registry_dict.values() if loader.extension_type() == ExtensionsType.CPU]
    if not cpu:
        raise TrainingError("qat: this NNCF version registers no CPU extension loader; install the nncf version "
                            "pyproject.toml names")
    for loader in cpu:
        _build(loader)


def _build(loader) -> None:
    build_dir = Path(loader.get_build_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".edgesmith-{build_dir.name}.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)   # another edgesmith process building it: wait for it, however long
        remove_stale_lock(build_dir)
        fresh = not any(build_dir.glob("*.so"))
        if fresh:
            info(f"[cyan]… compiling NNCF's {loader.name()} extension once for this machine[/] ({build_dir})")
        try:
            with quiet("nncf"):
                loader.load()
        except Exception as exc:   # torch raises RuntimeError, OSError or CalledProcessError from the compiler
            said = str(exc).strip().splitlines()
            raise TrainingError(
                f"qat: NNCF's C++ extension '{loader.name()}' could not be built in {build_dir} "
                f"({said[-1][:200] if said else type(exc).__name__}); it needs a C++ compiler (g++) and ninja — "
                f"install them, or delete {build_dir} and run again") from None


def remove_stale_lock(build_dir: Path) -> bool:
    """Removes torch's build `lock` when no process is working in the folder (call it holding the flock, so no
    edgesmith process is). Returns whether one was removed."""
    lock = build_dir / "lock"
    if not lock.exists() or _in_use(build_dir):
        return False
    warn(f"removing a stale build lock left by a killed process: {lock}")
    lock.unlink(missing_ok=True)
    return True


def _in_use(folder: Path) -> bool:
    """Whether a live process has its working directory in `folder` or names it on its command line (ninja and
    the compiler it runs do both)."""
    target = str(folder.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(target):
                return True
            if target.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:   # gone, or not ours to read
            continue
    return False

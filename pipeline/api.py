"""The Python API, exported as `edgesmith.*` (edgesmith/__init__.py). The CLI calls these and nothing deeper."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from edgesmith.pipeline.progress import silenced
from edgesmith.pipeline.recipe import Recipe, load_recipe
from edgesmith.pipeline.run import RunResult
from edgesmith.pipeline.run import run as run_pipeline
from edgesmith.targets import Profile, list_profiles, load_profile

__all__ = ["Profile", "Recipe", "RunResult", "batch", "bench", "default_cache_dir", "evaluate", "list_profiles",
           "load_profile", "load_recipe", "report", "run", "runs"]


def default_cache_dir() -> Path:
    """$EDGESMITH_CACHE_DIR, else $XDG_CACHE_HOME/edgesmith, else ~/.cache/edgesmith (the CLI's default too)."""
    explicit = os.environ.get("EDGESMITH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgesmith"


def run(recipe: Recipe | str | Path | dict | None, out_dir: str | Path, cache_dir: str | Path | None = None, *,
        use_cache: bool = True, quiet: bool = False, on_step: Callable[[str], None] | None = None,
        force: bool = False) -> RunResult:
    """Runs a recipe (a Recipe, a YAML path, a dict of fields, or None for the built-in default) into `out_dir`.

    Returns a RunResult: `.rows` (the results rows, as in results.json), `.out_dir`, `.steps`. Every finished step is
    cached under `cache_dir` (default: `default_cache_dir()`). `quiet` prints nothing but errors; the logger
    "edgesmith" and its level do the same for a whole program. `on_step(label)` is called as each step starts
    (`"prune (stage 2)"`, `"compile x86-host onnxruntime/int8"`). A run folder holding another recipe's run is
    refused (RunFolderError) unless `force`, which empties it first."""
    resolved = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with silenced(quiet):
        return run_pipeline(resolved, Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir(),
                            use_cache=use_cache, on_step=on_step, force=force)


def evaluate(onnx_path: str | Path, recipe: Recipe | str | Path | dict | None = None) -> dict:
    """Accuracy of any ONNX file on the recipe's validation split (the split every stage is scored on)."""
    from edgesmith.pipeline.evaluate import evaluate_onnx_file

    return evaluate_onnx_file(Path(onnx_path), recipe if isinstance(recipe, Recipe) else load_recipe(recipe))


def batch(matrix: str | Path, out_dir: str | Path | None = None, cache_dir: str | Path | None = None, *,
          executor: str | None = None, ray_address: str | None = None, max_parallel: int | None = None,
          only: str | None = None, use_cache: bool = True, quiet: bool = False):
    """Runs every (model, recipe) job of a matrix YAML into `out_dir`/jobs/<label>/ (default runs/<matrix name>),
    locally in a process pool or on Ray (`executor`, `ray_address` override the matrix's `executor:` section), all
    sharing `cache_dir`. Writes results.csv, results.json, batch.json and report.html into `out_dir`.

    Returns a BatchResult: `.outcomes` (per job: status, reason, rows, steps), `.rows` (results.csv's rows),
    `.failed`. A failing job never stops the others. On Ctrl-C what finished is written, then KeyboardInterrupt."""
    from edgesmith.pipeline.batch import run_batch

    with silenced(quiet):
        return run_batch(Path(matrix), Path(out_dir) if out_dir else None,
                         Path(cache_dir) if cache_dir else default_cache_dir(), executor=executor,
                         ray_address=ray_address, max_parallel=max_parallel, only=only, use_cache=use_cache,
                         live=not quiet)


def report(folders: list[str | Path], out_file: str | Path) -> Path:
    """One self-contained report.html comparing any run and batch folders: per device, the metric (or fidelity)
    against measured p50 with the Pareto front and the shipped candidates; what ships per model × device; every
    run's stage table."""
    from edgesmith.pipeline.cache import atomic_write_text
    from edgesmith.pipeline.html_report import render_report

    out = Path(out_file)
    atomic_write_text(out, render_report([Path(f) for f in folders]))
    return out


def bench(onnx_path: str | Path, target: str = "x86-host", *, batch: int = 1, runs: int = 200,
          warmup: int = 20, rpc_tracker: str | None = None) -> list[dict]:
    """Latency of any ONNX file with each backend of the profile `target`, through the pipeline's own compile, load
    and timing loop: one dict per backend with `latency_ms` {p50, p90, p99, mean, …} or a `status` saying why it
    was skipped or failed. A host profile is timed here; a board's through the RPC tracker `rpc_tracker`, where its
    bundle server (`edgesmith_runtime.py --rpc-server`) is registered under the profile's rpc_key."""
    import tempfile

    from edgesmith.errors import TargetError
    from edgesmith.pipeline.bench import bench_onnx
    from edgesmith.pipeline.config import BenchConfig

    path = Path(onnx_path)
    if not path.is_file():
        raise TargetError(f"'{path}' does not exist; give an ONNX file")
    profile, cfg = load_profile(target), BenchConfig(batch_size=batch, runs=runs, warmup=warmup)
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-") as work:
        if profile.is_host:
            return bench_onnx(path, profile, cfg, Path(work))
        if not (rpc_tracker and profile.rpc_key):
            raise TargetError(f"'{target}' is a device, not this host: give --rpc-tracker HOST:PORT, the tracker its "
                              f"bundle server registers with under rpc_key '{profile.rpc_key}' (`python3 "
                              "edgesmith_runtime.py --rpc-server --tracker HOST:PORT --key KEY`, shipped in every "
                              "bundle; README: Devices)" if profile.rpc_key else
                              f"'{target}' is a device without an rpc_key in its profile: it cannot be reached")
        from edgesmith.pipeline.bench_device import bench_on_device

        return bench_on_device(path, profile, cfg, rpc_tracker, Path(work))


def runs(folder: str | Path = "runs") -> list[dict]:
    """The run folders at or below `folder`, newest first: folder, recipe, model, started, seconds, and per target
    the candidate it ships (`{"x86-host": "onnxruntime/int8 0.0412 ms"}`)."""
    from edgesmith.pipeline.run_folders import list_runs

    return list_runs(Path(folder))

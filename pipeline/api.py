"""The Python API, exported as `edgesmith.*` (edgesmith/__init__.py). The CLI calls these and nothing deeper."""
from __future__ import annotations

import os
from pathlib import Path

from edgesmith.pipeline.progress import silenced
from edgesmith.pipeline.recipe import Recipe, load_recipe
from edgesmith.pipeline.run import RunResult
from edgesmith.pipeline.run import run as run_pipeline
from edgesmith.targets import Profile, list_profiles, load_profile

__all__ = ["Profile", "Recipe", "RunResult", "default_cache_dir", "evaluate", "list_profiles", "load_profile",
           "load_recipe", "run"]


def default_cache_dir() -> Path:
    """$EDGESMITH_CACHE_DIR, else $XDG_CACHE_HOME/edgesmith, else ~/.cache/edgesmith (the CLI's default too)."""
    explicit = os.environ.get("EDGESMITH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgesmith"


def run(recipe: Recipe | str | Path | dict | None, out_dir: str | Path, cache_dir: str | Path | None = None, *,
        use_cache: bool = True, quiet: bool = False) -> RunResult:
    """Runs a recipe (a Recipe, a YAML path, a dict of fields, or None for the built-in default) into `out_dir`.

    Returns a RunResult: `.rows` (the results rows, as in results.json), `.out_dir`, `.steps`. Every finished step is
    cached under `cache_dir` (default: `default_cache_dir()`). `quiet` prints nothing but errors; the logger
    "edgesmith" and its level do the same for a whole program."""
    resolved = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with silenced(quiet):
        return run_pipeline(resolved, Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir(),
                            use_cache=use_cache)


def evaluate(onnx_path: str | Path, recipe: Recipe | str | Path | dict | None = None) -> dict:
    """Accuracy of any ONNX file on the recipe's validation split (the split every stage is scored on)."""
    from edgesmith.pipeline.evaluate import evaluate_onnx_file

    return evaluate_onnx_file(Path(onnx_path), recipe if isinstance(recipe, Recipe) else load_recipe(recipe))

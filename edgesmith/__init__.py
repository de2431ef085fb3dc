"""edgesmith: compress, export, compile and benchmark PyTorch models for edge devices.

    import edgesmith

    recipe = edgesmith.load_recipe(None, ["stages.0.epochs=2"])     # None: the built-in default recipe
    result = edgesmith.run(recipe, "runs/mnist", quiet=True)         # cache: edgesmith.default_cache_dir()
    for row in result.rows: ...                                      # as in results.json

Errors a user can fix are `edgesmith.EdgesmithError` (one line: the field or file, the bad value, the fix).
The sub-packages are `edgesmith.pipeline`, `edgesmith.models`, `edgesmith.targets` and `edgesmith.benchmarks`.
Importing edgesmith is cheap: torch and the toolchains load when an API function is first used.
"""
import pkgutil

from edgesmith.errors import EdgesmithError

# The sub-packages are mapped from the product's top-level folders (pyproject.toml). extend_path lets an installed
# copy's sub-packages be found even when this folder shadows it (a regular install run from a source checkout).
__path__ = pkgutil.extend_path(__path__, __name__)

_API = ("Profile", "Recipe", "RunResult", "batch", "bench", "default_cache_dir", "evaluate", "list_profiles",
        "load_profile", "load_recipe", "report", "run", "runs")
__all__ = ["EdgesmithError", *_API]


def __getattr__(name: str):
    if name in _API:
        from edgesmith.pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgesmith' has no attribute '{name}'")

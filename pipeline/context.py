"""What every step of one run shares: the recipe, the run folder, the steps done, the results rows, the data set
(loaded on first use) and the resolved target profiles."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgesmith.errors import DataError, TargetError
from edgesmith.models import InputSpec
from edgesmith.pipeline import report
from edgesmith.pipeline.cache import Store
from edgesmith.pipeline.data import Dataset, load_dataset
from edgesmith.pipeline.evaluate import TaskMetric
from edgesmith.pipeline.recipe import Recipe
from edgesmith.pipeline.run_folders import claim_run_folder
from edgesmith.pipeline.steps import Metrics, Step, Steps
from edgesmith.pipeline.user_code import resolve_callable, source_sha256
from edgesmith.targets import Profile, ProfileError, load_profile

ONNX_FILE = "model.onnx"
IO_SPEC = "io.json"


@dataclass
class RunContext:
    recipe: Recipe
    out_dir: Path
    steps: Steps
    profiles: list[Profile]
    rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    onnx_steps: dict[str, Step] = field(default_factory=dict)   # a model step's key → its ONNX step
    outputs_steps: dict[str, Step] = field(default_factory=dict)   # a step's key → its outputs step
    reference: Step | None = None      # outputs of the reference model: what every row's fidelity is measured against
    int8_rejected: dict[str, str] = field(default_factory=dict)   # scheme → why its INT8 file failed the gate
    _data: Dataset | None = None

    @classmethod
    def open(cls, recipe: Recipe, out_dir: Path, cache_dir: Path, use_cache: bool,
             on_step: Callable[[str], None] | None = None, force: bool = False) -> RunContext:
        try:   # profiles are resolved before any work, so a bad one costs nothing
            profiles = [load_profile(t) for t in recipe.targets]
        except ProfileError as exc:
            raise TargetError(str(exc)) from None
        store = Store(cache_dir)
        store.sweep_stale()
        out_dir = Path(out_dir)
        claim_run_folder(out_dir, recipe, force)
        return cls(recipe, out_dir, Steps(store, recipe.name, use_cache, on_step), profiles)

    @property
    def store(self) -> Store:
        return self.steps.store

    @property
    def channel_multiple(self) -> int:
        """Pruned channel counts suit every target: the least common multiple of their channel multiples."""
        return math.lcm(*(p.channel_multiple for p in self.profiles)) if self.profiles else 1

    @property
    def schemes(self) -> list[str]:
        quant = self.recipe.quantization
        if quant is None:
            return []
        return list(quant.schemes or dict.fromkeys(p.quant_scheme for p in self.profiles))

    def dataset(self, specs: tuple[InputSpec, ...]) -> Dataset:
        """Loaded on first use only: a fully cached re-run never reads the data set."""
        if self._data is None:
            self._data = load_dataset(self.recipe.data, specs)
        return self._data

    def data_key(self) -> dict:
        """The data config, plus the files' names, sizes and modification times when it reads a path, or the source
        of its factory (data a factory reads from elsewhere: name its files or version in data.kwargs)."""
        data = self.recipe.data
        cfg = data.model_dump(mode="json")
        if data.path:
            cfg["content"] = _path_fingerprint(data.path)
        if data.factory:
            cfg["source"] = source_sha256(resolve_callable(data.factory, "data.factory", DataError))
        return cfg

    @functools.cached_property
    def task_metric(self) -> TaskMetric:
        return TaskMetric.from_recipe(self.recipe.metric)

    def metric_key(self) -> dict | str:
        """The metric as a cache key part: its name, and its file's source for a user's function."""
        metric = self.task_metric
        return metric.name if metric.function is None else {"fn": metric.name,
                                                             "source": source_sha256(metric.function)}

    @staticmethod
    def io_spec(step: Step) -> dict:
        return json.loads((step.artifact / IO_SPEC).read_text())

    def specs(self, step: Step) -> tuple[InputSpec, ...]:
        return tuple(InputSpec.from_dict(s) for s in self.io_spec(step)["inputs"])

    def row(self, stage: str, metrics: Metrics, *, target: str | None = None, backend: str | None = None,
            status: str | None = None, artifact: Path | None = None, bundle: Path | None = None) -> None:
        """One results row; a compression stage's row is checked against the accuracy budget at once. `artifact`
        and `bundle` are paths in the run folder (recorded relative to it)."""
        where = {k: str(Path(v).relative_to(self.out_dir)) if v else None
                 for k, v in (("artifact", artifact), ("bundle", bundle))}
        self.rows.append({**report.row(stage, metrics, target=target, backend=backend, status=status, **where),
                          "metric": self.task_metric.name})
        if target is None:
            report.check_budget(self.rows, self.recipe.budget)

    @contextlib.contextmanager
    def reporting(self):
        """Writes results and manifest at the end, and also when a step fails or overspends the budget, so
        everything finished stays described and usable."""
        try:
            yield
        finally:
            report.write(self.out_dir, self.recipe, self.steps.done, self.rows, self.started)


def _path_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of a data path: cheap, and changes when the data does."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.exists()]

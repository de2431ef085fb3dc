"""Batch matrices: models × recipes (× the targets every job compiles for), validated into jobs before any work.

A matrix file names recipes (paths relative to the matrix file), optionally models that replace each recipe's
model, targets that replace each recipe's targets, and `--set` overrides for every job. Every (model, recipe) pair
is one job: a normal recipe, run into its own run folder. Expanding validates every job's recipe, so a typo in the
matrix or in any recipe costs nothing.
"""
from __future__ import annotations

import copy
import fnmatch
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from edgesmith.config_files import read_mapping, read_text, validated
from edgesmith.errors import RecipeError
from edgesmith.pipeline.config import ModelConfig, Strict
from edgesmith.pipeline.recipe import DEFAULT_RECIPE, NAME_PATTERN, Recipe, apply_override, validate_recipe


class MatrixModel(ModelConfig):
    """A recipe's `model` section, plus the job's name and overrides that only this model needs (its data)."""
    label: str | None = Field(None, pattern=NAME_PATTERN)
    set: list[str] = []

    @property
    def short_name(self) -> str:
        return self.label or super().short_name


class JobResources(Strict):
    """What one job asks of a worker: Ray schedules by it; locally `cpus` sets the job's torch threads."""
    cpus: float | None = Field(None, gt=0)   # default: the cores divided among the parallel jobs
    gpus: float = Field(0, ge=0)


class ExecutorConfig(Strict):
    kind: Literal["local", "ray"] = "local"
    address: str | None = None               # ray: "auto" or "ray://head:10001"; none starts a local Ray instance
    max_parallel: int | None = Field(None, ge=1)
    resources: JobResources = JobResources()

    @model_validator(mode="after")
    def _address_needs_ray(self):
        if self.address and self.kind != "ray":
            raise ValueError("executor.address joins a Ray cluster; set executor.kind: ray with it")
        return self


class Matrix(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    recipe: Path | None = None       # neither recipe nor recipes: the built-in default recipe
    recipes: list[Path] | None = Field(None, min_length=1)
    models: list[MatrixModel] | None = Field(None, min_length=1)
    targets: list[str] | None = Field(None, min_length=1)
    set: list[str] = []
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _one_recipe_field(self):
        if self.recipe is not None and self.recipes is not None:
            raise ValueError("give recipe: (one file) or recipes: (a list), not both")
        return self

    @property
    def recipe_files(self) -> list[Path | None]:
        return list(self.recipes) if self.recipes else [self.recipe]


@dataclass(frozen=True)
class Job:
    """One (model, recipe) pair. Everything a worker needs travels with it: the resolved recipe as plain data and
    the folder that relative paths in it are relative to."""
    label: str          # its run folder's name, jobs/<label>/
    model: str          # the model's label (two entries of one registry model with other kwargs differ)
    recipe_name: str
    recipe: dict        # Recipe.model_dump(mode="json"), validated
    cwd: str

    def resolved(self) -> Recipe:
        return validate_recipe(copy.deepcopy(self.recipe), f"job '{self.label}'")


def load_matrix(path: Path) -> Matrix:
    raw = read_mapping(read_text(Path(path), "matrix", RecipeError), str(path), "a batch matrix", RecipeError)
    return validated(Matrix, raw, str(path), RecipeError)


def expand(matrix: Matrix, matrix_file: Path, only: str | None = None, cwd: Path | None = None) -> list[Job]:
    """The jobs, every one validated, recipe by recipe, each over every model (results keep this order; the order
    they start in is job_order.py's)."""
    base = Path(matrix_file).parent
    cwd = Path(cwd or os.getcwd())
    recipes = [(path, _recipe_mapping(base, path)) for path in matrix.recipe_files]
    jobs = []
    for path, raw_recipe in recipes:
        for entry in matrix.models or [None]:
            raw = copy.deepcopy(raw_recipe)
            if entry is not None:
                raw["model"] = _model_section(entry, base, cwd)
            if matrix.targets is not None:
                raw["targets"] = list(matrix.targets)
            for item in [*matrix.set, *(entry.set if entry else [])]:
                apply_override(raw, item)
            recipe = validate_recipe(raw, f"{matrix_file}: recipe {path or DEFAULT_RECIPE}"
                                          + (f" with model {entry.short_name}" if entry else ""))
            model = (entry or recipe.model).short_name
            label = model if len(recipes) == 1 else f"{model}__{recipe.name}"
            jobs.append(Job(label, model, recipe.name, recipe.model_dump(mode="json"), str(cwd)))
    _refuse_duplicates(jobs, matrix_file)
    chosen = [j for j in jobs if only is None or fnmatch.fnmatchcase(j.label, only)]
    if not chosen:
        raise RecipeError(f"--only '{only}' matches no job of {matrix_file}; job labels: "
                          f"{', '.join(j.label for j in jobs)}")
    return chosen


def _recipe_mapping(base: Path, path: Path | None) -> dict:
    if path is None:
        text, name = resources.files("edgesmith.pipeline.recipes").joinpath(DEFAULT_RECIPE).read_text(), DEFAULT_RECIPE
    else:
        file = path if path.is_absolute() else base / path
        text, name = read_text(file, "recipe", RecipeError), str(file)
    return read_mapping(text, name, "a recipe", RecipeError)


def _model_section(entry: MatrixModel, base: Path, cwd: Path) -> dict:
    """The entry as a recipe's model section. A factory file is relative to the matrix file; it is rewritten
    relative to the working folder, where recipes' paths are resolved."""
    section = entry.model_dump(mode="json", exclude={"label", "set"}, exclude_defaults=True)
    factory = section.get("factory")
    if factory and factory.rpartition(":")[0].endswith(".py"):
        file, _, function = factory.rpartition(":")
        located = Path(file) if Path(file).is_absolute() else (base / file).resolve()
        section["factory"] = f"{os.path.relpath(located, cwd.resolve())}:{function}"
    return section


def _refuse_duplicates(jobs: list[Job], matrix_file: Path) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.label in seen:
            raise RecipeError(f"{matrix_file}: two jobs are both labelled '{job.label}'; give the models distinct "
                              "`label:` fields (or distinct recipe names)")
        seen.add(job.label)

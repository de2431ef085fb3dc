"""Recipes: YAML validated with pydantic before any work; frozen once loaded.

Every error is one line naming the field, the bad value and the valid choices. The sections live in
pipeline/config.py, each stage's config beside its function in pipeline/stages/.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from edgesmith.config_files import read_mapping, read_text, suggest, validated
from edgesmith.errors import RecipeError
from edgesmith.pipeline.config import (
    BenchConfig,
    BudgetConfig,
    CompileConfig,
    DataConfig,
    ExportConfig,
    Metric,
    ModelConfig,
    Strict,
)
from edgesmith.pipeline.stages import entry_for, stage_entries, stage_tag
from edgesmith.targets import ProfileError, list_profiles, load_profile

DEFAULT_RECIPE = "default.yaml"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"   # recipe names and batch labels: they name folders
_STAGE_CLASSES = {tag: entry.config for tag, entry in stage_entries().items()}
_KINDS = ", ".join(sorted({tag.split("-")[0] for tag in _STAGE_CLASSES}))
_METHODS = " | ".join(tag.split("-", 1)[1] for tag in _STAGE_CLASSES if "-" in tag)

Stage = Annotated[Union[tuple(Annotated[cls, Tag(tag)] for tag, cls in _STAGE_CLASSES.items())],
                  Discriminator(stage_tag, custom_error_type="stage_kind",
                                custom_error_message=f"unknown stage kind or prune method; valid kinds: {_KINDS} "
                                                     f"(prune method {_METHODS})")]


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    model: ModelConfig
    data: DataConfig
    stages: list[Stage] = []
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    compile: CompileConfig = CompileConfig()
    targets: list[str] = ["x86-host"]
    budget: BudgetConfig = BudgetConfig()
    metric: Metric = "auto"   # the accuracy column and the budget's measure: top1, none or {fn: "file.py:function"}

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        try:
            valid = list_profiles()
        except ProfileError as exc:
            raise ValueError(str(exc)) from None
        for t in targets:
            if t not in valid:
                raise ValueError(f"unknown target '{t}'{suggest(t, valid)}; valid targets: {', '.join(valid)}")
        return targets

    @field_validator("stages")
    @classmethod
    def _quantization_last(cls, stages: list) -> list:
        """QAT/PTQ fix the INT8 format per target, so the flow branches there: nothing can follow them."""
        quant = [i for i, s in enumerate(stages) if entry_for(s).quantizes]
        if len(quant) > 1 or (quant and quant[0] != len(stages) - 1):
            raise ValueError(f"a recipe has at most one qat/ptq stage and it comes last; got kinds "
                             f"{[s.kind for s in stages]}")
        return stages

    @model_validator(mode="after")
    def _latency_budgets_measurable(self):
        """A latency budget is measured on its device: a target of this recipe, reachable before any work."""
        for index, stage in enumerate(self.stages):
            latency = getattr(stage, "latency", None)
            if latency is None:
                continue
            where = f"stages.{index}.latency"
            if latency.target not in self.targets:
                raise ValueError(f"{where}.target '{latency.target}' is not one of the recipe's targets "
                                 f"({', '.join(self.targets)}); add it to targets")
            try:
                profile = load_profile(latency.target)
            except ProfileError as exc:
                raise ValueError(str(exc)) from None
            if latency.backend and latency.backend not in profile.backends:
                raise ValueError(f"{where}.backend '{latency.backend}' is not a backend of '{profile.name}' "
                                 f"({', '.join(profile.backends)})")
            if not profile.is_host and not (self.compile.rpc_tracker and profile.rpc_key):
                raise ValueError(
                    f"{where}.target '{profile.name}' is a board, measured on the board itself: set "
                    "compile.rpc_tracker to HOST:PORT of a TVM RPC tracker and start `python3 edgesmith_runtime.py "
                    f"--rpc-server --tracker HOST:PORT --key {profile.rpc_key or 'KEY'}` on the board (it ships in "
                    "every bundle)" + ("" if profile.rpc_key else "; its profile also needs an rpc_key"))
            if latency.minimise and self.budget.max_accuracy_drop is None:
                raise ValueError(f"{where}.minimise keeps the accuracy within budget.max_accuracy_drop; set it")
        return self

    @property
    def model_stages(self) -> list:
        """The stages that produce a torch model (all but a final qat/ptq)."""
        return self.stages[:-1] if self.quantization else list(self.stages)

    @property
    def quantization(self):
        return self.stages[-1] if self.stages and entry_for(self.stages[-1]).quantizes else None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_recipe(source: Path | str | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe file (or a dict of fields, or None for the built-in default) with `key.path=value` overrides applied
    (the CLI's `--set`), validated."""
    if isinstance(source, dict):
        name, raw = "recipe", copy.deepcopy(source)
    else:
        name = str(source) if source else f"built-in {DEFAULT_RECIPE}"
        text = (read_text(Path(source), "recipe", RecipeError) if source
                else resources.files("edgesmith.pipeline.recipes").joinpath(DEFAULT_RECIPE).read_text())
        raw = read_mapping(text, name, "a recipe", RecipeError)
    for item in overrides or ():
        apply_override(raw, item)
    return validate_recipe(raw, name)


def validate_recipe(raw: dict, source: str) -> Recipe:
    return validated(Recipe, raw, source, RecipeError, _STAGE_CLASSES)


def apply_override(raw: dict, item: str) -> None:
    """`a.b.0.c=value`: the value is parsed as YAML, so numbers, booleans, lists and null keep their types."""
    if "=" not in item:
        raise RecipeError(f"--set '{item}' must look like key.path=value (e.g. stages.0.epochs=2)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set '{key}': '{where}' is not an index of a list of {len(node)} items")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"--set '{key}': '{'.'.join(parts[:i])}' is a value, not a section")
        if last:
            node[part] = _override_value(key, value)
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _override_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"--set '{key}': the value {value!r} is not valid YAML ({problem}); quote strings, e.g. "
                          f"--set '{key}=\"...\"'") from None

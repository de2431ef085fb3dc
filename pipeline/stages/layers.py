"""Finding layers by name and the classifier layer, shared by the stages that leave some layers alone."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from edgesmith.errors import ModelError, RecipeError

# Layers whose weight is a dense matrix or kernel: what magnitude pruning zeroes and BatchNorm folds into.
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def module_named(model: nn.Module, name: str, field: str) -> nn.Module:
    """The submodule called `name`; an unknown name is a recipe error that lists similar names."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        close = [n for n in modules if n and n.split(".")[-1] == name.split(".")[-1]][:5]
        raise RecipeError(f"{field}: the model has no module '{name}'"
                          f"{'; similar: ' + ', '.join(close) if close else ''}")
    return modules[name]


def ignored_modules(model: nn.Module, example: Sequence[torch.Tensor], names: list[str] | None,
                    field: str) -> list[nn.Module]:
    """The layers named in the recipe, or by default the classifier: pruning it would change the classes."""
    if names is not None:
        return [module_named(model, n, field) for n in names]
    return [output_layer(model, example)]


def output_layer(model: nn.Module, example: Sequence[torch.Tensor]) -> nn.Module:
    """The layer whose output is the model's output, found by running the model with hooks."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda mod, _, out: produced.__setitem__(id(out), mod))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            output = model.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    if id(output) in produced:
        return produced[id(output)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError("cannot find the classifier layer; name the layers to leave alone in ignored_layers")
    return linears[-1]

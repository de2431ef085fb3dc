"""Finding layers by name and the layers that produce the outputs, shared by the stages that leave some layers
alone."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from edgesmith.errors import ModelError, RecipeError

# Layers whose weight is a dense matrix or kernel: what magnitude pruning zeroes and BatchNorm folds into.
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# An attention module's head count: `num_heads` (this project's attention, most libraries), `num_attention_heads`
# (Hugging Face BERT-family self-attention, with `attention_head_size` and `all_head_size`).
HEAD_COUNTS = ("num_heads", "num_attention_heads")


def has_attention(model: nn.Module) -> bool:
    """A transformer: quantizers and pruning treat its attention, LayerNorms and embeddings specially."""
    return any(isinstance(m, nn.MultiheadAttention) or any(isinstance(getattr(m, n, None), int) for n in HEAD_COUNTS)
               for m in model.modules())


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
    """The layers named in the recipe, or by default the layers that produce the model's outputs: pruning them
    would change the outputs' shapes (the classes, the score maps' channels, the embedding's size)."""
    if names is not None:
        return [module_named(model, n, field) for n in names]
    return output_layers(model, example)


def output_layers(model: nn.Module, example: Sequence[torch.Tensor]) -> list[nn.Module]:
    """For every output, the nearest layers with weights it is computed from, found by walking the autograd graph
    back from the output through weight-free operations (pooling, reshapes, activations, additions). A layer that
    never runs (an unused pooler) is never found."""
    producers: dict[object, nn.Module] = {}

    def record(module, inputs, output):   # inner modules finish first: the innermost producer is kept
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            producers.setdefault(output.grad_fn, module)

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if m is not model and any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.enable_grad():
            outputs = model.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    found: dict[int, nn.Module] = {}
    for output in (outputs if isinstance(outputs, (tuple, list)) else (outputs,)):
        stack, seen = [output.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in producers:
                found[id(producers[node])] = producers[node]
            else:
                stack.extend(parent for parent, _ in node.next_functions)
    if not found:
        raise ModelError("cannot find the layers that produce the model's outputs; name the layers to leave alone "
                         "in prune.ignored_layers")
    return list(found.values())

"""Model registry and definitions. Registered models are examples: any nn.Module with an input spec works."""
from edgesmith.models.registry import (
           UnknownModelError,
           create,
           entries,
           get_entry,
           input_spec_of,
           list_models,
           register,
)
from edgesmith.models.spec import InputSpec

__all__ = ["InputSpec", "UnknownModelError", "create", "entries", "get_entry", "input_spec_of", "list_models",
           "register"]

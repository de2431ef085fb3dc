"""Model registry and definitions. Registered models are examples: any nn.Module with an input spec works."""
from models.registry import UnknownModelError, create, entries, get_entry, input_spec_of, list_models, register
from models.spec import InputSpec

__all__ = ["InputSpec", "UnknownModelError", "create", "entries", "get_entry", "input_spec_of", "list_models",
           "register"]

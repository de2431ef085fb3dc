"""One small exception hierarchy. Every message names the bad value, the valid choices and the fix.

The CLI prints `str(error)` on one line and exits 2; nothing else in the project catches broadly. This module is a
leaf that imports nothing of edgesmith, so `models` and `targets` subclass `EdgesmithError` too (ProfileError,
BackendError, UnknownModelError) without importing the pipeline.
"""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty): tools raise pages, users get one line."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


class EdgesmithError(Exception):
    """Base of every error a user can cause and fix."""


class RecipeError(EdgesmithError):
    """The recipe (file, field or --set override) is invalid."""


class ModelError(EdgesmithError):
    """The model cannot be built, or declares no usable input spec."""


class CheckpointError(EdgesmithError):
    """A checkpoint file cannot be read safely or does not match the model."""


class DataError(EdgesmithError):
    """A data set cannot be read or does not fit the model."""


class ExportError(EdgesmithError):
    """ONNX export or its checks failed."""


class ParityError(ExportError):
    """The exported model's outputs differ from torch's beyond the recipe's tolerance."""


class TargetError(EdgesmithError):
    """A device profile or backend is unknown, invalid or unusable here."""


class TrainingError(EdgesmithError):
    """Training diverged (NaN loss) or cannot run."""


class BudgetError(EdgesmithError):
    """A stage lost more accuracy than the recipe's budget allows."""

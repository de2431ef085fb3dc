"""Importing a user's function from a recipe reference: `package.module:function` or `path/to/file.py:function`.

One resolver for every field that names user code (model.factory, data.factory): the errors name the field."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from edgesmith.errors import EdgesmithError, first_line


def resolve_callable(ref: str, field: str, error: type[EdgesmithError]) -> Callable:
    """The callable `ref` names; `error` (ModelError, DataError, ...) with `field` in its message otherwise."""
    module_ref, _, attr = ref.rpartition(":")
    if module_ref.endswith(".py"):
        module = _load_file(module_ref, field, error)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as exc:
            raise error(f"{field} module '{module_ref}' cannot be imported ({exc}); "
                        "is it installed or on PYTHONPATH?") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise error(f"{field} '{ref}': '{attr}' is not a callable in {module_ref}")
    return function


def _load_file(module_ref: str, field: str, error: type[EdgesmithError]):
    path = Path(module_ref).resolve()
    if not path.is_file():
        raise error(f"{field} file '{module_ref}' does not exist; give a path to a .py file")
    name = f"edgesmith_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:   # a syntax error or a failing import in the user's file
            del sys.modules[name]
            raise error(f"{field} file '{module_ref}' fails to import: {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    return module


def source_sha256(function: Callable) -> str:
    """Hash of the file that defines `function`, so editing a user's code invalidates what the cache holds for it."""
    try:
        source = Path(inspect.getsourcefile(function)).read_bytes()
    except (TypeError, OSError):
        source = repr(function).encode()
    return hashlib.sha256(source).hexdigest()

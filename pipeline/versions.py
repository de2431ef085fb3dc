"""Tool versions: recorded in every sidecar and manifest, and part of every cache key."""
from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("edgesmith", "torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "numpy", "torch-pruning",
             "safetensors", "nncf")


@cache
def tool_versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found

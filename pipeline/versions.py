"""Tool versions: the ones that can change a step's output are part of every cache key; the manifests record all."""
from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version

# What a cached artifact depends on: a new release of one of these may export, quantize or compile differently.
# Not the hostname, kernel or Python patch release: a new container or an OS update must reuse the cache.
_OUTPUT_TOOLS = ("edgesmith", "torch", "onnx", "onnxruntime", "onnxscript", "onnxslim", "torch-pruning", "nncf",
                 "apache-tvm", "numpy")
_RECORDED_TOO = ("safetensors", "apache-tvm-ffi")


@cache
def key_versions() -> dict[str, str]:
    """The versions of the tools that can change outputs: part of every step's cache key."""
    return {name: _version(name) for name in _OUTPUT_TOOLS}


@cache
def tool_versions() -> dict[str, str]:
    """Everything worth recording in a manifest or bundle, this machine's Python and platform included."""
    return {"python": platform.python_version(), "platform": platform.platform(), **key_versions(),
            **{name: _version(name) for name in _RECORDED_TOO}}


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"

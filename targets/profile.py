"""Device profiles: one YAML file per device in targets/profiles/ (data, not code), validated like recipes.

Users add their own profile files through `--profiles-dir` or the EDGESMITH_PROFILES environment variable
(os.pathsep-separated directories); a user profile with a built-in's name replaces it.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgesmith.config_files import read_mapping, read_text, validated
from edgesmith.errors import EdgesmithError
from edgesmith.targets.bundle_files.edgesmith_runtime import cpu_model, cpuinfo

BUILTIN_DIR = Path(__file__).parent / "profiles"
PROFILES_ENV = "EDGESMITH_PROFILES"


class ProfileError(EdgesmithError, ValueError):
    """A profile is unknown or invalid; the message names the file, field and valid choices."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Precision = Literal["int8", "fp16", "fp32"]


class TensorRTSettings(_Strict):
    major: int = Field(ge=8, le=11)                   # 8: JetPack 4/5; 10: JetPack 6; 11: strongly typed only
    minor: int | None = Field(default=None, ge=0)     # where flags changed within a major (8.2 vs 8.4+)
    max_opset: int | None = Field(default=None, ge=9)  # None: the newest opset this major's parser imports
    dla_core: int | None = Field(default=None, ge=0)  # None: GPU only; layers DLA cannot run fall back to the GPU
    workspace_mb: int = Field(default=1024, gt=0)
    precisions: list[Precision] = Field(default=["int8", "fp16"], min_length=1)
    min_batch: int = Field(default=1, ge=1)           # the optimization profile for a dynamic batch axis
    opt_batch: int = Field(default=1, ge=1)
    max_batch: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _batch_order(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"needs min_batch ≤ opt_batch ≤ max_batch, got {self.min_batch}, {self.opt_batch}, "
                             f"{self.max_batch}")
        return self


class TVMSettings(_Strict):
    # A TVM target as a dict (TVM 0.27 rejects CLI-style strings); mcpu "native" means this machine's CPU.
    target: dict
    cc: str | None = None            # cross compiler for export_library; None = host compiler

    @field_validator("target")
    @classmethod
    def _has_kind(cls, target: dict) -> dict:
        if "kind" not in target:
            raise ValueError("a TVM target dict needs 'kind', e.g. {kind: llvm, mtriple: aarch64-linux-gnu}")
        return target


class Profile(_Strict):
    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cpu: str = "unknown"
    isa: list[str] = []
    gpu_sm: int | None = None
    memory_gb: float | None = Field(default=None, gt=0)
    backends: list[Literal["onnxruntime", "tvm", "tensorrt"]] = Field(min_length=1)
    quant_scheme: Literal["tensorrt", "ort-x86", "ort-arm"]
    channel_multiple: int = Field(default=8, ge=1)
    threads: int | None = Field(default=None, ge=1)   # None: all cores of the machine it runs on
    tensorrt: TensorRTSettings | None = None
    tvm: TVMSettings | None = None
    rpc_key: str | None = None
    detect_host: bool = False        # fill arch/cpu/isa from the machine this runs on

    @model_validator(mode="after")
    def _backend_settings(self):
        for backend in ("tensorrt", "tvm"):
            if backend in self.backends and getattr(self, backend) is None:
                raise ValueError(f"backend '{backend}' is listed but the profile has no '{backend}:' settings")
        return self

    @property
    def is_host(self) -> bool:
        """This profile describes the machine edgesmith runs on: latency measured here is the device's latency."""
        return self.detect_host


def profile_dirs(extra: list[Path] | None = None) -> list[Path]:
    env = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [BUILTIN_DIR, *env, *(extra or [])]


def _profile_files(extra: list[Path] | None = None) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for directory in profile_dirs(extra):
        if not directory.is_dir():
            raise ProfileError(f"profile directory '{directory}' does not exist; fix {PROFILES_ENV} or --profiles-dir")
        for path in sorted(directory.glob("*.yaml")):
            files[path.stem] = path  # later directories override earlier ones
    return files


def list_profiles(extra: list[Path] | None = None) -> list[str]:
    """The names of every profile `load_profile` can load."""
    return sorted(_profile_files(extra))


def load_profile(name: str, extra: list[Path] | None = None) -> Profile:
    """The device profile `name`: a built-in one, or a YAML file in EDGESMITH_PROFILES / `extra` folders (which win).
    Host profiles (detect_host) get this machine's CPU and ISA filled in."""
    files = _profile_files(extra)
    if name not in files:
        raise ProfileError(f"unknown target '{name}'; valid targets: {', '.join(sorted(files))}")
    return read_profile_file(files[name])


def read_profile_file(path: Path) -> Profile:
    data = read_mapping(read_text(path, "profile", ProfileError), str(path), "a profile", ProfileError)
    data.setdefault("name", path.stem)
    profile = validated(Profile, data, str(path), ProfileError)
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name '{profile.name}' differs from the file name; rename one to match")
    return _with_host_facts(profile) if profile.detect_host else profile


def _with_host_facts(profile: Profile) -> Profile:
    return profile.model_copy(update={"arch": platform.machine(), "cpu": cpu_model(), "isa": _isa_features()})


_INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                      "neon", "asimd", "asimddp", "i8mm", "bf16", "sve")


def _isa_features() -> list[str]:
    fields = cpuinfo()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())   # x86 | ARM
    return [f for f in _INTERESTING_FLAGS if f in flags]

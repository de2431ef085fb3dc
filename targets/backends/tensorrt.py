"""NVIDIA TensorRT, written against the real `tensorrt` Python API (bundle_files/build_tensorrt_engine.py).

Engines are tied to the GPU/SoC and the TensorRT and CUDA versions, so an engine is built here only when TensorRT is
installed and this machine's GPU has the profile's SM. Otherwise (as on a CPU build host) `compile` prepares the
device build: the ONNX file (Q/DQ for INT8; an FP16 ONNX for TensorRT 11's strongly typed FP16), the standalone
builder script, a `trtexec` command line and the settings; the target is then reported as "build on device".
The offline checks run everywhere: the Q/DQ rules for INT8, and op coverage against the profile's TensorRT version.
"""
from __future__ import annotations

import shlex
import shutil
from functools import cache
from pathlib import Path

import onnx
import yaml

from edgesmith.targets.backends import BUNDLE_FILES, BackendError, CompileOptions
from edgesmith.targets.profile import Profile
from edgesmith.targets.qdq_rules import default_opset, validate

NAME = "tensorrt"
ARTIFACT = "model.engine"
ONNX = "model.onnx"
BUILDER = "build_tensorrt_engine.py"
_OPS_FILE = Path(__file__).parent.parent / "tensorrt_ops.yaml"


def precisions(profile: Profile) -> list[str]:
    return list(profile.tensorrt.precisions)


def unavailable_reason(profile: Profile) -> str | None:
    return None  # without TensorRT here, compile prepares the build on the device


def runs_here(profile: Profile) -> bool:
    """TensorRT is installed and this machine's GPU is the profile's SM (an engine runs only where it was built)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and _sm(torch.cuda.get_device_capability()) == profile.gpu_sm


def _sm(capability: tuple[int, int]) -> int:
    return capability[0] * 10 + capability[1]


def loader_files(profile: Profile) -> list[str]:
    return []   # compile already puts the builder script into the compiled folder the bundle is made from


@cache
def _op_table() -> dict:
    table = yaml.safe_load(_OPS_FILE.read_text())
    for entry in table.values():
        if "same_as" in entry:
            entry["supported"] = table[entry["same_as"]]["supported"]
    return table


def coverage(model: onnx.ModelProto, profile: Profile, precision: str) -> list[str]:
    """Every reason TensorRT `profile.tensorrt.major` would refuse the model: opset, unsupported nodes, and for INT8
    the Q/DQ rules (signed int8, zero points 0, per-channel weights on axis 0, per-tensor activations)."""
    settings = profile.tensorrt
    entry = _op_table()[settings.major]
    problems = []
    max_opset = settings.max_opset or entry["max_opset"]
    opset = default_opset(model)
    if opset > max_opset:
        problems.append(f"opset {opset} > {max_opset}, the newest TensorRT {settings.major} on this device imports "
                        f"(export with exporter torchscript and opset {max_opset})")
    supported = set(entry["supported"])
    unsupported: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            unsupported.setdefault(node.op_type, []).append(node.name or f"#{index}")
    problems += [f"op {op} unsupported by TensorRT {settings.major} (nodes {', '.join(nodes[:3])}"
                 f"{', …' if len(nodes) > 3 else ''})" for op, nodes in unsupported.items()]
    if precision == "int8":
        problems += [f"Q/DQ rule: {v}" for v in validate(model, "tensorrt")]
    if profile.gpu_sm is not None and profile.gpu_sm < 61 and precision == "int8":
        problems.append(f"sm_{profile.gpu_sm} has no INT8 kernels (TensorRT INT8 needs sm_61 or newer)")
    return problems


def build_settings(profile: Profile, precision: str) -> dict:
    """What the builder script needs on the device; stored in the bundle's manifest.json."""
    trt = profile.tensorrt
    return {"onnx": ONNX, "engine": ARTIFACT, "precision": precision, "workspace_mb": trt.workspace_mb,
            "dla_core": trt.dla_core, "timing_cache": f"timing-{profile.name}-trt{trt.major}.cache",
            "min_batch": trt.min_batch, "opt_batch": trt.opt_batch, "max_batch": trt.max_batch,
            "tensorrt_major": trt.major}


def trtexec_command(model: onnx.ModelProto, profile: Profile, settings: dict) -> str:
    """The equivalent `trtexec` line, with the flags of the profile's TensorRT version."""
    trt = profile.tensorrt
    args = ["trtexec", f"--onnx={settings['onnx']}", f"--saveEngine={settings['engine']}",
            f"--timingCacheFile={settings['timing_cache']}"]
    # --memPoolSize arrived in TensorRT 8.4; JetPack 4.6 (8.2) still takes --workspace in MiB
    old = (trt.major, trt.minor if trt.minor is not None else 99) < (8, 4)
    args.append(f"--workspace={trt.workspace_mb}" if old else f"--memPoolSize=workspace:{trt.workspace_mb}M")
    if trt.major >= 11:
        args.append("--stronglyTyped")   # types come from the ONNX: Q/DQ for INT8, an FP16 ONNX for FP16
    elif settings["precision"] in ("fp16", "int8"):
        args += ["--fp16"] + (["--int8"] if settings["precision"] == "int8" else [])
    if trt.dla_core is not None:
        args += [f"--useDLACore={trt.dla_core}", "--allowGPUFallback"]
    dynamic = {}
    for tensor in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.type.tensor_type.shape.dim]
        if None in dims:
            dynamic[tensor.name] = dims
    for flag, batch in (("minShapes", trt.min_batch), ("optShapes", trt.opt_batch), ("maxShapes", trt.max_batch)):
        if dynamic:
            shapes = ",".join(f"{name}:{'x'.join(str(batch if d is None else d) for d in dims)}"
                              for name, dims in dynamic.items())
            args.append(f"--{flag}={shapes}")
    return shlex.join(args)


def compile(onnx_path: Path, profile: Profile, out_dir: Path, options: CompileOptions = CompileOptions()) -> dict:
    precision = options.precision
    if precision not in profile.tensorrt.precisions:
        raise BackendError(f"target '{profile.name}' allows TensorRT precisions {profile.tensorrt.precisions}, "
                           f"not '{precision}'")
    model = onnx.load(str(onnx_path))
    problems = coverage(model, profile, precision)
    if problems:
        raise BackendError(f"TensorRT {profile.tensorrt.major} cannot build this model for '{profile.name}': "
                           + "; ".join(problems))
    out_dir.mkdir(parents=True, exist_ok=True)
    if precision == "fp16" and profile.tensorrt.major >= 11:
        _write_fp16_onnx(model, out_dir / ONNX)   # strongly typed: FP16 must be in the file itself
    else:
        shutil.copyfile(onnx_path, out_dir / ONNX)
    shutil.copyfile(BUNDLE_FILES / BUILDER, out_dir / BUILDER)
    settings = build_settings(profile, precision)
    command = trtexec_command(model, profile, settings)
    (out_dir / "trtexec.sh").write_text(f"#!/bin/sh\n# Same engine as {BUILDER}, with NVIDIA's trtexec.\n"
                                        f'cd "$(dirname "$0")" && {command}\n')
    facts = {"tensorrt_build": settings, "trtexec": command, "coverage": "ok", "status": "build on device"}
    if runs_here(profile):
        from edgesmith.targets.bundle_files.build_tensorrt_engine import EngineBuildError, build_engine

        try:
            facts["engine"] = build_engine(out_dir / ONNX, out_dir / ARTIFACT, precision=precision,
                                           workspace_mb=settings["workspace_mb"], dla_core=settings["dla_core"],
                                           timing_cache=out_dir / settings["timing_cache"],
                                           min_batch=settings["min_batch"], opt_batch=settings["opt_batch"],
                                           max_batch=settings["max_batch"])
        except EngineBuildError as exc:
            raise BackendError(str(exc)) from None
        facts["status"] = "built"
    return facts


def _write_fp16_onnx(model: onnx.ModelProto, path: Path) -> None:
    """FP16 weights and compute with float32 inputs/outputs, so callers feed the same arrays as for FP32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(path))


def load(folder: Path, profile: Profile | None = None):
    from edgesmith.targets.bundle_files.edgesmith_runtime import TensorRTModel

    engine = Path(folder) / ARTIFACT
    if not engine.is_file():
        raise BackendError(f"{engine} was not built here (TensorRT absent or another GPU); build it on the device "
                           f"with {BUILDER}")
    model = TensorRTModel(engine)
    model.threads = 1
    return model

#!/usr/bin/env python3
"""Builds a TensorRT engine from this bundle's ONNX file, on the device that will run it.

Engines and timing caches are tied to the GPU/SoC and to the TensorRT and CUDA versions, so they are built where
they run (a Jetson with JetPack, or an NVIDIA container on a desktop GPU). Needs only the `tensorrt` Python package.

  python3 build_tensorrt_engine.py                       # settings from manifest.json next to this script
  python3 build_tensorrt_engine.py --onnx model.onnx --engine model.engine --precision int8 --dla-core 0

TensorRT 8/10 (weakly typed): FP16/INT8 are builder flags; INT8 comes from the Q/DQ nodes (explicit quantization),
never from a calibrator. TensorRT 11 removed weak typing: the network is strongly typed, FP16 means an FP16 ONNX
(in a TensorRT 11 FP16 bundle, model.onnx is already that FP16 file) and INT8 means Q/DQ. Exits non-zero with
TensorRT's own message when parsing or building fails. edgesmith's TensorRT backend imports this same file when
TensorRT is on the build host.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


class EngineBuildError(RuntimeError):
    """Parsing or building failed; the message carries TensorRT's errors."""


def _logger(trt):
    class CollectingLogger(trt.ILogger):
        """Keeps TensorRT's errors so a failure can be reported with its real cause."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return CollectingLogger()


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str = "fp16", workspace_mb: int = 1024,
                 dla_core: int | None = None, timing_cache: Path | None = None, min_batch: int = 1,
                 opt_batch: int = 1, max_batch: int = 8) -> dict:
    import tensorrt as trt

    logger = _logger(trt)
    major = trt_major(trt)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:   # TensorRT 10 and later only have explicit-batch networks
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if major >= 11:  # TensorRT 11: strongly typed is the only mode; types come from the ONNX file
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {'; '.join(errors)}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    else:  # TensorRT ≤ 8.3 (JetPack 4.6)
        config.max_workspace_size = workspace_mb << 20
    if major < 11:  # weak typing: precisions are permissions given to the builder
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)   # layers left unquantized run in FP16 rather than FP32
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)   # scales come from the Q/DQ nodes
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)   # layers DLA cannot run go to the GPU

    dynamic = False
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            dynamic = True
            # Only the batch axis is dynamic in edgesmith's exports; other dims are fixed by the model.
            shapes = [[b if d < 0 else d for d in shape] for b in (min_batch, opt_batch, max_batch)]
            profile.set_shape(tensor.name, *shapes)
    if dynamic:
        config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build the engine: "
                               f"{'; '.join(logger.errors) or 'no error message (see the log above)'}")
    _atomic_write(engine_path, bytes(serialized))
    if timing_cache:
        _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "engine": str(engine_path), "bytes": engine_path.stat().st_size,
            "precision": precision, "dla_core": dla_core, "strongly_typed": major >= 11}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _defaults(here: Path) -> dict:
    """Settings from the bundle's manifest.json, so the script needs no arguments on the device."""
    manifest = here / "manifest.json"
    if not manifest.is_file():
        return {}
    settings = json.loads(manifest.read_text()).get("tensorrt_build", {})
    return {k: (str(here / v) if k in ("onnx", "engine", "timing_cache") and v else v) for k, v in settings.items()}


def main(argv: list[str] | None = None) -> int:
    defaults = _defaults(Path(__file__).resolve().parent)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", default=defaults.get("onnx"), help="ONNX file (Q/DQ for INT8)")
    parser.add_argument("--engine", default=defaults.get("engine", "model.engine"))
    parser.add_argument("--precision", choices=["int8", "fp16", "fp32"], default=defaults.get("precision", "fp16"))
    parser.add_argument("--workspace-mb", type=int, default=defaults.get("workspace_mb", 1024))
    parser.add_argument("--dla-core", type=int, default=defaults.get("dla_core"))
    parser.add_argument("--timing-cache", default=defaults.get("timing_cache"))
    for name, value in (("min", 1), ("opt", 1), ("max", 8)):
        parser.add_argument(f"--{name}-batch", type=int, default=defaults.get(f"{name}_batch", value))
    args = parser.parse_args(argv)
    if not args.onnx:
        parser.error("--onnx is required (no manifest.json next to this script)")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("error: the tensorrt Python package is not installed; run this on the device (JetPack ships it) or "
              "in an NVIDIA TensorRT container", file=sys.stderr)
        return 2
    try:
        facts = build_engine(Path(args.onnx), Path(args.engine), precision=args.precision,
                             workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                             timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                             min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch)
    except EngineBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

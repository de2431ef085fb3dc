"""Benchmark orchestration: load a compiled artifact with its backend and time it with the harness."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import onnx
import torch

from edgesmith.benchmarks.harness import LatencyStats, measure
from edgesmith.errors import first_line
from edgesmith.models import InputSpec
from edgesmith.pipeline import host_lock
from edgesmith.pipeline.cache import atomic_write_json
from edgesmith.pipeline.config import BenchConfig
from edgesmith.pipeline.evaluate import ORT_DTYPES, load_onnx_file
from edgesmith.targets import Profile
from edgesmith.targets.backends import BackendError, CompileOptions, declared_input_shapes, get_backend


def host_latency(onnx_path: Path, specs: tuple[InputSpec, ...], cfg: BenchConfig) -> LatencyStats:
    """ONNX Runtime on this machine with all its cores: the per-stage latency column."""
    return time_runner(get_backend("onnxruntime").load(onnx_path), specs, cfg)


def time_runner(runner, specs: tuple[InputSpec, ...], cfg: BenchConfig) -> LatencyStats:
    generator = torch.Generator().manual_seed(0)
    feeds = {s.name: s.example(cfg.batch_size, generator).numpy() for s in specs}
    with host_lock.measuring():   # parallel jobs sharing this host pause meanwhile
        return measure(lambda: runner(feeds), warmup=cfg.warmup, runs=cfg.runs, batch_size=cfg.batch_size,
                       threads=runner.threads)


def onnx_input_specs(runner, onnx_path: Path, batch: int) -> tuple[InputSpec, ...]:
    """Input specs of any ONNX file (`runner`: it loaded in ONNX Runtime): symbolic axes take the size io.json beside
    it declares, else the batch (axis 0) or 1. Integer inputs (token ids, masks) get zeros and ones, which any
    embedding table accepts."""
    declared = declared_input_shapes(onnx_path)
    specs = []
    for graph_input in runner.session.get_inputs():
        dtype = ORT_DTYPES.get(graph_input.type)
        if dtype is None:
            raise BackendError(f"{onnx_path}: input '{graph_input.name}' is {graph_input.type}; edgesmith bench "
                               f"times {', '.join(ORT_DTYPES)} inputs")
        known = declared.get(graph_input.name)
        shape = [d if isinstance(d, int) else (known[axis] if known else 1)
                 for axis, d in enumerate(graph_input.shape)]
        specs.append(InputSpec(graph_input.name, (batch, *shape[1:]), dtype))
    return tuple(specs)


def onnx_precision(onnx_path: Path) -> str:
    """int8 for a Q/DQ file, else fp32: what a backend is asked to build from it."""
    return "int8" if any(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_path)).graph.node) else "fp32"


def compile_for(backend, onnx_path: Path, profile: Profile, folder: Path, options: CompileOptions) -> dict:
    """Compiles into `folder` with compile.json beside the artifact (what the backend's load() reads), the way every
    run and bench builds one; a tuned TVM build times candidates, so it holds the host alone meanwhile. Between its
    phases the build lets a parallel job's timing go first."""
    options = dataclasses.replace(options, pause_point=host_lock.pause_point)
    with host_lock.measuring() if options.tuning_trials else contextlib.nullcontext():
        facts = backend.compile(onnx_path, profile, folder, options)
    atomic_write_json(folder / "compile.json", facts)
    return facts


def bench_onnx(onnx_path: Path, profile: Profile, cfg: BenchConfig, work_dir: Path, *,
               backends: list[str] | None = None, precision: str | None = None) -> list[dict]:
    """Latency of any ONNX file with every backend of a host profile that runs here (or `backends`), through the
    pipeline's own compile, load and timing loop (the same statistics as a run's rows). A backend that cannot run it
    is a row with its reason. `precision`: what the backends build (fp16 from an FP32 file); default the file's."""
    specs = onnx_input_specs(load_onnx_file(onnx_path), onnx_path, cfg.batch_size)
    precision = precision or onnx_precision(onnx_path)
    rows = []
    for name in backends or profile.backends:
        backend = get_backend(name)
        row = {"file": str(onnx_path), "target": profile.name, "backend": name, "precision": precision,
               "batch": cfg.batch_size, "inputs": {s.name: list(s.shape) for s in specs}}
        reason = backend.unavailable_reason(profile) or (None if backend.runs_here(profile) else
                                                         f"{name} for '{profile.name}' runs on the device only")
        if reason:
            rows.append({**row, "status": f"skipped: {reason}"})
            continue
        folder = work_dir / name
        try:
            compile_for(backend, onnx_path, profile, folder, CompileOptions(precision=precision,
                                                                            batch_size=cfg.batch_size))
            stats = time_runner(backend.load(folder, profile), specs, cfg)
        except (BackendError, RuntimeError, ValueError) as exc:
            rows.append({**row, "status": f"failed: {first_line(exc)}"})
            continue
        rows.append({**row, "status": "ok", "latency_ms": stats.to_dict()})
    return rows

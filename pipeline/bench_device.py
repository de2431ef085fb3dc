"""`edgesmith bench FILE.onnx --target BOARD --rpc-tracker HOST:PORT`: any ONNX file timed on a board.

Each backend of the board's profile compiles the file for the board, the result goes into a bundle (the same format
`edgesmith run` ships, with parity references from ONNX Runtime on this host for random inputs), and the board's
bundle server (`edgesmith_runtime.py --rpc-server`) checks parity and times it there, as in a run."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from edgesmith.benchmarks.harness import summarize
from edgesmith.errors import first_line
from edgesmith.pipeline import bundle
from edgesmith.pipeline.bench import compile_for, onnx_input_specs, onnx_precision
from edgesmith.pipeline.config import BenchConfig, CompileConfig
from edgesmith.pipeline.deploy import describe, tolerance
from edgesmith.pipeline.evaluate import load_onnx_file
from edgesmith.pipeline.versions import tool_versions
from edgesmith.targets import Profile, device
from edgesmith.targets.backends import BackendError, CompileOptions, DeviceUnreachable, get_backend


def bench_on_device(onnx_path: Path, profile: Profile, cfg: BenchConfig, tracker: str, work_dir: Path, *,
                    backends: list[str] | None = None, precision: str | None = None) -> list[dict]:
    """One row per backend of the profile (or `backends`): latency measured on the device (None on an emulated one),
    its parity against ONNX Runtime on this host, or why it was skipped or failed. `precision` as in bench_onnx."""
    runner, precision = load_onnx_file(onnx_path), precision or onnx_precision(onnx_path)
    specs = onnx_input_specs(runner, onnx_path, cfg.batch_size)
    generator = torch.Generator().manual_seed(0)
    inputs = {s.name: s.example(cfg.batch_size, generator).numpy() for s in specs}
    reference = runner(inputs)
    io_spec = {"inputs": [s.to_dict() for s in specs],
               "outputs": [{"name": o.name, "dtype": "float32"} for o in runner.session.get_outputs()]}
    rows = []
    for name in backends or profile.backends:
        backend = get_backend(name)
        row = {"file": str(onnx_path), "target": profile.name, "backend": name, "precision": precision,
               "batch": cfg.batch_size, "inputs": {s.name: list(s.shape) for s in specs}}
        reason = backend.unavailable_reason(profile)
        if reason:
            rows.append({**row, "status": f"skipped: {reason}"})
            continue
        folder = work_dir / name
        try:
            facts = compile_for(backend, onnx_path, profile, folder / "compiled",
                                CompileOptions(precision=precision, batch_size=cfg.batch_size))
            (folder / "parity").mkdir()
            bundle.save_parity_data(folder / "parity", inputs, reference, reference)
            (folder / "bundle").mkdir()
            bundle.write(folder / "bundle", profile=profile, candidate=_candidate(name, precision, folder, facts),
                         io_spec=io_spec, model=onnx_path.stem, recipe="edgesmith bench", versions=tool_versions())
            result = device.measure_bundle(tracker, profile.rpc_key, folder / "bundle", warmup=cfg.warmup,
                                           runs=cfg.runs, batch_size=cfg.batch_size, threads=profile.threads or 0)
        except DeviceUnreachable:
            raise
        except (BackendError, RuntimeError, ValueError) as exc:
            rows.append({**row, "status": f"failed: {first_line(exc)}"})
            continue
        facts = result["device"]
        emulated = facts.get("emulated") or result["samples_ms"] is None
        latency = None if emulated else summarize(result["samples_ms"], warmup=cfg.warmup, batch_size=cfg.batch_size,
                                                  threads=result["threads"], peak_rss=result["peak_rss_mb"]).to_dict()
        rows.append({**row, "status": "ok" if result["parity"]["passed"] else "failed: parity on the device",
                     "latency_ms": latency, "parity": {k: result["parity"].get(k) for k in ("passed", "max_abs_diff")},
                     "measured_on": ("emulated " if facts.get("emulated") else "") + describe(facts)})
    return rows


def _candidate(backend: str, precision: str, folder: Path, facts: dict) -> SimpleNamespace:
    """What bundle.write reads of a run's candidate, for a file compiled outside a run."""
    return SimpleNamespace(
        backend=backend, precision=precision, status="edgesmith bench", host_parity=None, device_parity=None,
        fidelity=None, latency=None, measured_on=None, device=None,
        compiled=SimpleNamespace(artifact=folder / "compiled", facts={"compile": facts}),
        checked=SimpleNamespace(artifact=folder / "parity",
                                facts={"tolerance": tolerance(CompileConfig(), precision, top1=False)}))

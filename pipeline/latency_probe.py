"""Latency measured on the device a prune stage's latency budget names: on this host for a host profile, on the board
through the RPC tracker (its bundle server) otherwise, with the backend and precision that device would ship. Never
estimated: a device that cannot be measured (a board without a tracker, an emulated board) is refused before any
pruning work, in one line that says what to start."""
from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from edgesmith.errors import ExportError, TargetError
from edgesmith.models import InputSpec
from edgesmith.pipeline.bench import compile_for, time_runner
from edgesmith.pipeline.bench_device import bench_on_device
from edgesmith.pipeline.config import BenchConfig, CompileConfig, ExportConfig
from edgesmith.pipeline.deploy import host_description
from edgesmith.pipeline.export import export_onnx
from edgesmith.pipeline.stages.ptq import quantize_file
from edgesmith.targets import Profile
from edgesmith.targets.backends import CompileOptions, get_backend

# Host timings interleave candidates round by round, so that every candidate sees the same machine state (this host
# is shared and noisy); a candidate's latency is the median of its rounds' p50s.
MIN_RUNS_PER_ROUND = 20


def latency_device(profile: Profile, backend: str | None, compile_cfg: CompileConfig, quantizes: bool) \
        -> tuple[str, str]:
    """(backend, precision) the device would ship: the precision is the first of compile.precisions that the backend
    builds (int8 only when the recipe quantizes); the backend is `backend`, or the first of the profile's backends
    that builds a precision the recipe allows."""
    for name in [backend] if backend else profile.backends:
        offered = get_backend(name).precisions(profile)
        allowed = [p for p in compile_cfg.precisions if p in offered and (quantizes or p != "int8")]
        if allowed:
            return name, allowed[0]
    raise TargetError(f"prune.latency: no backend of '{profile.name}' ({', '.join(profile.backends)}) builds a "
                      f"precision the recipe allows ({', '.join(compile_cfg.precisions)}); fix compile.precisions or "
                      "prune.latency.backend")


@dataclass
class LatencyProbe:
    profile: Profile
    backend: str
    precision: str
    bench: BenchConfig
    export: ExportConfig
    tracker: str | None        # HOST:PORT of the RPC tracker the board is registered at (None: a host profile)
    tables_dir: Path           # cached per-layer latency tables

    @property
    def label(self) -> str:
        return f"{self.profile.name} {self.backend}/{self.precision}"

    def device_key(self) -> dict:
        """What the measurements depend on: the device (this host, or the tracker and key), backend, precision and
        timing settings. Part of the cache keys of latency tables and latency-budget stages."""
        where = host_description() if self.profile.is_host else f"rpc {self.tracker} key {self.profile.rpc_key}"
        return {"profile": self.profile.model_dump(mode="json"), "device": where, "backend": self.backend,
                "precision": self.precision, "bench": self.bench.model_dump(mode="json")}

    def onnx(self, model: nn.Module, specs: tuple[InputSpec, ...], path: Path, calibration=None, *,
             fast: bool = True) -> Path:
        """The file the device runs for `model`: its FP32 export, quantized in the profile's INT8 scheme when the
        precision is int8 (calibrated on `calibration`: feeds, as PTQ does; the scales do not change the speed).
        `fast`: search candidates go through the TorchScript exporter (0.4–0.7 s against 2–8 s for dynamo on
        resnet18 and mobilenet_v2 here; ONNX Runtime fuses both graphs into the same kernels); the chosen model is
        exported with the recipe's own settings and measured again."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fp32 = path.with_name(f"{path.stem}-fp32.onnx") if self.precision == "int8" else path
        export = self.export.model_copy(update={"exporter": "torchscript"}) if fast else self.export
        try:
            export_onnx(model, specs, export, fp32)
        except ExportError:
            if not fast:
                raise
            export_onnx(model, specs, self.export, fp32)
        if self.precision == "int8":
            quantize_file(fp32, path, self.profile.quant_scheme, _Feeds(calibration or []))
            fp32.unlink()
        return path

    def measure(self, files: dict[str, Path], specs: tuple[InputSpec, ...], rounds: int) -> dict[str, float]:
        """p50 milliseconds of each file on the device; on this host interleaved over `rounds` rounds (a board is
        not shared with edgesmith's own work: one measurement each)."""
        if self.profile.is_host:
            return self._on_host(files, specs, rounds)
        return {label: self._on_board(path) for label, path in files.items()}

    def _on_host(self, files: dict[str, Path], specs: tuple[InputSpec, ...], rounds: int) -> dict[str, float]:
        backend = get_backend(self.backend)
        compiled = {}
        for label, path in files.items():
            folder = path.with_name(f"{path.stem}-{self.backend}")
            shutil.rmtree(folder, ignore_errors=True)
            compile_for(backend, path, self.profile, folder, CompileOptions(precision=self.precision,
                                                                            batch_size=self.bench.batch_size))
            compiled[label] = folder
        per_round = self.bench.model_copy(update={"runs": max(MIN_RUNS_PER_ROUND, self.bench.runs // rounds)})
        p50s: dict[str, list[float]] = {label: [] for label in files}
        for _ in range(rounds):
            for label, folder in compiled.items():
                runner = backend.load(folder, self.profile)
                p50s[label].append(time_runner(runner, specs, per_round).p50)
                del runner   # its thread pool goes before the next candidate's starts
        return {label: statistics.median(values) for label, values in p50s.items()}

    def _on_board(self, path: Path) -> float:
        work = path.with_name(f"{path.stem}-device")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        row = bench_on_device(path, self.profile, self.bench, self.tracker, work, backends=[self.backend],
                              precision=self.precision)[0]
        if not row["status"] == "ok":
            raise TargetError(f"prune.latency: {self.label} cannot run a candidate on the device ({row['status']})")
        if row["latency_ms"] is None:
            raise TargetError(f"prune.latency: the device with RPC key '{self.profile.rpc_key}' at {self.tracker} is "
                              f"{row['measured_on']}: emulated timings are not latency; register the real board "
                              "under that key, or prune by prune.ratio")
        return row["latency_ms"]["p50"]


class _Feeds:
    """ORT's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)

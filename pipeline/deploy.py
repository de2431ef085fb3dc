"""Per-device choice: every (backend, precision) a target's profile and the recipe allow is a candidate; candidates
that compile and pass parity are kept, and the fastest measured one is bundled. Latency is measured where the device
is this machine, or on the device itself through a TVM RPC tracker; otherwise the profile's preference decides and
the choice is marked "not measured". An emulated device checks parity but its timings are never latency."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.harness import summarize
from pipeline.progress import console
from pipeline.recipe import BenchConfig, CompileConfig
from targets import Profile
from targets.backends import BackendError, get_backend

NOT_MEASURED = "not measured"


@dataclass
class Candidate:
    backend: str
    precision: str
    source: object | None            # the Step of the ONNX it compiles (export or the scheme's qat/ptq)
    status: str = "pending"          # chosen | passed | build on device | failed | skipped
    reason: str | None = None
    compiled: object | None = None   # compile Step
    checked: object | None = None    # check Step: parity and latency sidecar (this host)
    device: dict | None = None       # measured on the device over RPC: device facts, parity, latency_ms (or None)

    @property
    def host_parity(self) -> dict | None:
        return self.checked.sidecar.get("parity") if self.checked else None

    @property
    def device_parity(self) -> dict | None:
        return self.device["parity"] if self.device else None

    @property
    def parity(self) -> dict | None:
        """Where the artifact was run: on the device if it was, else on this host (None: run nowhere yet)."""
        return self.device_parity or self.host_parity

    @property
    def latency(self) -> dict | None:
        if self.device:
            return self.device["latency_ms"]   # None when the device is emulated
        return self.checked.sidecar.get("latency_ms") if self.checked else None

    @property
    def measured_on(self) -> str | None:
        if self.device:
            facts = self.device["device"]
            return f"emulated {describe(facts)}: parity only" if facts.get("emulated") else describe(facts)
        return self.checked.sidecar.get("measured_on") if self.checked else None

    @property
    def latency_p50(self) -> float | None:
        return self.latency["p50"] if self.latency else None

    @property
    def usable(self) -> bool:
        """Compiled, not failed on the device, and passed parity wherever it ran (run nowhere: checked on the device
        by its bundle)."""
        return self.compiled is not None and self.status != "failed" and all(
            p is None or p["passed"] for p in (self.host_parity, self.device_parity))

    @property
    def build_on_device(self) -> bool:
        return self.compiled is not None and self.compiled.sidecar["compile"].get("status") == "build on device"

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"


def describe(device_facts: dict) -> str:
    """A device as the results show it: `hostname (machine, CPU)`; the facts come from edgesmith_runtime."""
    return f"{device_facts['hostname']} ({device_facts['machine']}, {device_facts['cpu'] or 'CPU unknown'})"


def candidates(profile: Profile, cfg: CompileConfig, fp32, int8: dict) -> list[Candidate]:
    """Backends in the profile's order × precisions in the recipe's order: the preference order."""
    found = []
    for backend in profile.backends:
        offered = get_backend(backend).precisions(profile)
        for precision in cfg.precisions:
            if precision not in offered:
                continue
            source = int8.get(profile.quant_scheme) if precision == "int8" else fp32
            candidate = Candidate(backend, precision, source)
            if source is None:
                candidate.status, candidate.reason = "skipped", "no INT8 model: the recipe has no qat/ptq stage"
            found.append(candidate)
    return found


def tolerance(cfg: CompileConfig, precision: str) -> dict:
    return {"max_rel_diff": cfg.max_rel_diff.get(precision, cfg.max_rel_diff["fp32"]),
            "min_top1_agreement": cfg.min_top1_agreement}


def choose(found: list[Candidate]) -> Candidate | None:
    """The fastest usable candidate when every usable one was measured on the device; otherwise the first usable
    one in preference order (timing some candidates and not others would favour whatever could be timed)."""
    usable = [c for c in found if c.usable]
    measured = bool(usable) and all(c.latency_p50 is not None for c in usable)
    chosen = min(usable, key=lambda c: c.latency_p50) if measured else (usable[0] if usable else None)
    for c in found:
        if c.status == "pending":
            c.status = ("build on device" if c.build_on_device else "passed") if c.usable else "failed"
    if chosen is not None:
        chosen.status = ("chosen" + (", build on device" if chosen.build_on_device else "")
                         + ("" if measured else f" ({NOT_MEASURED}: profile preference)"))
    return chosen


def failure_summary(profile: Profile, found: list[Candidate]) -> str:
    reasons = "; ".join(f"{c.label}: {c.reason or 'parity failed'}" for c in found) or "no candidates"
    return f"target '{profile.name}': no backend × precision passed ({reasons})"


def measure_on_device(profile: Profile, found: list[Candidate], tracker: str, bench: BenchConfig,
                      write_bundle: Callable[[Path, Candidate], None]) -> None:
    """Every candidate that can run on the device goes there through the TVM RPC tracker, as a bundle run by the
    bundle's own loader: parity on the device, then latency. Not cached: devices change under the same key."""
    from targets.backends.tvm import DeviceUnreachable, measure_on_device as measure_remote

    for c in (c for c in found if c.usable):   # TensorRT "build on device" ones are built there first
        with tempfile.TemporaryDirectory(prefix="edgesmith-device-") as tmp:
            write_bundle(Path(tmp), c)
            try:
                result = measure_remote(tracker, profile.rpc_key, Path(tmp), warmup=bench.warmup, runs=bench.runs,
                                        batch_size=bench.batch_size, threads=profile.threads or 0)
            except DeviceUnreachable as exc:
                console.print(f"[yellow]! {profile.name}: not measured on the device:[/] {exc}")
                return
            except BackendError as exc:
                c.status, c.reason = "failed", str(exc)
                console.print(f"[yellow]✘ {profile.name} {c.label}[/] {exc}")
                continue
        samples = result.pop("samples_ms")
        # An emulator's timings say nothing about the device's speed: parity only.
        result["latency_ms"] = None if result["device"].get("emulated") or samples is None else summarize(
            samples, warmup=bench.warmup, batch_size=bench.batch_size, threads=result["threads"],
            peak_rss=result["peak_rss_mb"]).to_dict()
        c.device = result
        verdict = "parity ok" if result["parity"]["passed"] else "parity FAILED"
        timing = f"p50 {result['latency_ms']['p50']:.3f} ms" if result["latency_ms"] else "no latency (emulated)"
        console.print(f"[green]✔ {profile.name} {c.label}[/] on {c.measured_on}: {verdict}, {timing}")

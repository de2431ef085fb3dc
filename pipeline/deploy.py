"""Per-device choice and the per-target steps (compile, check, bundle).

Every (backend, precision) a target's profile and the recipe allow is a candidate; candidates that compile and pass
parity are kept, and the fastest measured one is bundled. Latency is measured where the device is this machine, or on
the device itself through a TVM RPC tracker; otherwise the profile's preference decides and the choice is marked
"not measured". An emulated device checks parity but its timings are never latency."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

from edgesmith.benchmarks.harness import summarize
from edgesmith.errors import first_line
from edgesmith.pipeline import bundle
from edgesmith.pipeline.bench import compile_for, host_latency, time_runner
from edgesmith.pipeline.config import BenchConfig, CompileConfig
from edgesmith.pipeline.context import ONNX_FILE, RunContext
from edgesmith.pipeline.evaluate import feeds
from edgesmith.pipeline.fidelity import OUTPUTS_FILE
from edgesmith.pipeline.progress import info, warn
from edgesmith.pipeline.steps import Built, Metrics, Step
from edgesmith.pipeline.versions import tool_versions
from edgesmith.targets import Profile, device
from edgesmith.targets.backends import BackendError, CompileOptions, DeviceUnreachable, get_backend
from edgesmith.targets.bundle_files.edgesmith_runtime import compare, device_facts, fidelity, read_outputs

NOT_MEASURED = "not measured"


@dataclass
class Candidate:
    backend: str
    precision: str
    source: object | None            # the Step of the ONNX it compiles (export or the scheme's qat/ptq)
    status: str = "pending"          # chosen | passed | build on device | failed | skipped
    reason: str | None = None
    compiled: object | None = None   # compile Step
    checked: object | None = None    # check Step: parity and latency facts (this host)
    device: dict | None = None       # measured on the device over RPC: device facts, parity, latency_ms (or None)

    @property
    def host_parity(self) -> dict | None:
        return self.checked.facts["parity"] if self.checked else None

    @property
    def device_parity(self) -> dict | None:
        return self.device["parity"] if self.device else None

    @property
    def parity(self) -> dict | None:
        """Where the artifact was run: on the device if it was, else on this host (None: run nowhere yet)."""
        return self.device_parity or self.host_parity

    @property
    def fidelity(self) -> dict | None:
        """Against the reference model's outputs on the parity inputs, where the artifact was run."""
        return (self.parity or {}).get("fidelity")

    @property
    def latency(self) -> dict | None:
        if self.device:
            return self.device["latency_ms"]   # None when the device is emulated
        return self.checked.metrics.latency_ms if self.checked else None

    @property
    def measured_on(self) -> str | None:
        if self.device:
            facts = self.device["device"]
            return f"emulated {describe(facts)}: parity only" if facts.get("emulated") else describe(facts)
        return self.checked.metrics.measured_on if self.checked else None

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
        return self.compiled is not None and self.compiled.facts["compile"].get("status") == "build on device"

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"


def describe(facts: dict) -> str:
    """A device as the results show it: `hostname (machine, CPU)`; the facts come from edgesmith_runtime."""
    return f"{facts['hostname']} ({facts['machine']}, {facts['cpu'] or 'CPU unknown'})"


@cache
def host_description() -> str:
    """This machine as the results show it, and the host part of the keys of steps that measure here (read once per
    process: every latency and check step asks for it)."""
    return describe(device_facts())


def onnx_label(step) -> str:
    """The results label of a deployable ONNX step: `export` (FP32), or `<qat|ptq>:<scheme>` (INT8)."""
    return "export" if step.kind == "export" else f"{step.kind}:{step.metrics.scheme}"


def candidates(profile: Profile, cfg: CompileConfig, fp32, int8: dict, int8_rejected: dict[str, str] | None = None) \
        -> list[Candidate]:
    """Backends in the profile's order × precisions in the recipe's order: the preference order. An INT8 file that
    failed its fidelity gate (`int8_rejected`) gives no candidate a source."""
    found = []
    for backend in profile.backends:
        offered = get_backend(backend).precisions(profile)
        for precision in cfg.precisions:
            if precision not in offered:
                continue
            source = int8.get(profile.quant_scheme) if precision == "int8" else fp32
            candidate = Candidate(backend, precision, source)
            if source is None:
                rejected = (int8_rejected or {}).get(profile.quant_scheme)
                candidate.status, candidate.reason = "skipped", (
                    "the INT8 file failed its fidelity gate" if rejected
                    else "no INT8 model: the recipe has no qat/ptq stage")
            found.append(candidate)
    return found


def tolerance(cfg: CompileConfig, precision: str, *, top1: bool) -> dict:
    """`top1`: the outputs are class scores; top-1 agreement says nothing of an embedding or a score map."""
    return {"max_rel_diff": cfg.max_rel_diff.get(precision, cfg.max_rel_diff["fp32"]),
            "min_top1_agreement": cfg.min_top1_agreement if top1 else None}


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
    reasons = "; ".join(f"{c.label}: {c.reason or _parity_problem(c)}" for c in found) or "no candidates"
    return f"target '{profile.name}': no backend × precision passed ({reasons})"


def _parity_problem(c: Candidate) -> str:
    problem = (c.parity or {}).get("problem")
    return f"parity failed ({problem})" if problem else "parity failed"


def measure_on_device(profile: Profile, found: list[Candidate], tracker: str, bench: BenchConfig,
                      write_bundle: Callable[[Path, Candidate], None]) -> None:
    """Every candidate that can run on the device goes there through the TVM RPC tracker, as a bundle run by the
    bundle's own loader: parity on the device, then latency. Not cached: devices change under the same key."""
    for c in (c for c in found if c.usable):   # TensorRT "build on device" ones are built there first
        with tempfile.TemporaryDirectory(prefix="edgesmith-device-") as tmp:
            write_bundle(Path(tmp), c)
            try:
                result = device.measure_bundle(tracker, profile.rpc_key, Path(tmp), warmup=bench.warmup,
                                               runs=bench.runs, batch_size=bench.batch_size,
                                               threads=profile.threads or 0)
            except DeviceUnreachable as exc:
                warn(f"! {profile.name}: not measured on the device: {exc}")
                return
            except BackendError as exc:
                c.status, c.reason = "failed", str(exc)
                warn(f"✘ {profile.name} {c.label}: {exc}")
                continue
        samples = result.pop("samples_ms")
        # An emulator's timings say nothing about the device's speed: parity only.
        result["latency_ms"] = None if result["device"].get("emulated") or samples is None else summarize(
            samples, warmup=bench.warmup, batch_size=bench.batch_size, threads=result["threads"],
            peak_rss=result["peak_rss_mb"]).to_dict()
        c.device = result
        verdict = "parity ok" if result["parity"]["passed"] else "parity FAILED"
        timing = f"p50 {result['latency_ms']['p50']:.3f} ms" if result["latency_ms"] else "no latency (emulated)"
        info(f"[green]✔ {profile.name} {c.label}[/] on {c.measured_on}: {verdict}, {timing}")


def target_step(ctx: RunContext, profile: Profile, fp32: Step, int8: dict[str, Step]) -> str | None:
    """Every backend × precision the profile and recipe allow; the chosen one becomes bundles/<profile>/.
    Returns why the target has no usable candidate (None when it has one), so other targets still run."""
    recipe = ctx.recipe
    found = candidates(profile, recipe.compile, fp32, int8, ctx.int8_rejected)
    for candidate in found:
        if candidate.status == "pending":
            _compile_and_check(ctx, profile, candidate)
    if recipe.compile.rpc_tracker and profile.rpc_key and not profile.is_host:
        measure_on_device(profile, found, recipe.compile.rpc_tracker, recipe.bench,
                          lambda folder, c: _write_bundle(ctx, folder, profile, c))
    chosen = choose(found)
    for c in found:
        measured = Metrics(precision=c.precision, parity=c.parity, fidelity=c.fidelity, latency_ms=c.latency,
                           measured_on=c.measured_on)
        ctx.row(onnx_label(c.source) if c.source else "-", (c.source.metrics if c.source else Metrics()).merged(
            measured), target=profile.name, backend=c.backend,
            status=c.status if not c.reason else f"{c.status}: {c.reason}", artifact=_artifact(ctx, profile, c),
            bundle=ctx.out_dir / "bundles" / profile.name if c is chosen else None)
    if chosen is None:
        return failure_summary(profile, found)
    _bundle_step(ctx, profile, chosen)
    return None


def candidate_folder(ctx: RunContext, profile: Profile, candidate: Candidate) -> Path:
    return ctx.out_dir / "targets" / profile.name / f"{candidate.backend}-{candidate.precision}"


def _artifact(ctx: RunContext, profile: Profile, candidate: Candidate) -> Path | None:
    """The compiled file (a TensorRT engine built on the device: the ONNX it is built from), if compiled."""
    if candidate.compiled is None:
        return None
    folder = candidate_folder(ctx, profile, candidate)
    name = get_backend(candidate.backend).ARTIFACT
    return folder / (name if (candidate.compiled.artifact / name).is_file() else ONNX_FILE)


def _compile_and_check(ctx: RunContext, profile: Profile, candidate: Candidate) -> None:
    backend = get_backend(candidate.backend)
    reason = backend.unavailable_reason(profile)
    if reason:
        candidate.status, candidate.reason = "skipped", reason
        return
    runs_here = backend.runs_here(profile)
    options = CompileOptions(precision=candidate.precision, batch_size=ctx.recipe.bench.batch_size,
                             tuning_trials=ctx.recipe.compile.tvm.tuning_trials
                             if candidate.backend == "tvm" and runs_here else 0,
                             tuning_dir=ctx.store.root / "tvm-tuning")
    source = candidate.source

    def build(tmp: Path) -> Built:
        facts = compile_for(backend, source.artifact / ONNX_FILE, profile, tmp, options)
        return Built(facts={"compile": facts, "profile": profile.name})

    label = f"{profile.name} {candidate.label}"
    try:
        candidate.compiled = ctx.steps.run("compile", f"compile {label}", {
            "input": source.key, "profile": profile.model_dump(mode="json"), "backend": candidate.backend,
            "options": options.key_parts(),
            # tuning times candidates on this host: its result is this host's, and it runs alone here
            "host": host_description() if options.tuning_trials else None},
            build, candidate_folder(ctx, profile, candidate))
    except BackendError as exc:
        candidate.status, candidate.reason = "failed", str(exc)
        warn(f"✘ {label}: {exc}")
        return
    try:
        candidate.checked = _check_step(ctx, profile, candidate, runs_here)
    except (BackendError, RuntimeError, ValueError) as exc:   # the runtime refuses the inputs: a failed candidate
        candidate.status, candidate.reason = "failed", f"running it failed: {first_line(exc)}"
        warn(f"✘ {label}: {candidate.reason}")


def _check_step(ctx: RunContext, profile: Profile, candidate: Candidate, runs_here: bool) -> Step:
    """Parity of the compiled artifact against ONNX Runtime on its source ONNX (where it runs here) and its
    latency (only where the device is this machine). The parity inputs and references go into the bundle."""
    cfg = ctx.recipe.compile
    limits = tolerance(cfg, candidate.precision, top1=ctx.reference.facts["top1"])
    measure_here = runs_here and profile.is_host
    timed = host_latency_step(ctx, candidate.source) if measure_here and _runs_as_host_latency(profile, candidate) \
        else None
    specs = ctx.specs(candidate.source)

    def build(tmp: Path) -> Built:
        data = ctx.dataset(specs)
        xs, _ = next(data.batches(data.val, cfg.parity_samples))
        inputs = feeds(xs, specs)
        reference = get_backend("onnxruntime").load(candidate.source.artifact / ONNX_FILE)(inputs)
        original = [o[:len(xs[0])] for o in read_outputs(ctx.reference.artifact / OUTPUTS_FILE)]
        bundle.save_parity_data(tmp, inputs, reference, original)
        parity, metrics = None, Metrics()
        if runs_here:
            runner = get_backend(candidate.backend).load(candidate.compiled.artifact, profile)
            outputs = runner(inputs)
            parity = {**compare(outputs, reference, limits), "fidelity": fidelity(outputs, original)}
            if measure_here and parity["passed"]:
                metrics = Metrics(latency_ms=time_runner(runner, specs, ctx.recipe.bench).to_dict(),
                                  measured_on=host_description()) if timed is None else \
                    Metrics(latency_ms=timed.metrics.latency_ms, measured_on=timed.metrics.measured_on)
        return Built(metrics, {"parity": parity, "tolerance": limits})

    return ctx.steps.run("check", f"check {profile.name} {candidate.label}", {
        "compiled": candidate.compiled.key, "data": ctx.data_key(), "samples": cfg.parity_samples,
        "reference": ctx.reference.key, "tolerance": limits, "runs_here": runs_here,
        **({"latency": timed.key} if timed else {"bench": ctx.recipe.bench.model_dump(mode="json"),
                                                  "host": host_description() if measure_here else None})}, build)


def _runs_as_host_latency(profile: Profile, candidate: Candidate) -> bool:
    """An ONNX Runtime candidate of a host profile that keeps the host's thread count runs its source's very bytes
    (ORT's compile copies the file) in the session host_latency_step times: timing it again would only add a
    second, noisier figure for the same thing (and hold the host alone once more)."""
    return candidate.backend == "onnxruntime" and profile.threads is None and \
        candidate.compiled.files.get(ONNX_FILE) == candidate.source.files.get(ONNX_FILE)


def host_latency_step(ctx: RunContext, holder: Step) -> Step:
    """ONNX Runtime latency on this host (all its cores) of the ONNX file a step holds: the per-stage latency
    column, and the timing of a host profile's ORT candidate. Keyed by the file's bytes, not by the step that holds
    it, so one file is timed once per host: an export's copy of its ONNX step's file shows that step's figure."""
    def build(tmp: Path) -> Built:
        stats = host_latency(holder.artifact / ONNX_FILE, ctx.specs(holder), ctx.recipe.bench)
        return Built(Metrics(latency_ms=stats.to_dict(), measured_on=host_description()))

    return ctx.steps.run("latency", f"host latency of {holder.kind}", {
        "onnx": holder.files[ONNX_FILE]["sha256"], "inputs": ctx.io_spec(holder)["inputs"],
        "bench": ctx.recipe.bench.model_dump(mode="json"), "host": host_description()}, build)


def _write_bundle(ctx: RunContext, folder: Path, profile: Profile, candidate: Candidate) -> None:
    model = ctx.recipe.model
    bundle.write(folder, profile=profile, candidate=candidate, io_spec=ctx.io_spec(candidate.source),
                 recipe=ctx.recipe.name, model=model.name or model.factory or "model", versions=tool_versions())


def _bundle_step(ctx: RunContext, profile: Profile, chosen: Candidate) -> Step:
    def build(tmp: Path) -> Built:
        _write_bundle(ctx, tmp, profile, chosen)
        return Built()

    folder = ctx.out_dir / "bundles" / profile.name
    step = ctx.steps.run("bundle", f"bundle {profile.name} {chosen.label}", {
        "compiled": chosen.compiled.key, "checked": chosen.checked.key, "status": chosen.status,
        "device": chosen.device, "model": ctx.recipe.model.name, "recipe": ctx.recipe.name}, build, folder)
    (folder / "sidecar.json").unlink(missing_ok=True)  # cache bookkeeping, not a bundle file
    return step

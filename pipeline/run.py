"""The whole pipeline order in one function (`run`); each step is cached by content and published to the run
folder as soon as it finishes, so a failure or kill later loses nothing already done."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from models import InputSpec
from pipeline import bundle, deploy, report
from pipeline.bench import host_latency, time_runner
from pipeline.cache import Store, atomic_write_json, atomic_write_text, content_key, file_sha256, publish
from pipeline.data import Dataset, load_dataset
from pipeline.errors import CheckpointError, TargetError
from pipeline.evaluate import feeds, model_size, model_sparsity, onnx_accuracy, torch_accuracy
from pipeline.export import check_parity, export_onnx, onnx_size, write_io_spec
from pipeline.model_source import (build_model, input_specs, load_model_artifact, save_model_artifact,
                                   source_fingerprint)
from pipeline.progress import console
from pipeline.recipe import Recipe, stage_tag
from pipeline.stages import StageContext, ptq, qat, stage_functions
from pipeline.versions import tool_versions
from targets import Profile, ProfileError, load_profile
from targets.backends import BackendError, CompileOptions, get_backend
from targets.bundle_files.edgesmith_runtime import compare, device_facts

ONNX_FILE = "model.onnx"


@dataclass
class Step:
    kind: str
    key: str
    artifact: Path
    cached: bool
    seconds: float
    sidecar: dict


@dataclass
class RunResult:
    out_dir: Path
    steps: list[Step]
    rows: list[dict]

    @property
    def executed(self) -> list[str]:
        return [s.kind for s in self.steps if not s.cached]


def run(recipe: Recipe, out_dir: Path, cache_dir: Path, *, use_cache: bool = True) -> RunResult:
    ctx = _RunContext(recipe, Path(out_dir), Store(cache_dir), use_cache)
    with ctx.reporting():  # results of finished steps are written even when a later step fails
        artifact = ctx.model_step()
        teacher = None  # the model as it enters the first compression stage
        for index, stage in enumerate(recipe.model_stages, start=1):
            teacher = teacher or (artifact if stage.kind != "train" else None)
            artifact = ctx.stage_step(index, stage, artifact, teacher)
        fp32 = ctx.export_step(artifact)
        int8 = {scheme: ctx.quantize_step(recipe.quantization, scheme, artifact, fp32, teacher or artifact)
                for scheme in ctx.schemes}
        failures = [reason for profile in ctx.profiles if (reason := ctx.target_step(profile, fp32, int8))]
        if failures:  # raised after every target ran, so one device's failure costs the others nothing
            raise TargetError("; ".join(failures))
    return RunResult(ctx.out_dir, ctx.steps, ctx.rows)


@dataclass
class _RunContext:
    recipe: Recipe
    out_dir: Path
    store: Store
    use_cache: bool
    steps: list[Step] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    measured: dict[str, Step] = field(default_factory=dict)   # model step key → its measure step
    _data: Dataset | None = None

    def __post_init__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.store.sweep_stale()
        atomic_write_text(self.out_dir / "recipe.yaml", self.recipe.to_yaml())
        try:  # profiles are resolved before any work, so a bad one costs nothing
            self.profiles: list[Profile] = [load_profile(t) for t in self.recipe.targets]
        except ProfileError as exc:
            raise TargetError(str(exc)) from None
        # Pruned channel counts suit every target: the least common multiple of their channel multiples.
        self.channel_multiple = math.lcm(*(p.channel_multiple for p in self.profiles)) if self.profiles else 1
        quant = self.recipe.quantization
        self.schemes = (quant.schemes or list(dict.fromkeys(p.quant_scheme for p in self.profiles))) if quant else []

    # ---- the steps -------------------------------------------------------------------------------------------
    def model_step(self) -> Step:
        cfg = self.recipe.model
        checkpoint = self._file_hash(cfg.checkpoint) if cfg.checkpoint else None
        key = content_key("model", cfg.model_dump(mode="json"), source_fingerprint(cfg), checkpoint, tool_versions())

        def build(tmp: Path, sidecar: dict) -> None:
            model = build_model(cfg)
            specs = input_specs(model, cfg)
            save_model_artifact(model, cfg, specs, tmp)
            sidecar["metrics"] = self._measure_torch(model, specs, evaluate=cfg.checkpoint is not None)

        folder = self.out_dir / "stages" / "00-model"
        step = self._cached("model", key, build, folder, {"checkpoint_sha256": checkpoint})
        if cfg.checkpoint:  # an untrained model's accuracy says nothing: it gets no row
            self._row("model", {**step.sidecar["metrics"], **self.measure_step(step, folder).sidecar["metrics"]})
        return step

    def stage_step(self, index: int, stage, previous: Step, teacher: Step | None) -> Step:
        key = content_key(stage.kind, previous.key, stage.model_dump(mode="json"), self._data_key(),
                          teacher.key if teacher else None, self._teacher_hash(stage), self.channel_multiple,
                          tool_versions())

        def build(tmp: Path, sidecar: dict) -> None:
            model, specs = load_model_artifact(previous.artifact)
            context = self._stage_context(specs, teacher, index)
            result = stage_functions()[stage_tag(stage)](stage, model, self.dataset(specs), context)
            save_model_artifact(result.model, self.recipe.model, specs, tmp)
            sidecar["stage_metrics"] = result.metrics
            sidecar["metrics"] = self._measure_torch(result.model, specs, evaluate=True)

        folder = self.out_dir / "stages" / f"{index:02d}-{stage.kind}"
        step = self._cached(stage.kind, key, build, folder, {"input": previous.key})
        self._row(stage.kind, {**step.sidecar["metrics"], **self.measure_step(step, folder).sidecar["metrics"]})
        return step

    def measure_step(self, model_step: Step, folder: Path) -> Step:
        """ONNX size (raw and zipped) and host ONNX Runtime latency of a stage's model; no gate, no training."""
        export = self.recipe.export.model_dump(mode="json", exclude={"parity"})
        key = content_key("measure", model_step.key, export, self.recipe.bench.model_dump(mode="json"),
                          _host_fingerprint(), tool_versions())

        def build(tmp: Path, sidecar: dict) -> None:
            model, specs = load_model_artifact(model_step.artifact)
            sidecar["export"] = export_onnx(model, specs, self.recipe.export, tmp / ONNX_FILE)
            sidecar["metrics"] = {**onnx_size(tmp / ONNX_FILE), "latency_ms": self._host_latency(tmp, specs)}

        step = self._cached("measure", key, build, folder / "onnx", {"input": model_step.key})
        self.measured[model_step.key] = step
        return step

    def export_step(self, previous: Step) -> Step:
        """The final FP32 model's ONNX (the file its measure step already wrote) through the parity gate."""
        cfg = self.recipe.export
        measured = self.measured.get(previous.key) or self.measure_step(previous, self.out_dir / "stages" / "00-model")
        key = content_key("export", measured.key, cfg.model_dump(mode="json"), self._data_key(), tool_versions())

        def build(tmp: Path, sidecar: dict) -> None:
            model, specs = load_model_artifact(previous.artifact)
            shutil.copyfile(measured.artifact / ONNX_FILE, tmp / ONNX_FILE)
            facts = measured.sidecar["export"]
            write_io_spec(tmp / "io.json", specs, facts["outputs"])
            batch = self.recipe.data.eval_batch_size
            data = self.dataset(specs)
            parity = check_parity(model, tmp / ONNX_FILE, data, specs, cfg.parity, batch)
            sidecar["export"] = facts
            sidecar["metrics"] = {**previous.sidecar["metrics"], **measured.sidecar["metrics"], "parity": parity,
                                  "accuracy": self._onnx_accuracy(tmp, specs), "precision": "fp32"}

        step = self._cached("export", key, build, self.out_dir / "export", {"input": previous.key})
        self._row("export", step.sidecar["metrics"])
        return step

    def quantize_step(self, stage, scheme: str, model_step: Step, fp32: Step, teacher: Step) -> Step:
        """QAT or PTQ for one quantization scheme: an INT8 Q/DQ ONNX that passes the scheme's rules."""
        config = stage.model_dump(mode="json", exclude={"schemes"})  # one scheme more must not redo the others
        key = content_key(stage.kind, scheme, model_step.key, fp32.key, config, self._data_key(), teacher.key,
                          self.recipe.export.model_dump(mode="json"), self.recipe.bench.model_dump(mode="json"),
                          _host_fingerprint(), tool_versions())

        def build(tmp: Path, sidecar: dict) -> None:
            model, specs = load_model_artifact(model_step.artifact)
            context = self._stage_context(specs, teacher, len(self.recipe.stages))
            if stage.kind == "qat":
                facts = qat.run(stage, scheme, model, self.dataset(specs), context, self.recipe.export,
                                tmp / ONNX_FILE)
            else:
                facts = ptq.run(stage, scheme, fp32.artifact / ONNX_FILE, self.dataset(specs), context,
                                tmp / ONNX_FILE)
            shutil.copyfile(fp32.artifact / "io.json", tmp / "io.json")
            sidecar["stage_metrics"] = facts
            sidecar["metrics"] = {**model_step.sidecar["metrics"], **onnx_size(tmp / ONNX_FILE),
                                  "accuracy": self._onnx_accuracy(tmp, specs), "parity": facts.get("parity"),
                                  "latency_ms": self._host_latency(tmp, specs), "precision": "int8",
                                  "scheme": scheme}

        step = self._cached(stage.kind, key, build, self.out_dir / "stages" / f"{len(self.recipe.stages):02d}-"
                            f"{stage.kind}-{scheme}", {"input": model_step.key, "fp32": fp32.key})
        self._row(_onnx_label(step), step.sidecar["metrics"])
        return step

    def target_step(self, profile: Profile, fp32: Step, int8: dict[str, Step]) -> str | None:
        """Every backend × precision the profile and recipe allow; the chosen one becomes bundles/<profile>/.
        Returns why the target has no usable candidate (None when it has one), so other targets still run."""
        found = deploy.candidates(profile, self.recipe.compile, fp32, int8)
        for candidate in found:
            if candidate.status == "pending":
                self._compile_and_check(profile, candidate)
        if self.recipe.compile.rpc_tracker and profile.rpc_key and not profile.is_host:
            deploy.measure_on_device(profile, found, self.recipe.compile.rpc_tracker, self.recipe.bench,
                                     lambda folder, c: self._write_bundle(folder, profile, c))
        chosen = deploy.choose(found)
        for c in found:
            source = c.source.sidecar["metrics"] if c.source else {}
            self._row(_onnx_label(c.source) if c.source else "-", {
                **source, "precision": c.precision, "parity": c.parity, "latency_ms": c.latency,
                "measured_on": c.measured_on},
                target=profile.name, backend=c.backend, status=c.status if not c.reason else f"{c.status}: {c.reason}")
        if chosen is None:
            return deploy.failure_summary(profile, found)
        self._bundle_step(profile, chosen)
        return None

    def _compile_and_check(self, profile: Profile, candidate: deploy.Candidate) -> None:
        backend = get_backend(candidate.backend)
        reason = backend.unavailable_reason(profile)
        if reason:
            candidate.status, candidate.reason = "skipped", reason
            return
        runs_here = backend.runs_here(profile)
        options = CompileOptions(precision=candidate.precision, batch_size=self.recipe.bench.batch_size,
                                 tuning_trials=self.recipe.compile.tvm.tuning_trials
                                 if candidate.backend == "tvm" and runs_here else 0,
                                 tuning_dir=self.store.root / "tvm-tuning")
        source = candidate.source
        key = content_key("compile", source.key, profile.model_dump(mode="json"), candidate.backend,
                          {**options.__dict__, "tuning_dir": None}, tool_versions())

        def build_compiled(tmp: Path, sidecar: dict) -> None:
            facts = backend.compile(source.artifact / ONNX_FILE, profile, tmp, options)
            atomic_write_json(tmp / "compile.json", facts)   # what load() needs beside the artifact
            sidecar["compile"], sidecar["profile"] = facts, profile.name

        folder = self.out_dir / "targets" / profile.name / f"{candidate.backend}-{candidate.precision}"
        try:
            candidate.compiled = self._cached("compile", key, build_compiled, folder, {"input": source.key})
        except BackendError as exc:
            candidate.status, candidate.reason = "failed", str(exc)
            console.print(f"[yellow]✘ {profile.name} {candidate.label}[/] {exc}")
            return
        candidate.checked = self._check_step(profile, candidate, runs_here)

    def _check_step(self, profile: Profile, candidate: deploy.Candidate, runs_here: bool) -> Step:
        """Parity of the compiled artifact against ONNX Runtime on its source ONNX (where it runs here) and its
        latency (only where the device is this machine). The parity inputs and references go into the bundle."""
        tolerance = deploy.tolerance(self.recipe.compile, candidate.precision)
        measure_here = runs_here and profile.is_host
        key = content_key("check", candidate.compiled.key, self._data_key(), self.recipe.compile.parity_samples,
                          tolerance, self.recipe.bench.model_dump(mode="json"), runs_here,
                          _host_fingerprint() if measure_here else None)
        specs = self.specs(candidate.source)

        def build(tmp: Path, sidecar: dict) -> None:
            data = self.dataset(specs)
            xs, _ = next(data.batches(data.val, self.recipe.compile.parity_samples))
            inputs = feeds(xs, specs)
            reference = get_backend("onnxruntime").load(candidate.source.artifact / ONNX_FILE)(inputs)
            bundle.save_parity_data(tmp, inputs, reference)
            sidecar.update(tolerance=tolerance, parity=None, latency_ms=None, measured_on=None)
            if runs_here:
                runner = get_backend(candidate.backend).load(candidate.compiled.artifact, profile)
                sidecar["parity"] = compare(runner(inputs), reference, tolerance)
                if measure_here and sidecar["parity"]["passed"]:
                    sidecar["latency_ms"] = time_runner(runner, specs, self.recipe.bench).to_dict()
                    sidecar["measured_on"] = _host_fingerprint()

        return self._cached("check", key, build, None, {"input": candidate.compiled.key})

    def _write_bundle(self, folder: Path, profile: Profile, candidate: deploy.Candidate) -> None:
        io_spec = json.loads((candidate.source.artifact / "io.json").read_text())
        bundle.write(folder, profile=profile, candidate=candidate, io_spec=io_spec, recipe=self.recipe.name,
                     model=self.recipe.model.name or self.recipe.model.factory or "model", versions=tool_versions())

    def _bundle_step(self, profile: Profile, chosen: deploy.Candidate) -> Step:
        key = content_key("bundle", chosen.compiled.key, chosen.checked.key, chosen.status, chosen.device,
                          self.recipe.model.name, self.recipe.name)

        def build(tmp: Path, sidecar: dict) -> None:
            self._write_bundle(tmp, profile, chosen)

        step = self._cached("bundle", key, build, self.out_dir / "bundles" / profile.name,
                            {"input": chosen.compiled.key})
        (self.out_dir / "bundles" / profile.name / "sidecar.json").unlink(missing_ok=True)  # not a bundle file
        return step

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _cached(self, kind: str, key: str, build: Callable[[Path, dict], None], publish_to: Path | None,
                inputs: dict) -> Step:
        start = time.time()
        artifact = self.store.get(kind, key) if self.use_cache else None
        cached = artifact is not None
        if not cached:
            console.print(f"[bold cyan]▶ {kind}[/] running")
            if not self.use_cache:
                self.store.discard(kind, key)
            sidecar = {"kind": kind, "inputs": inputs, "recipe": self.recipe.name, "versions": tool_versions()}
            with self.store.build(kind, key, sidecar) as tmp:
                build(tmp, sidecar)
            artifact = self.store.get(kind, key)
        step = Step(kind, key, artifact, cached, time.time() - start, self.store.sidecar(artifact))
        console.print(f"[green]✔ {kind}[/] {'cached' if cached else 'done'} in {step.seconds:.1f}s")
        if publish_to is not None:
            publish(artifact, publish_to)
        self.steps.append(step)
        return step

    def _row(self, stage: str, metrics: dict, *, target: str | None = None, backend: str | None = None,
             status: str | None = None) -> None:
        """One results row; a compression stage's row is checked against the accuracy budget at once."""
        self.rows.append(report.row(stage, metrics, target=target, backend=backend, status=status))
        if target is None:
            report.check_budget(self.rows, self.recipe.budget.max_accuracy_drop)

    def dataset(self, specs: tuple[InputSpec, ...]) -> Dataset:
        """Loaded on first use only: a fully cached re-run never reads the data set."""
        if self._data is None:
            self._data = load_dataset(self.recipe.data, specs)
        return self._data

    def specs(self, step: Step) -> tuple[InputSpec, ...]:
        return tuple(InputSpec.from_dict(s) for s in json.loads((step.artifact / "io.json").read_text())["inputs"])

    def _stage_context(self, specs, teacher: Step | None, index: int) -> StageContext:
        """`index`: the stage's position in the recipe; magnitude pruning before it means zeros must stay."""
        sparse = any(stage_tag(s) == "prune-magnitude" for s in self.recipe.stages[:index - 1])
        return StageContext(specs=specs, eval_batch_size=self.recipe.data.eval_batch_size,
                            channel_multiple=self.channel_multiple, keep_sparsity=sparse,
                            load_teacher=lambda: load_model_artifact(teacher.artifact)[0] if teacher else None)

    def _measure_torch(self, model, specs, *, evaluate: bool) -> dict:
        params, macs = model_size(model, specs)
        accuracy = torch_accuracy(model, self.dataset(specs), self.recipe.data.eval_batch_size) if evaluate else None
        return {"accuracy": accuracy, "params": params, "macs": macs, "sparsity": model_sparsity(model)}

    def _onnx_accuracy(self, folder: Path, specs) -> float | None:
        runner = get_backend("onnxruntime").load(folder / ONNX_FILE)
        return onnx_accuracy(runner, self.dataset(specs), specs, self.recipe.data.eval_batch_size)

    def _host_latency(self, folder: Path, specs) -> dict:
        return host_latency(folder / ONNX_FILE, specs, self.recipe.bench).to_dict()

    def _data_key(self) -> dict:
        cfg = self.recipe.data.model_dump(mode="json")
        if self.recipe.data.path:
            cfg["content"] = _path_fingerprint(self.recipe.data.path)
        return cfg

    def _teacher_hash(self, stage) -> str | None:
        teacher = getattr(stage, "teacher", None)
        return self._file_hash(teacher.checkpoint) if teacher and teacher.checkpoint else None

    def _file_hash(self, path: Path) -> str:
        if not Path(path).is_file():
            raise CheckpointError(f"checkpoint '{path}' does not exist; fix the checkpoint path in the recipe")
        return file_sha256(Path(path))

    @contextlib.contextmanager
    def reporting(self):
        """Writes results and manifest at the end, and also when a step fails or overspends the budget, so
        everything finished stays described and usable."""
        try:
            yield
        finally:
            report.write(self.out_dir, self.recipe, self.steps, self.rows, self.started)


def _onnx_label(step: Step) -> str:
    """The results label of a deployable ONNX step: `export` (FP32), or `<qat|ptq>:<scheme>` (INT8)."""
    return "export" if step.kind == "export" else f"{step.kind}:{step.sidecar['metrics']['scheme']}"


def _host_fingerprint() -> str:
    return deploy.describe(device_facts())


def _path_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of a data path: cheap, and changes when the data does."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.exists()]

"""The whole pipeline order in one function (`run`), and the model-side steps. Each step is cached by content and
published to the run folder as soon as it finishes, so a failure or kill later loses nothing already done. The
per-target steps (compile, check, bundle) are in pipeline/deploy.py."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgesmith.errors import CheckpointError, TargetError
from edgesmith.pipeline import deploy
from edgesmith.pipeline.context import IO_SPEC, ONNX_FILE, RunContext
from edgesmith.pipeline.evaluate import (
    model_size,
    model_sparsity,
    onnx_accuracy,
    onnx_outputs,
    torch_accuracy,
    torch_outputs,
)
from edgesmith.pipeline.export import check_parity, export_onnx, onnx_size, write_io_spec
from edgesmith.pipeline.fidelity import OUTPUTS_FILE, collect_outputs, compare_outputs, int8_gate, save_outputs
from edgesmith.pipeline.latency_probe import LatencyProbe, latency_device
from edgesmith.pipeline.latency_search import SEARCH_VERSION
from edgesmith.pipeline.model_source import (
    build_model,
    input_specs,
    load_model_artifact,
    save_model_artifact,
    source_fingerprint,
)
from edgesmith.pipeline.progress import warn
from edgesmith.pipeline.recipe import Recipe
from edgesmith.pipeline.stages import StageContext, entry_for, stage_tag
from edgesmith.pipeline.steps import Built, Metrics, Step
from edgesmith.targets.backends import get_backend
from edgesmith.targets.bundle_files.edgesmith_runtime import file_sha256, read_outputs

LATENCY_TABLES = "latency-tables"   # in the cache folder: measured per-layer latency tables, reused across runs


@dataclass
class RunResult:
    out_dir: Path
    steps: list[Step]
    rows: list[dict]      # as in results.json

    @property
    def executed(self) -> list[str]:
        """The kinds of the steps this run built (`model`, `train`, `compile`, …), in order."""
        return [s.kind for s in self.steps if not s.cached]

    @property
    def executed_labels(self) -> list[str]:
        """The steps this run built, each once, by name (`train (stage 1)`, `compile x86-host tvm/int8`)."""
        return list(dict.fromkeys(s.label for s in self.steps if not s.cached))

    @property
    def bundles(self) -> dict[str, Path]:
        """target → the bundle folder to ship."""
        return {r["target"]: self.out_dir / r["bundle"] for r in self.rows if r.get("bundle")}


def run(recipe: Recipe, out_dir: Path, cache_dir: Path, *, use_cache: bool = True,
        on_step: Callable[[str], None] | None = None, force: bool = False) -> RunResult:
    ctx = RunContext.open(recipe, out_dir, cache_dir, use_cache, on_step, force)
    with ctx.reporting():  # results of finished steps are written even when a later step fails
        stages = recipe.model_stages
        trained = _leading_train_stages(stages)
        model = model_step(ctx)
        # The reference: the model as it enters the first compression stage (after any train stages). Every
        # later row's fidelity is measured against its outputs, and label-free fine-tuning distils from it.
        teacher = model if trained == 0 else None
        ctx.reference = outputs_step(ctx, model) if teacher else None
        if recipe.model.checkpoint:  # an untrained model's accuracy says nothing: it gets no row
            model_row(ctx, "model", model, ctx.out_dir / "stages" / "00-model")
        for index, stage in enumerate(stages, start=1):
            model = stage_step(ctx, index, stage, model, teacher)
            if index == trained:
                teacher, ctx.reference = model, outputs_step(ctx, model)
            model_row(ctx, stage.kind, model, ctx.out_dir / "stages" / f"{index:02d}-{stage.kind}")
        fp32 = export_step(ctx, model)
        int8 = {scheme: step for scheme in ctx.schemes if (step := quantize_step(ctx, scheme, model, fp32, teacher))}
        failures = [reason for profile in ctx.profiles if (reason := deploy.target_step(ctx, profile, fp32, int8))]
        if failures:  # raised after every target ran, so one device's failure costs the others nothing
            raise TargetError("; ".join(failures))
    return RunResult(ctx.out_dir, ctx.steps.done, ctx.rows)


def _leading_train_stages(stages: list) -> int:
    return next((i for i, s in enumerate(stages) if s.kind != "train"), len(stages))


def model_step(ctx: RunContext) -> Step:
    cfg = ctx.recipe.model
    checkpoint = _checkpoint_sha256(cfg.checkpoint) if cfg.checkpoint else None

    def build(tmp: Path) -> Built:
        model = build_model(cfg)
        specs = input_specs(model, cfg)
        save_model_artifact(model, cfg, specs, tmp)
        return Built(_torch_metrics(ctx, model, specs, evaluate=cfg.checkpoint is not None))

    return ctx.steps.run("model", f"model {cfg.name or cfg.factory}", {
        "config": cfg.model_dump(mode="json"), "source": source_fingerprint(cfg), "checkpoint": checkpoint,
        "metric": ctx.metric_key()}, build, ctx.out_dir / "stages" / "00-model")


def model_row(ctx: RunContext, label: str, step: Step, folder: Path) -> None:
    """A torch model's row: its own metrics, its ONNX file's size and host latency, and fidelity to the reference."""
    ctx.row(label, step.metrics.merged(*_onnx_metrics(ctx, step, folder), fidelity_metrics(ctx, step)),
            artifact=folder / "onnx" / ONNX_FILE)


def outputs_step(ctx: RunContext, subject: Step) -> Step:
    """The outputs of a torch model step or an ONNX step on the first validation inputs (export.parity.samples of
    them): what every fidelity figure compares. `top1`: whether they are class scores the task metric ranks."""
    # as many as the parity gate and the bundles' parity inputs use: both compare with these
    samples = max(ctx.recipe.export.parity.samples, ctx.recipe.compile.parity_samples)
    batch = ctx.recipe.data.eval_batch_size

    def build(tmp: Path) -> Built:
        if (subject.artifact / ONNX_FILE).is_file():
            specs = ctx.specs(subject)
            run_model = onnx_outputs(get_backend("onnxruntime").load(subject.artifact / ONNX_FILE), specs)
        else:
            model, specs = load_model_artifact(subject.artifact)
            run_model = torch_outputs(model)
        data = ctx.dataset(specs)
        outputs = collect_outputs(run_model, data, samples, batch)
        save_outputs(tmp / OUTPUTS_FILE, outputs)
        return Built(facts={"top1": ctx.task_metric.is_top1(outputs[0], data), "labelled": data.labelled,
                            "samples": len(outputs[0])})

    if subject.key not in ctx.outputs_steps:   # asked for by several rows: one step, one progress line
        ctx.outputs_steps[subject.key] = ctx.steps.run("outputs", f"outputs of {subject.kind}", {
            "subject": subject.key, "data": ctx.data_key(), "samples": samples, "metric": ctx.metric_key()}, build)
    return ctx.outputs_steps[subject.key]


def fidelity_metrics(ctx: RunContext, subject: Step) -> Metrics:
    """Fidelity of a step's outputs to the reference model's (none before the reference exists)."""
    if ctx.reference is None:
        return Metrics()
    return Metrics(fidelity=compare_outputs(read_outputs(outputs_step(ctx, subject).artifact / OUTPUTS_FILE),
                                            read_outputs(ctx.reference.artifact / OUTPUTS_FILE)))


def stage_step(ctx: RunContext, index: int, stage, previous: Step, teacher: Step | None) -> Step:
    teacher_file = getattr(getattr(stage, "teacher", None), "checkpoint", None)
    probe = _latency_probe(ctx, stage)

    def build(tmp: Path) -> Built:
        model, specs = load_model_artifact(previous.artifact)
        context = _stage_context(ctx, specs, teacher, index, out_dir=tmp, latency_probe=probe)
        result = entry_for(stage).run(stage, model, ctx.dataset(specs), context)
        save_model_artifact(result.model, ctx.recipe.model, specs, tmp)
        return Built(_torch_metrics(ctx, result.model, specs, evaluate=True).merged(
            Metrics(latency_budget=result.metrics.get("latency_budget"))), {"stage_metrics": result.metrics})

    # a latency budget's result depends on the device it was measured on (and minimise on the accuracy budget)
    measured = {"latency": {**probe.device_key(), "budget": ctx.recipe.budget.model_dump(mode="json"),
                            "search": SEARCH_VERSION}} if probe else {}
    return ctx.steps.run(stage.kind, f"{stage_tag(stage)} (stage {index})", {
        "input": previous.key, "config": stage.model_dump(mode="json"), "data": ctx.data_key(),
        "teacher": teacher.key if teacher else None,
        "teacher_checkpoint": _checkpoint_sha256(teacher_file) if teacher_file else None,
        "channel_multiple": ctx.channel_multiple, "metric": ctx.metric_key(), **measured},
        build, ctx.out_dir / "stages" / f"{index:02d}-{stage.kind}")


def _latency_probe(ctx: RunContext, stage) -> LatencyProbe | None:
    """What measures a prune stage's latency budget on its device (None: the stage has none)."""
    budget = getattr(stage, "latency", None)
    if budget is None:
        return None
    profile = next(p for p in ctx.profiles if p.name == budget.target)
    recipe = ctx.recipe
    backend, precision = latency_device(profile, budget.backend, recipe.compile, recipe.quantization is not None)
    return LatencyProbe(profile, backend, precision, recipe.bench, recipe.export, recipe.compile.rpc_tracker,
                        ctx.store.root / LATENCY_TABLES)


def onnx_step(ctx: RunContext, model_step: Step, folder: Path) -> Step:
    """A model's ONNX file (the export settings, no parity gate); depends on no host."""
    export = ctx.recipe.export.model_dump(mode="json", exclude={"parity"})

    def build(tmp: Path) -> Built:
        model, specs = load_model_artifact(model_step.artifact)
        facts = export_onnx(model, specs, ctx.recipe.export, tmp / ONNX_FILE)
        write_io_spec(tmp / IO_SPEC, specs, facts["outputs"])
        return Built(Metrics(**onnx_size(tmp / ONNX_FILE)), {"export": facts})

    step = ctx.steps.run("onnx", f"onnx of {model_step.kind}", {"input": model_step.key, "export": export}, build,
                         folder / "onnx")
    ctx.onnx_steps[model_step.key] = step
    return step


def _onnx_metrics(ctx: RunContext, model_step: Step, folder: Path) -> tuple[Metrics, Metrics]:
    onnx = onnx_step(ctx, model_step, folder)
    return onnx.metrics, deploy.host_latency_step(ctx, onnx).metrics


def export_step(ctx: RunContext, previous: Step) -> Step:
    """The final FP32 model's ONNX (the file its ONNX step already wrote) through the parity gate."""
    cfg = ctx.recipe.export
    onnx = ctx.onnx_steps.get(previous.key) or onnx_step(ctx, previous, ctx.out_dir / "stages" / "00-model")

    def build(tmp: Path) -> Built:
        model, specs = load_model_artifact(previous.artifact)
        for name in (ONNX_FILE, IO_SPEC):
            shutil.copyfile(onnx.artifact / name, tmp / name)
        parity = check_parity(model, tmp / ONNX_FILE, ctx.dataset(specs), specs, cfg.parity,
                              ctx.recipe.data.eval_batch_size, top1=ctx.reference.facts["top1"])
        measured = Metrics(parity=parity, accuracy=_onnx_accuracy(ctx, tmp, specs), precision="fp32")
        return Built(previous.metrics.merged(onnx.metrics, measured), onnx.facts)   # no host latency: no host

    step = ctx.steps.run("export", "export (parity gate)", {
        "onnx": onnx.key, "config": cfg.model_dump(mode="json"), "data": ctx.data_key(),
        "metric": ctx.metric_key(), "reference": ctx.reference.key}, build, ctx.out_dir / "export")
    ctx.row("export", step.metrics.merged(deploy.host_latency_step(ctx, onnx).metrics, fidelity_metrics(ctx, step)),
            artifact=ctx.out_dir / "export" / ONNX_FILE)
    return step


def quantize_step(ctx: RunContext, scheme: str, model_step: Step, fp32: Step, teacher: Step) -> Step | None:
    """QAT or PTQ for one quantization scheme: an INT8 Q/DQ ONNX that passes the scheme's rules, then the INT8
    fidelity gate against the FP32 model it quantizes. A file that fails the gate stays in the run folder with its
    row, and is never compiled or bundled (None)."""
    stage = ctx.recipe.quantization
    index = len(ctx.recipe.stages)

    def build(tmp: Path) -> Built:
        model, specs = load_model_artifact(model_step.artifact)
        context = _stage_context(ctx, specs, teacher, index, scheme=scheme, fp32_onnx=fp32.artifact / ONNX_FILE,
                                 out_dir=tmp, export=ctx.recipe.export)
        result = entry_for(stage).run(stage, model, ctx.dataset(specs), context)
        shutil.copyfile(fp32.artifact / IO_SPEC, tmp / IO_SPEC)
        return Built(model_step.metrics.merged(Metrics(
            **onnx_size(tmp / ONNX_FILE), accuracy=_onnx_accuracy(ctx, tmp, specs), parity=result.metrics.get("parity"),
            precision="int8", scheme=scheme)), {"stage_metrics": result.metrics})

    folder = ctx.out_dir / "stages" / f"{index:02d}-{stage.kind}-{scheme}"
    step = ctx.steps.run(stage.kind, f"{stage.kind} {scheme}", {
        "model": model_step.key, "fp32": fp32.key, "config": stage.model_dump(mode="json", exclude={"schemes"}),
        "scheme": scheme, "data": ctx.data_key(), "teacher": teacher.key, "metric": ctx.metric_key(),
        "export": ctx.recipe.export.model_dump(mode="json")},   # one scheme more must not redo the others
        build, folder)
    int8_out, fp32_out = (read_outputs(outputs_step(ctx, s).artifact / OUTPUTS_FILE) for s in (step, fp32))
    reference = read_outputs(ctx.reference.artifact / OUTPUTS_FILE)
    vs_fp32, fidelity = compare_outputs(int8_out, fp32_out), compare_outputs(int8_out, reference)
    # QAT trained on labels alone is meant to change the model: its metric and the budget judge it, not fidelity
    gated = not (stage.kind == "qat" and not stage.distill and ctx.reference.facts.get("labelled"))
    problem = int8_gate(vs_fp32, fidelity, compare_outputs(fp32_out, reference), ctx.recipe.export.parity,
                        top1=ctx.reference.facts["top1"], label=f"{stage.kind} {scheme}") if gated else None
    if problem:
        warn(f"✘ {problem}")
        ctx.int8_rejected[scheme] = problem
    ctx.row(deploy.onnx_label(step), step.metrics.merged(
        deploy.host_latency_step(ctx, step).metrics, Metrics(fidelity=fidelity, int8_vs_fp32={
            **vs_fp32, "passed": not problem, "gated": gated})),
        status=f"failed: {problem}" if problem else None, artifact=folder / ONNX_FILE)
    return None if problem else step


def _stage_context(ctx: RunContext, specs, teacher: Step | None, index: int, **quantization) -> StageContext:
    """`index`: the stage's position in the recipe; magnitude pruning before it means zeros must stay."""
    sparse = any(stage_tag(s) == "prune-magnitude" for s in ctx.recipe.stages[:index - 1])
    return StageContext(specs=specs, eval_batch_size=ctx.recipe.data.eval_batch_size,
                        channel_multiple=ctx.channel_multiple, keep_sparsity=sparse,
                        max_accuracy_drop=ctx.recipe.budget.max_accuracy_drop,
                        load_teacher=lambda: load_model_artifact(teacher.artifact)[0] if teacher else None,
                        metric=ctx.task_metric, **quantization)


def _torch_metrics(ctx: RunContext, model, specs, *, evaluate: bool) -> Metrics:
    params, macs = model_size(model, specs)
    accuracy = (torch_accuracy(model, ctx.dataset(specs), ctx.recipe.data.eval_batch_size, ctx.task_metric)
                if evaluate else None)
    return Metrics(accuracy=accuracy, params=params, macs=macs, sparsity=model_sparsity(model))


def _onnx_accuracy(ctx: RunContext, folder: Path, specs) -> float | None:
    runner = get_backend("onnxruntime").load(folder / ONNX_FILE)
    return onnx_accuracy(runner, ctx.dataset(specs), specs, ctx.recipe.data.eval_batch_size, ctx.task_metric)


def _checkpoint_sha256(path: Path) -> str:
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; fix the checkpoint path in the recipe")
    return file_sha256(Path(path))

"""ONNX export with an explicit exporter, checks on the written file, and the torch↔ONNX Runtime parity gate."""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from edgesmith.errors import ExportError, ParityError, first_line
from edgesmith.models import InputSpec
from edgesmith.pipeline import host_lock
from edgesmith.pipeline.config import ExportConfig, ParityConfig
from edgesmith.pipeline.data import Dataset
from edgesmith.pipeline.evaluate import onnx_outputs, torch_outputs
from edgesmith.pipeline.fidelity import collect_outputs
from edgesmith.pipeline.model_source import output_tensors
from edgesmith.pipeline.progress import quiet
from edgesmith.targets.backends.onnxruntime import OrtRunner
from edgesmith.targets.bundle_files.edgesmith_runtime import fidelity, nonfinite_count

EXAMPLE_BATCH = 2  # ≥ 2: with batch 1 the exporter may specialise the batch axis (DESIGN.md §3)


def output_names(model: nn.Module, specs: tuple[InputSpec, ...]) -> list[str]:
    with torch.inference_mode():
        count = len(output_tensors(model(*(s.example(EXAMPLE_BATCH) for s in specs))))
    return ["logits"] if count == 1 else [f"output_{i}" for i in range(count)]


def export_onnx(model: nn.Module, specs: tuple[InputSpec, ...], cfg: ExportConfig, path: Path) -> dict:
    """Writes one self-contained ONNX file at `path` (atomically) and returns facts about it."""
    model = model.eval()
    outputs = output_names(model, specs)
    example = tuple(s.example(EXAMPLE_BATCH, torch.Generator().manual_seed(0)) for s in specs)
    axes = {s.name: dict(s.dynamic_axes) for s in specs}
    axes.update({name: {0: "batch"} for name in outputs if any("batch" in a.values() for a in axes.values())})
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        with quiet("torch", "onnxscript", hide_warnings=True, hide_stderr=True):   # graph dumps on failure
            if cfg.exporter == "dynamo":
                torch.onnx.export(model, example, str(tmp), dynamo=True, external_data=False, opset_version=cfg.opset,
                                  input_names=[s.name for s in specs], output_names=outputs, dynamic_axes=axes,
                                  verbose=False, optimize=True)
            else:
                torch.onnx.export(model, example, str(tmp), dynamo=False, opset_version=cfg.opset,
                                  input_names=[s.name for s in specs], output_names=outputs, dynamic_axes=axes,
                                  do_constant_folding=True)
    except Exception as exc:  # the exporters raise many unrelated types; report the op-level cause in one line
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export ({cfg.exporter}) failed: {_export_cause(exc)}; "
                          f"try export.exporter: {'torchscript' if cfg.exporter == 'dynamo' else 'dynamo'}") from exc
    host_lock.pause_point()   # between the phases of an export: a parallel job's timing need not wait for all
    proto = onnx.load(str(tmp))
    if cfg.slim:
        proto = _slim(proto)
        host_lock.pause_point()
    _check_dynamic_axes(proto, specs)
    onnx.save(proto, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"exported ONNX fails onnx.checker: {first_line(exc)}") from None
    try:
        _check_batch_really_dynamic(tmp, specs)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return {"exporter": cfg.exporter, "opset": cfg.opset, "slim": cfg.slim, "outputs": outputs,
            "nodes": len(proto.graph.node), "onnx_bytes": path.stat().st_size}


def onnx_size(path: Path) -> dict:
    """Bytes on disk and DEFLATE-compressed (as in a zip or an app bundle): unstructured sparsity shows only
    in the second."""
    data = Path(path).read_bytes()
    return {"onnx_bytes": len(data), "onnx_zipped_bytes": len(zlib.compress(data, 9))}


def write_io_spec(path: Path, specs: tuple[InputSpec, ...], outputs: list[str]) -> None:
    """io.json: what a runtime needs to feed the model (names, shapes, dtypes, dynamic axes, normalisation)."""
    path.write_text(json.dumps({"inputs": [s.to_dict() for s in specs],
                                "outputs": [{"name": n, "dtype": "float32"} for n in outputs]}, indent=2))


def check_parity(model: nn.Module, onnx_path: Path, data: Dataset, specs: tuple[InputSpec, ...],
                 cfg: ParityConfig, batch_size: int, *, int8: bool = False, top1: bool = False) -> dict:
    """ONNX Runtime vs torch on real validation inputs; raises ParityError past the recipe's tolerance.
    `int8`: a fake-quant model vs its Q/DQ file, bounded relative to the largest |output| instead. `top1`: the
    outputs are class scores, so top-1 agreement is gated too (it is meaningless for embeddings or score maps)."""
    reference = collect_outputs(torch_outputs(model), data, cfg.samples, batch_size)
    actual = collect_outputs(onnx_outputs(OrtRunner(onnx_path), specs), data, cfg.samples, batch_size)
    _refuse_nonfinite(reference, "the torch model's")
    _refuse_nonfinite(actual, "ONNX Runtime's")
    figures = fidelity(actual, reference)
    relative = figures["max_abs_diff"] / max(max(float(np.max(np.abs(r))) for r in reference), 1e-12)
    agreement = figures.get("top1_agreement")
    result = {**figures, "max_rel_diff": relative, "top1_agreement": agreement, "tolerance": cfg.model_dump()}
    measured, allowed, what = ((relative, cfg.int8_max_rel_diff, "max |torch−onnx| / max |output|") if int8
                               else (figures["max_abs_diff"], cfg.max_abs_diff, "max |torch−onnx|"))
    min_agreement = cfg.int8_min_top1_agreement if int8 else cfg.min_top1_agreement
    disagree = top1 and agreement is not None and agreement < min_agreement
    if measured > allowed or disagree:
        agreement_text = (f", top-1 agreement {agreement:.4f} (required {min_agreement:g})"
                          if top1 and agreement is not None else "")
        raise ParityError(f"parity gate failed on {figures['samples']} validation inputs: {what} = {measured:.3g} "
                          f"(allowed {allowed:g}){agreement_text}, cosine {figures['cosine']:.5f}; "
                          "loosen export.parity or check the model's ops")
    return result


def _refuse_nonfinite(outputs: list[np.ndarray], whose: str) -> None:
    """NaN slips through max() and every comparison: a model whose outputs are all NaN would pass."""
    bad = nonfinite_count(outputs)
    if bad:
        first = min(int(np.argwhere(~np.isfinite(o))[0][0]) for o in outputs if not np.isfinite(o).all())
        raise ParityError(f"parity gate failed: {whose} outputs hold {bad} NaN/Inf value(s) (first in validation "
                          f"input {first}); check the model's weights and numerics (log, division, overflow)")


def _check_dynamic_axes(proto: onnx.ModelProto, specs: tuple[InputSpec, ...]) -> None:
    """The exporter can specialise a dynamic axis without error; verify on the file itself."""
    by_name = {i.name: i for i in proto.graph.input}
    for spec in specs:
        dims = by_name[spec.name].type.tensor_type.shape.dim
        for axis, label in spec.dynamic_axes.items():
            if not dims[axis].dim_param:
                raise ExportError(f"exported input '{spec.name}' has a fixed {label} axis {axis} "
                                  f"(= {dims[axis].dim_value}); the model specialises it during tracing — "
                                  "avoid shape-dependent Python branches or use export.exporter: torchscript")


def _check_batch_really_dynamic(path: Path, specs: tuple[InputSpec, ...]) -> None:
    """A graph can label its batch axis dynamic yet hard-code the traced size inside (a reshape to 2, say):
    run the file at a batch size the exporter never saw."""
    if not all(0 in s.dynamic_axes for s in specs):
        return
    probe = EXAMPLE_BATCH + 1
    try:
        outputs = OrtRunner(path)({s.name: s.example(probe).numpy() for s in specs})
    except Exception as exc:  # ORT raises its own exception types for shape errors
        raise ExportError(f"exported model fails at batch {probe} although its batch axis is dynamic: "
                          f"{first_line(exc)}; the model hard-codes the traced batch size") from None
    if outputs[0].shape[0] != probe:
        raise ExportError(f"exported model returns batch {outputs[0].shape[0]} for an input batch of {probe}: "
                          "the model hard-codes the traced batch size (check reshapes that use fixed sizes)")


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with quiet():
        return onnxslim.slim(proto)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _export_cause(exc: BaseException) -> str:
    """torch.export's message is a page of advice with the cause in the middle: keep the cause and where it was
    raised in the user's code."""
    text = _ANSI.sub("", str(exc))
    summary = text.partition("## Exception summary")[2].strip()
    if not summary:
        return first_line(exc)
    cause = summary.splitlines()[0].split(">: ", 1)[-1].strip()
    where = re.search(r"The following call raised this error:\n\s*File \"([^\"]+)\", line (\d+).*\n\s*(.+)", text)
    location = f" at {where[1]}:{where[2]} `{where[3].strip()}`" if where else ""
    data_dependent = "data-dependent" in cause
    return (("the model branches on a tensor's value, which torch.export cannot trace: " if data_dependent else "")
            + cause[:300] + location)

"""Results rows, the budget check, and the run folder's results.json, results.md and manifest.json."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from rich import box
from rich.table import Table

from edgesmith.errors import BudgetError
from edgesmith.pipeline.cache import atomic_write_json, atomic_write_text, file_sha256
from edgesmith.pipeline.config import BudgetConfig
from edgesmith.pipeline.recipe import Recipe
from edgesmith.pipeline.steps import Metrics
from edgesmith.pipeline.versions import tool_versions


def row(stage: str, metrics: Metrics, *, target: str | None = None, backend: str | None = None,
        status: str | None = None, artifact: str | None = None, bundle: str | None = None) -> dict:
    """One results row: a stage's model (target null), or one backend × precision candidate of a target.
    `artifact`: the file the row measured, `bundle`: the folder to ship (chosen rows), relative to the run folder."""
    out = {"stage": stage, "target": target, "precision": metrics.precision or "fp32",
           **{k: getattr(metrics, k) for k in ("accuracy", "params", "macs", "sparsity", "onnx_bytes",
                                               "onnx_zipped_bytes", "latency_ms")}}
    if backend:
        out["backend"], out["measured_on"] = backend, metrics.measured_on
    if status:
        out["status"] = status
    if metrics.parity:
        out["parity"] = {k: metrics.parity.get(k) for k in ("max_abs_diff", "top1_agreement", "cosine")}
    out["fidelity"] = _fidelity_figures(metrics.fidelity)
    out["artifact"], out["bundle"] = artifact, bundle
    if metrics.latency_budget:
        out["latency_budget"] = metrics.latency_budget
    if metrics.int8_vs_fp32:
        out["int8_vs_fp32"] = {**_fidelity_figures(metrics.int8_vs_fp32), "passed": metrics.int8_vs_fp32["passed"],
                               "gated": metrics.int8_vs_fp32.get("gated", True)}
    return out


def _fidelity_figures(figures: dict | None) -> dict | None:
    """cosine, psnr_db, max_abs_diff, and top1_agreement where the output is (batch, classes)."""
    if not figures:
        return None
    keep = ("cosine", "psnr_db", "max_abs_diff", "top1_agreement") if "top1_agreement" in figures else \
        ("cosine", "psnr_db", "max_abs_diff")
    return {k: figures.get(k) for k in keep}


_BASELINES = ("model", "train")   # the uncompressed model: a checkpoint, or the last train stage


def check_budget(result_rows: list[dict], budget: BudgetConfig) -> None:
    """The task metric's drop in points against the uncompressed model (the last train stage or the checkpoint),
    and the least fidelity to the reference model; failed rows (an INT8 file the gate refused) are not deployed."""
    max_drop, least = budget.max_accuracy_drop, budget.min_fidelity
    baseline = None
    for r in result_rows:
        if r["target"] is not None or r.get("status"):
            continue
        if r["stage"] in _BASELINES:
            baseline = r["accuracy"] if r["accuracy"] is not None else baseline
            continue
        if max_drop is not None and baseline is not None and r["accuracy"] is not None \
                and baseline - r["accuracy"] > max_drop:
            top1 = is_top1(r)
            value = (lambda v: f"{v:.2f}%") if top1 else (lambda v: f"{v:.4g}")
            drop = f"{baseline - r['accuracy']:.2f}" if top1 else f"{baseline - r['accuracy']:.4g}"
            raise BudgetError(f"stage '{r['stage']}' dropped {'accuracy' if top1 else 'metric ' + r['metric']} "
                              f"{value(baseline)} → {value(r['accuracy'])} ({drop} points > "
                              f"budget.max_accuracy_drop {max_drop}); earlier artifacts are kept in the run folder")
        for measure in ("cosine", "psnr_db"):
            bound, value = getattr(least, measure, None) if least else None, (r.get("fidelity") or {}).get(measure)
            if bound is not None and value is not None and value < bound:
                raise BudgetError(f"stage '{r['stage']}' has {measure} {value:.4g} to the reference model "
                                  f"(< budget.min_fidelity.{measure} {bound:g}); earlier artifacts are kept in the "
                                  "run folder")


FLAT_COLUMNS = ("model", "recipe", "target", "stage", "backend", "precision", "status", "metric", "accuracy",
                "cosine", "psnr_db", "max_abs_diff", "top1_agreement", "params", "macs", "sparsity", "onnx_bytes",
                "p50_ms", "p90_ms", "p99_ms", "measured_on", "artifact", "bundle")


def flat_rows(result_rows: list[dict], model: str, recipe: str) -> list[dict]:
    """results.json rows as one flat record each (FLAT_COLUMNS): what results.csv holds and pandas reads as is.
    `model`: the model's short name (a batch job's model label), `recipe`: the recipe's name."""
    flat = []
    for r in result_rows:
        latency, fidelity = r.get("latency_ms") or {}, r.get("fidelity") or {}
        flat.append({"model": model, "recipe": recipe, **{k: r.get(k) for k in (
            "target", "stage", "backend", "precision", "status", "metric", "accuracy", "params", "macs", "sparsity",
            "onnx_bytes", "measured_on", "artifact", "bundle")}, **{k: fidelity.get(k) for k in (
                "cosine", "psnr_db", "max_abs_diff", "top1_agreement")},
            **{f"{p}_ms": latency.get(p) for p in ("p50", "p90", "p99")}})
        flat[-1]["status"] = flat[-1]["status"] or "ok"
    return [{k: row[k] for k in FLAT_COLUMNS} for row in flat]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Empty cells for missing values (pandas reads them as NaN)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FLAT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def write(out_dir: Path, recipe: Recipe, steps, result_rows: list[dict], started: float) -> None:
    atomic_write_json(out_dir / "results.json", result_rows)
    write_csv(out_dir / "results.csv", flat_rows(result_rows, recipe.model.short_name, recipe.name))
    atomic_write_text(out_dir / "results.md", markdown(result_rows))
    files = {str(p.relative_to(out_dir)): file_sha256(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".tmp-")}
    atomic_write_json(out_dir / "manifest.json", {
        "recipe": recipe.model_dump(mode="json"),
        "versions": tool_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 2),
        "steps": [{"kind": s.kind, "label": s.label, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 3),
                   "build_seconds": s.build_seconds, "key_parts": sorted(s.key_parts)} for s in steps],
        "hashes": files,
        "metrics": result_rows,
    })


# p90 and the full figures are in results.json; the tables fit a terminal
_STAGE_COLUMNS = ("stage", "dtype", "metric", "cosine", "PSNR", "params", "MACs", "zeros", "ONNX", "zipped",
                  "p50 ms", "p99 ms", "status")
_TARGET_COLUMNS = ("target", "backend", "dtype", "from", "metric", "cosine", "PSNR", "p50 ms", "p99 ms",
                   "parity Δ", "measured on", "status")


_TEXT_COLUMNS = ("stage", "target", "backend", "from", "measured on", "status")


def _ms(row: dict, key: str) -> str:
    latency = row["latency_ms"] or {}
    return f"{latency[key]:.3f}" if key in latency else "—"


def accuracy_cell(row: dict) -> str:
    """The task metric: top-1 in percent, a user's metric as it returned, n/a where none applies."""
    if row["accuracy"] is None:
        return "n/a"
    return f"{row['accuracy']:.2f}%" if is_top1(row) else f"{row['accuracy']:.4g}"


def is_top1(row: dict) -> bool:
    """Top-1 accuracy in percent (the default metric); a user's metric is shown and budgeted as it returned."""
    return row.get("metric", "auto") in ("auto", "top1")


def _fidelity_cells(row: dict) -> list[str]:
    """Fidelity to the reference model (the model as it entered the first compression stage)."""
    figures = row.get("fidelity") or {}
    cosine, psnr = figures.get("cosine"), figures.get("psnr_db")
    return ["—" if cosine is None else f"{cosine:.4f}", "—" if psnr is None else f"{psnr:.1f}"]


def _stage_cells(row: dict) -> list[str]:
    return [row["stage"], row["precision"], accuracy_cell(row), *_fidelity_cells(row), _human(row["params"]),
            _human(row["macs"]), "—" if row["sparsity"] is None else f"{row['sparsity']:.0%}",
            _human(row["onnx_bytes"]), _human(row["onnx_zipped_bytes"]), _ms(row, "p50"), _ms(row, "p99"),
            (row.get("status") or "").split(":")[0]]   # the reason: in the warning and results.json


def _target_cells(row: dict) -> list[str]:
    """Latency is the device's only where it was measured on the device (or the device is this machine)."""
    parity = row.get("parity")
    built = not (row.get("status") or "").startswith(("failed", "skipped"))
    return [row["target"], row.get("backend") or "—", row["precision"], row["stage"], accuracy_cell(row),
            *_fidelity_cells(row), _ms(row, "p50"), _ms(row, "p99"),
            f"{parity['max_abs_diff']:.1e}" if parity else ("on device" if built else "—"),
            row.get("measured_on") or "—", row.get("status") or ""]


def table_data(result_rows: list[dict]):
    """(title, columns, rows of cells) of the stage table and the target table: the terminal, results.md and
    report.html show the same cells."""
    stages = [r for r in result_rows if r["target"] is None]
    targets = [r for r in result_rows if r["target"] is not None]
    stage_columns = _STAGE_COLUMNS if any(r.get("status") for r in stages) else _STAGE_COLUMNS[:-1]
    yield "stages (latency: ONNX Runtime on this host)", stage_columns, \
        [_stage_cells(r)[:len(stage_columns)] for r in stages]
    if targets:
        yield "targets (each backend × precision tried; latency only where measured on the device)", \
            _TARGET_COLUMNS, [_target_cells(r) for r in targets]


def tables(result_rows: list[dict]) -> list[Table]:
    out = []
    for title, columns, rows in table_data(result_rows):
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)   # narrow: 80 columns hold the stage table
        for col in columns:
            t.add_column(col, justify="left" if col in _TEXT_COLUMNS else "right", overflow="fold")
        for cells in rows:
            t.add_row(*cells)
        out.append(t)
    return out


def markdown(result_rows: list[dict]) -> str:
    lines = []
    for title, columns, rows in table_data(result_rows):
        lines += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        lines.append("")
    return "\n".join(lines)


def _human(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)

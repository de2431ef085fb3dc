"""Results rows, the budget check, and the run folder's results.json, results.md and manifest.json."""
from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from pipeline.cache import atomic_write_json, atomic_write_text, file_sha256
from pipeline.errors import BudgetError
from pipeline.recipe import Recipe
from pipeline.versions import tool_versions

_PLUMBING = {"compile"}  # steps that produce no row of their own


def rows(steps) -> list[dict]:
    """One row per model-producing step (target null) and one per benchmarked target."""
    out, last_metrics, last_stage = [], {}, None
    for step in steps:
        if step.kind in _PLUMBING:
            continue
        if step.kind == "bench":
            out.append(_row(last_stage, step.sidecar["profile"], last_metrics, step.sidecar["latency_ms"],
                            backend=step.sidecar["backend"]))
            continue
        metrics = step.sidecar["metrics"]
        if step.kind == "model" and metrics["accuracy"] is None:
            last_metrics = metrics  # an untrained model's accuracy says nothing; no row
            continue
        last_metrics, last_stage = metrics, step.kind
        out.append(_row(step.kind, None, metrics, None))
    return out


def _row(stage, target, metrics, latency, backend=None) -> dict:
    row = {"stage": stage, "target": target, "accuracy": metrics.get("accuracy"), "params": metrics.get("params"),
           "macs": metrics.get("macs"), "onnx_bytes": metrics.get("onnx_bytes"), "latency_ms": latency}
    if backend:
        row["backend"] = backend
    if "parity" in metrics:
        row["parity"] = {k: metrics["parity"][k] for k in ("max_abs_diff", "top1_agreement")}
    return row


def check_budget(result_rows: list[dict], max_drop: float | None) -> None:
    """Accuracy drop in points against the uncompressed model (the last train stage or the checkpoint)."""
    if max_drop is None:
        return
    baseline = None
    for row in result_rows:
        if row["target"] is not None or row["accuracy"] is None:
            continue
        if row["stage"] in ("model", "train"):
            baseline = row["accuracy"]
        elif baseline is not None and baseline - row["accuracy"] > max_drop:
            raise BudgetError(f"stage '{row['stage']}' dropped accuracy {baseline:.2f}% → {row['accuracy']:.2f}% "
                              f"({baseline - row['accuracy']:.2f} points > budget.max_accuracy_drop {max_drop}); "
                              "earlier artifacts are kept in the run folder")


def write(out_dir: Path, recipe: Recipe, steps, result_rows: list[dict], started: float) -> None:
    atomic_write_json(out_dir / "results.json", result_rows)
    atomic_write_text(out_dir / "results.md", markdown(result_rows))
    files = {str(p.relative_to(out_dir)): file_sha256(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".tmp-")}
    atomic_write_json(out_dir / "manifest.json", {
        "recipe": recipe.model_dump(mode="json"),
        "versions": tool_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 2),
        "steps": [{"kind": s.kind, "key": s.key, "cached": s.cached, "seconds": round(s.seconds, 3),
                   "build_seconds": s.sidecar.get("seconds")} for s in steps],
        "hashes": files,
        "metrics": result_rows,
    })


_COLUMNS = ("stage", "target", "accuracy %", "params", "MACs", "ONNX bytes", "p50 ms", "p90 ms", "p99 ms")


def _cells(row: dict) -> list[str]:
    lat = row["latency_ms"] or {}
    fmt_ms = lambda k: f"{lat[k]:.3f}" if k in lat else "—"  # noqa: E731
    return [row["stage"] or "—", row["target"] or "—",
            "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2f}",
            _human(row["params"]), _human(row["macs"]), _human(row["onnx_bytes"]),
            fmt_ms("p50"), fmt_ms("p90"), fmt_ms("p99")]


def table(result_rows: list[dict]) -> Table:
    t = Table(title="edgesmith results")
    for col in _COLUMNS:
        t.add_column(col, justify="left" if col in ("stage", "target") else "right")
    for row in result_rows:
        t.add_row(*_cells(row))
    return t


def markdown(result_rows: list[dict]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in result_rows]
    return "\n".join(lines) + "\n"


def _human(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)

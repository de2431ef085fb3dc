"""report.html: one self-contained page comparing run and batch folders (no network needed to view it).

Per device: the task metric (or, where a run has none, cosine fidelity to the reference model) against p50
latency for every candidate measured there, the Pareto front drawn through the ones no other candidate beats on
both, and each run's shipped candidate ringed. Then a model × device table of what ships, and every run's
stage-by-stage tables. Plots are matplotlib SVG, inline.
"""
from __future__ import annotations

import functools
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgesmith.errors import EdgesmithError
from edgesmith.pipeline import report
from edgesmith.pipeline.config import ModelConfig


class ReportError(EdgesmithError):
    """A folder given to `edgesmith report` is not a run or batch folder."""


@dataclass(frozen=True)
class RunRecord:
    label: str            # the job's label, or the run folder's name
    model: str
    recipe: str
    rows: list[dict]      # the run's results.json
    status: str = "done"
    reason: str | None = None


def load_runs(folders: list[Path]) -> list[RunRecord]:
    """Every run in the folders: a batch folder (batch.json) gives its jobs, a run folder (results.json) itself."""
    runs = []
    for folder in map(Path, folders):
        if (folder / "batch.json").is_file():
            batch = json.loads((folder / "batch.json").read_text())
            runs += [RunRecord(job["label"], job["model"], job["recipe"], _rows(folder / job["folder"]),
                               job["status"], job.get("reason")) for job in batch["jobs"]]
        elif (folder / "results.json").is_file():
            runs.append(_single_run(folder))
        else:
            raise ReportError(f"'{folder}' holds neither batch.json nor results.json; give run folders "
                              "(runs/<name>) or batch folders")
    return runs


def _rows(folder: Path) -> list[dict]:
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return []


def _single_run(folder: Path) -> RunRecord:
    try:
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        model, name = ModelConfig(**recipe["model"]).short_name, recipe["name"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        model, name = folder.name, folder.name
    return RunRecord(folder.name, model, name, _rows(folder))


def render_report(folders: list[Path]) -> str:
    runs = load_runs(folders)
    targets = list(dict.fromkeys(r["target"] for run in runs for r in run.rows if r["target"]))
    parts = [f"<h1>edgesmith report: {html.escape(', '.join(str(f) for f in folders))}</h1>",
             f"<p>{len(runs)} run(s), {len(targets)} device(s). Latency is p50 in milliseconds where it was "
             "measured on the device; ringed points are the candidates each run ships.</p>"]
    for target in targets:
        parts.append(f"<h2>{html.escape(target)}</h2>")
        parts.append(_scatter(target, runs))
    parts += ["<h2>What ships: model × device</h2>", _shipped_table(runs, targets)]
    for run in runs:
        title = f"{run.label} — recipe {run.recipe}" + ("" if run.status == "done" else f" — {run.status}")
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if run.reason:
            parts.append(f"<p class=failed>{html.escape(run.reason)}</p>")
        for caption, columns, cells in report.table_data(run.rows) if run.rows else ():
            parts.append(_html_table(columns, cells, caption))
    return _PAGE.format(body="\n".join(parts))


def _points(target: str, runs: list[RunRecord]) -> tuple[list[dict], str]:
    """Candidates measured on the device, and what the y axis shows: the task metric where every one has it."""
    points = []
    for run in runs:
        for r in run.rows:
            status = r.get("status") or ""
            p50 = (r.get("latency_ms") or {}).get("p50")
            if r["target"] != target or p50 is None or status.startswith(("failed", "skipped")):
                continue
            points.append({"run": run.label, "label": f"{run.label} {r.get('backend')}/{r['precision']}",
                           "p50": p50, "accuracy": r.get("accuracy"), "top1": report.is_top1(r),
                           "cosine": (r.get("fidelity") or {}).get("cosine"), "chosen": status.startswith("chosen")})
    by_metric = bool(points) and all(p["accuracy"] is not None for p in points)
    axis = ("top-1 accuracy %" if all(p["top1"] for p in points) else "task metric") if by_metric \
        else "cosine to the reference model"
    for p in points:
        p["y"] = p["accuracy"] if by_metric else p["cosine"]
    return [p for p in points if p["y"] is not None], axis


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both: faster, and at least as accurate (sorted by latency)."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p["p50"], -p["y"])):
        if p["y"] > best:
            front.append(p)
            best = p["y"]
    return front


def _scatter(target: str, runs: list[RunRecord]) -> str:
    points, axis = _points(target, runs)
    if not points:
        return "<p>No candidate was timed on this device (latency is only shown where it was measured there).</p>"
    plt = pyplot()
    plt.rcParams["svg.fonttype"] = "none"   # text stays text: smaller, selectable
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = list(dict.fromkeys(p["run"] for p in points))
    colours = plt.get_cmap("tab10")
    for i, run in enumerate(labels):
        mine = [p for p in points if p["run"] == run]
        ax.scatter([p["p50"] for p in mine], [p["y"] for p in mine], color=colours(i % 10), label=run, s=36,
                   zorder=3)
        chosen = [p for p in mine if p["chosen"]]
        ax.scatter([p["p50"] for p in chosen], [p["y"] for p in chosen], s=180, facecolors="none",
                   edgecolors="black", linewidths=1.6, zorder=4)
    front = pareto_front(points)
    ax.step([p["p50"] for p in front], [p["y"] for p in front], where="post", color="grey", linestyle="--",
            linewidth=1, zorder=2, label="Pareto front")
    latencies = [p["p50"] for p in points]
    if max(latencies) > 20 * min(latencies):   # backends an order of magnitude apart: keep both readable
        ax.set_xscale("log")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(axis)
    ax.set_title(f"{target}: {axis} vs latency (ringed: shipped)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _label(fig, ax, [p for p in points if p["chosen"]] + [p for p in front if not p["chosen"]])
    fig.tight_layout()   # room for a label at the edge
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})   # the same runs give the same page
    plt.close(fig)
    svg = buffer.getvalue()
    return f'<figure class=plot data-target="{html.escape(target)}">{svg[svg.index("<svg"):]}</figure>'


def _label(fig, ax, points: list[dict]) -> None:
    """Backend/precision beside the shipped points, then the front's (the rest: by colour, in the tables below).
    A label that would cover one already drawn is left out: many jobs ship the same backend at nearly the same
    point, and stacked labels read as none; the ring, the colour and the tables still say it."""
    renderer = fig.canvas.get_renderer()
    drawn = []
    for p in points:
        text = ax.annotate(p["label"].split(" ", 1)[1], (p["p50"], p["y"]), fontsize=7, xytext=(4, 3),
                           textcoords="offset points")
        box = text.get_window_extent(renderer)
        if any(box.overlaps(other) for other in drawn):
            text.remove()
        else:
            drawn.append(box)


@functools.cache
def pyplot():
    """matplotlib's pyplot, drawing off-screen. Its first import takes ~0.4 s here: a batch's driver calls this
    while a core idles (its last jobs running), before it writes the report."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _shipped_table(runs: list[RunRecord], targets: list[str]) -> str:
    cells = []
    for run in runs:
        row = [run.label]
        for target in targets:
            chosen = next((r for r in run.rows if r["target"] == target
                           and (r.get("status") or "").startswith("chosen")), None)
            if chosen is None:
                row.append("—" if run.status == "done" else run.status)
                continue
            p50 = (chosen.get("latency_ms") or {}).get("p50")
            metric = report.accuracy_cell(chosen)
            row.append(f"{chosen.get('backend')}/{chosen['precision']} · "
                       f"{'not timed' if p50 is None else f'{p50:.3f} ms'} · {metric}")
        cells.append(row)
    return _html_table(["model (job)", *targets], cells, None)


def _html_table(columns: list[str] | tuple, cells: list[list[str]], caption: str | None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgesmith report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }}
caption {{ text-align: left; font-weight: 600; padding: 0.3em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
figure.plot {{ margin: 0; }} figure.plot svg {{ max-width: 100%; height: auto; }}
.failed {{ color: #b00; }}
</style></head>
<body>
{body}
</body></html>
"""

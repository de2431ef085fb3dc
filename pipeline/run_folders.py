"""Run folders: each describes one run (claimed by its recipe.yaml), and the list of those under a folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from edgesmith.errors import EdgesmithError
from edgesmith.pipeline.cache import atomic_write_text
from edgesmith.pipeline.config import ModelConfig
from edgesmith.pipeline.recipe import Recipe


class RunFolderError(EdgesmithError):
    """The run folder holds another run's results."""


def claim_run_folder(out_dir: Path, recipe: Recipe, force: bool) -> None:
    """A run folder describes one run: the same recipe may run again into it (steps are replaced in place); another
    recipe needs `force`, which empties the folder first, so no stage, row or bundle of the old run remains."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        recorded = out_dir / "recipe.yaml"
        previous = recorded.read_text() if recorded.is_file() else None
        if previous != recipe.to_yaml():
            if not force:
                what = _difference(previous, recipe) if previous else "files that are not an edgesmith run"
                raise RunFolderError(f"run folder '{out_dir}' holds {what}; give another --out DIR, or --force to "
                                     "empty it and run there")
            for child in out_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "recipe.yaml", recipe.to_yaml())   # the folder is this recipe's from now on


def _difference(previous_yaml: str, recipe: Recipe) -> str:
    """`another recipe's run (model.name: mnist_cnn → resnet18, …)`: the first fields that differ."""
    old, new = _flat(yaml.safe_load(previous_yaml) or {}), _flat(recipe.model_dump(mode="json"))
    changed = [f"{k}: {old.get(k, '—')} → {new.get(k, '—')}" for k in dict.fromkeys([*old, *new])
               if old.get(k) != new.get(k)]
    shown = ", ".join(changed[:3]) + (f", and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"another recipe's run ({shown})"


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        return {k: v for i, value in enumerate(node) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def list_runs(root: Path) -> list[dict]:
    """Every run folder at or below `root` (recipe.yaml + manifest.json), newest first: its folder, recipe, model,
    start time, and per target the candidate it ships with its p50."""
    found = []
    for manifest_file in sorted(Path(root).rglob("manifest.json")):
        folder = manifest_file.parent
        if not (folder / "recipe.yaml").is_file():
            continue   # a bundle's or a stage's manifest
        try:
            manifest = json.loads(manifest_file.read_text())
            recipe = manifest["recipe"]
            model = ModelConfig(**recipe["model"]).short_name
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shipped = {}
        for r in manifest.get("metrics", []):
            if (r.get("status") or "").startswith("chosen"):
                p50 = (r.get("latency_ms") or {}).get("p50")
                shipped[r["target"]] = f"{r.get('backend')}/{r['precision']}" + (f" {p50:.3g} ms" if p50 else "")
        failed = [r for r in manifest.get("metrics", []) if (r.get("status") or "").startswith("failed")
                  and r["target"] is None]
        found.append({"folder": str(folder), "recipe": recipe["name"], "model": model,
                      "started": manifest.get("started"), "seconds": manifest.get("seconds"),
                      "shipped": shipped, "failed_rows": len(failed)})
    return sorted(found, key=lambda r: r["started"] or "", reverse=True)

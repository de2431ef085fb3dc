"""The content-addressed step: key → build → commit to the cache → publish to the run folder, with a typed record.

A step's key is built in one place, `Steps.run`, from named parts (plus the versions of the tools that can change
outputs), and the parts are saved in its sidecar: a reader sees exactly what invalidates what. Only steps that
measure on this machine name the host among their parts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgesmith.pipeline import host_lock
from edgesmith.pipeline.cache import SIDECAR, Store, content_key, publish
from edgesmith.pipeline.progress import info
from edgesmith.pipeline.versions import key_versions, tool_versions


@dataclass(frozen=True)
class Metrics:
    """What a results row says of a model or artifact. Steps fill what they measure; `merged` combines them."""
    accuracy: float | None = None
    params: int | None = None
    macs: int | None = None
    sparsity: float | None = None
    onnx_bytes: int | None = None
    onnx_zipped_bytes: int | None = None
    latency_ms: dict | None = None
    parity: dict | None = None
    fidelity: dict | None = None       # against the reference model: cosine, psnr_db, max_abs_diff (top1_agreement)
    int8_vs_fp32: dict | None = None   # an INT8 file against the FP32 model it quantizes: the INT8 gate's figures
    precision: str | None = None
    scheme: str | None = None
    measured_on: str | None = None
    latency_budget: dict | None = None   # a prune stage's latency budget: device, measured p50, ratios, search trace

    def merged(self, *others: Metrics) -> Metrics:
        """These metrics with every field that `others` set (left to right) replacing this one's."""
        changes = {k: v for other in others for k, v in dataclasses.asdict(other).items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Built:
    """What a step's build function returns besides the files it wrote."""
    metrics: Metrics = Metrics()
    facts: dict = field(default_factory=dict)   # the step's own facts: stage metrics, export or compile facts, ...


@dataclass(frozen=True)
class Step:
    kind: str
    key: str
    artifact: Path            # the committed cache folder
    cached: bool
    seconds: float            # this run's time for it (a cache hit: the lookup)
    build_seconds: float      # when it was built
    metrics: Metrics
    facts: dict
    key_parts: dict
    label: str                # what progress lines call it: `compile x86-host onnxruntime/int8`
    files: dict               # the artifact's files as the cache verified them: name → {bytes, sha256}

    @classmethod
    def from_sidecar(cls, sidecar: dict, artifact: Path, cached: bool, seconds: float, label: str) -> Step:
        return cls(sidecar["kind"], sidecar["key"], artifact, cached, seconds, sidecar["seconds"],
                   Metrics(**sidecar["metrics"]), sidecar["facts"], sidecar["key_parts"], label, sidecar["files"])


BuildFunction = Callable[[Path], Built]


class Steps:
    """Runs steps through the cache and remembers them in order (the manifest's step list)."""

    def __init__(self, store: Store, recipe_name: str, use_cache: bool = True,
                 on_step: Callable[[str], None] | None = None):
        self.store, self.recipe_name, self.use_cache, self.on_step = store, recipe_name, use_cache, on_step
        self.done: list[Step] = []

    def run(self, kind: str, label: str, parts: dict, build: BuildFunction, publish_to: Path | None = None) -> Step:
        """`parts`: every input of the step by name (other steps' keys, configs, data, host). `label` names it in
        progress lines (`▶ compile x86-host onnxruntime/int8`)."""
        parts = {**parts, "tools": key_versions()}
        key = content_key(kind, parts)
        start = time.time()
        if self.on_step is not None:
            self.on_step(label)
        loaded = self.store.load(kind, key) if self.use_cache else None
        cached = loaded is not None
        if not cached:
            with self.store.exclusive(kind, key, on_wait=lambda: info(f"[cyan]… {label}[/] being built by another "
                                                                      "run; waiting for it")):
                loaded = self.store.load(kind, key) if self.use_cache else None   # the run we waited for built it
                cached = loaded is not None
                if not cached:
                    loaded = self._build(kind, key, label, parts, build)
        artifact, sidecar = loaded
        step = Step.from_sidecar(sidecar, artifact, cached, time.time() - start, label)
        info(f"[green]✔ {label}[/] {'cached' if cached else 'done'} in {step.seconds:.1f}s")
        if publish_to is not None:
            publish(artifact, publish_to)
        self.done.append(step)
        return step

    def _build(self, kind: str, key: str, label: str, parts: dict, build: BuildFunction) -> tuple[Path, dict]:
        info(f"[bold cyan]▶ {label}[/] running")
        sidecar = {"kind": kind, "key": key, "label": label, "key_parts": parts, "recipe": self.recipe_name,
                   "versions": tool_versions()}
        with host_lock.computing(self.store.locks_dir), self.store.build(kind, key, sidecar) as tmp:
            built = build(tmp)
            sidecar.update(metrics=built.metrics.to_dict(), facts=built.facts)
        artifact = self.store.path(kind, key)
        return artifact, json.loads((artifact / SIDECAR).read_text())   # as a later run will read it

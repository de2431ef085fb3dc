"""Per-device choice: every (backend, precision) a target's profile and the recipe allow is a candidate; candidates
that compile and pass parity are kept, and the fastest measured one is bundled. Latency is measured only where the
device is this machine; otherwise the profile's preference decides and the choice is marked "not measured"."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.recipe import CompileConfig
from targets import Profile
from targets.backends import get_backend

NOT_MEASURED = "not measured"


@dataclass
class Candidate:
    backend: str
    precision: str
    source: object | None            # the Step of the ONNX it compiles (export or the scheme's qat/ptq)
    status: str = "pending"          # chosen | passed | build on device | failed | skipped
    reason: str | None = None
    compiled: object | None = None   # compile Step
    checked: object | None = None    # check Step: parity and latency sidecar

    @property
    def parity(self) -> dict | None:
        return self.checked.sidecar.get("parity") if self.checked else None

    @property
    def latency_p50(self) -> float | None:
        latency = self.checked.sidecar.get("latency_ms") if self.checked else None
        return latency["p50"] if latency else None

    @property
    def usable(self) -> bool:
        """Compiled, and either passed parity here or cannot be run here (to be checked on the device)."""
        return self.compiled is not None and (self.parity is None or self.parity["passed"])

    @property
    def build_on_device(self) -> bool:
        return self.compiled is not None and self.compiled.sidecar["compile"].get("status") == "build on device"

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"


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
    """The fastest measured usable candidate; with none measured, the first usable one in preference order."""
    usable = [c for c in found if c.usable]
    measured = [c for c in usable if c.latency_p50 is not None]
    chosen = min(measured, key=lambda c: c.latency_p50) if measured else (usable[0] if usable else None)
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

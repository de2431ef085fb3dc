import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A fast variant of the default recipe, train stage only: digits (1,797 real 8×8 digits) trains in a second or two.
FAST = ["data.name=digits", "stages=[{kind: train, epochs: 1}]", "bench.runs=20", "bench.warmup=2",
        "export.exporter=torchscript", "export.opset=17", "budget.max_accuracy_drop=null"]
# The default recipe's compression stages, shortened.
FAST_COMPRESSION = FAST + ["stages=[{kind: train, epochs: 2}, {kind: prune, ratio: 0.5, finetune: {epochs: 1, "
                           "distill: true}}, {kind: qat, epochs: 1, distill: true}]"]


def chosen(rows: list[dict], target: str) -> dict:
    """The results row of the candidate a target's bundle was made from."""
    return next(r for r in rows if r["target"] == target and r.get("status", "").startswith("chosen"))


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def edgesmith(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgesmith {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc

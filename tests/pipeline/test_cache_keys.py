"""Cache keys survive a new machine: only steps that measure on this host depend on it."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run
from edgesmith.pipeline.versions import key_versions
from tests.conftest import FAST, REPO

HOST_STEPS = {"latency", "check", "bundle"}   # they time on this machine, or carry its timings


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to give the run another hostname")
def test_a_new_hostname_reruns_only_what_measures_on_the_host(tmp_path, cache_dir):
    stages = ("stages=[{kind: train, epochs: 1}, {kind: prune, ratio: 0.5}, "
              "{kind: ptq, calibration_samples: 32}]")
    overrides = [*FAST, stages]
    run(load_recipe(None, overrides), tmp_path / "a", cache_dir)
    sets = [arg for item in overrides for arg in ("--set", item)]
    command = " ".join(["hostname edgesmith-elsewhere &&", sys.executable, "-m", "edgesmith", "run", "--out",
                        str(tmp_path / "b"), "--cache-dir", str(cache_dir), *map(_quote, sets)])
    done = subprocess.run(["unshare", "-u", "sh", "-c", command], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    executed = {s["kind"] for s in manifest["steps"] if not s["cached"]}
    assert executed and executed <= HOST_STEPS, executed   # no model, train, prune, ptq, onnx, export or compile
    measured = [r["measured_on"] for r in manifest["metrics"] if r.get("measured_on")]
    assert measured and all(m.startswith("edgesmith-elsewhere") for m in measured)


def test_cache_keys_name_the_tools_that_change_outputs_not_the_machine():
    versions = key_versions()
    assert {"torch", "onnx", "onnxruntime", "nncf", "torch-pruning", "apache-tvm"} <= set(versions)
    assert "platform" not in versions and "python" not in versions


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"

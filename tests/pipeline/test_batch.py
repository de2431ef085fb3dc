"""Batch runs through the CLI as a user runs them: a local process pool and a local Ray instance, one shared cache,
failures as rows, resumption, results.csv read by pandas, and report.html loaded in a real headless chromium."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from edgesmith.pipeline import host_lock
from edgesmith.pipeline.batch_job import STATUS_FILE, share_cores, threads_now
from edgesmith.pipeline.ray_instance import start_ray
from edgesmith.pipeline.report import FLAT_COLUMNS
from tests.conftest import REPO, edgesmith

FAST = {"model": {"name": "mnist_cnn"}, "data": {"name": "digits"}, "stages": [{"kind": "train", "epochs": 1}],
        "export": {"exporter": "torchscript", "opset": 17}, "bench": {"warmup": 2, "runs": 20},
        "compile": {"precisions": ["fp32"]}, "targets": ["x86-host"]}
BROKEN = "def build():\n    raise RuntimeError('weights server unreachable')\n"


def _batch_folder(folder: Path, models: list[dict], **fields) -> Path:
    """Two recipes that share their training (they differ only in timing runs) and a matrix over `models`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.yaml").write_text(yaml.safe_dump({"name": "a", **FAST}))
    (folder / "b.yaml").write_text(yaml.safe_dump({"name": "b", **FAST, "bench": {"warmup": 2, "runs": 30}}))
    (folder / "broken.py").write_text(BROKEN)
    matrix = folder / "fleet.yaml"
    matrix.write_text(yaml.safe_dump({"name": "fleet", "recipes": ["a.yaml", "b.yaml"], "models": models,
                                      **fields}))
    return matrix


def _jobs(out: Path) -> dict[str, dict]:
    return {job["label"]: job for job in json.loads((out / "batch.json").read_text())["jobs"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One cold local batch: mnist_cnn (width 8) and a model whose factory raises, × recipes a and b, 2 at once."""
    root = tmp_path_factory.mktemp("fleet")
    matrix = _batch_folder(root, [{"name": "mnist_cnn", "kwargs": {"width": 8}},
                                  {"factory": "broken.py:build", "label": "broken"}])
    out, cache = root / "out", root / "cache"
    proc = edgesmith("batch", str(matrix), "--out", str(out), "--cache-dir", str(cache), "--max-parallel", "2",
                     cwd=root)
    return root, matrix, out, cache, proc


def test_a_failing_job_is_rows_while_the_others_finish(fleet):
    _, _, out, _, proc = fleet
    assert proc.returncode == 1, proc.stderr[-3000:]   # a job failed: non-zero, after every other job finished
    jobs = _jobs(out)
    assert {k: v["status"] for k, v in jobs.items()} == {"mnist_cnn-width8__a": "done", "broken__a": "failed",
                                                         "mnist_cnn-width8__b": "done", "broken__b": "failed"}
    assert "weights server unreachable" in jobs["broken__a"]["reason"]
    summary = proc.stdout[proc.stdout.index("batch "):]   # the summary table: job, status, reason
    assert "broken__b" in summary and "failed" in summary and "weights server unreachable" in summary
    for label in jobs:   # every job is a normal run folder
        assert (out / "jobs" / label / "manifest.json").is_file()
    assert (out / "jobs" / "mnist_cnn-width8__a" / "bundles" / "x86-host" / "manifest.json").is_file()


def test_results_csv_has_one_flat_row_per_job_and_stage_or_target_and_pandas_reads_it(fleet):
    _, _, out, _, _ = fleet
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == list(FLAT_COLUMNS)
    assert set(table["model"]) == {"mnist_cnn-width8", "broken"} and set(table["recipe"]) == {"a", "b"}
    ok = table[(table.model == "mnist_cnn-width8") & (table.recipe == "a")]
    assert set(ok["stage"]) >= {"train", "export"}
    chosen = ok[ok.status.str.startswith("chosen")]
    assert len(chosen) == 1 and chosen.iloc[0].target == "x86-host" and chosen.iloc[0].p50_ms > 0
    assert chosen.iloc[0].p50_ms <= chosen.iloc[0].p90_ms <= chosen.iloc[0].p99_ms
    assert 0.99 <= chosen.iloc[0].cosine <= 1.0 and pd.api.types.is_float_dtype(table["accuracy"])
    failed = table[table.model == "broken"]
    assert len(failed) == 2 and failed.status.str.startswith("failed: ").all()
    assert json.loads((out / "results.json").read_text())[0].keys() == set(FLAT_COLUMNS)
    single = pd.read_csv(out / "jobs" / "mnist_cnn-width8__a" / "results.csv")   # single runs write it too
    assert len(single) == len(ok)


def test_a_step_two_parallel_jobs_share_is_built_once(fleet):
    _, _, out, cache, _ = fleet
    jobs = _jobs(out)
    trained = [label for label in ("mnist_cnn-width8__a", "mnist_cnn-width8__b") if "train" in jobs[label]["executed"]]
    assert len(trained) == 1, jobs   # the other waited on its lock and reused it
    assert len(list(cache.glob("train-*"))) == 1


def test_a_rerun_executes_nothing_and_a_new_model_runs_only_its_own_steps(fleet):
    root, matrix, out, cache, _ = fleet
    warm = edgesmith("batch", str(matrix), "--out", str(out), "--cache-dir", str(cache), "--quiet", cwd=root)
    assert warm.returncode == 1 and all(not job["executed"] for job in _jobs(out).values())
    assert warm.stderr.strip() == ""   # --quiet: errors and the summary only
    grown = root / "grown.yaml"
    grown.write_text(yaml.safe_dump({**yaml.safe_load(matrix.read_text()), "recipes": ["a.yaml"], "models": [
        {"name": "mnist_cnn", "kwargs": {"width": 8}}, {"name": "mnist_cnn", "kwargs": {"width": 12}}]}))
    more = edgesmith("batch", str(grown), "--out", str(root / "grown"), "--cache-dir", str(cache), "--quiet",
                     cwd=root)
    assert more.returncode == 0, more.stderr[-2000:]
    jobs = _jobs(root / "grown")
    assert jobs["mnist_cnn-width8"]["executed"] == [] and "train" in jobs["mnist_cnn-width12"]["executed"]


def test_the_same_matrix_runs_as_ray_tasks_on_a_local_ray_instance(fleet):
    root, matrix, _, cache, _ = fleet
    ray_matrix = root / "ray.yaml"
    ray_matrix.write_text(yaml.safe_dump({**yaml.safe_load(matrix.read_text()), "recipes": ["a.yaml"], "models": [
        {"name": "mnist_cnn", "kwargs": {"width": 8}}, {"name": "mnist_cnn", "kwargs": {"width": 10}},
        {"factory": "broken.py:build", "label": "broken"}], "executor": {"kind": "ray", "max_parallel": 2}}))
    out = root / "ray-out"
    proc = edgesmith("batch", str(ray_matrix), "--out", str(out), "--cache-dir", str(cache), cwd=root)
    assert proc.returncode == 1, proc.stderr[-3000:]
    batch = json.loads((out / "batch.json").read_text())
    assert batch["executor"] == "ray" and batch["parallel"] == 2
    jobs = _jobs(out)
    assert jobs["mnist_cnn-width8"]["status"] == "done" and jobs["mnist_cnn-width8"]["executed"] == []
    assert jobs["mnist_cnn-width10"]["status"] == "done" and "train" in jobs["mnist_cnn-width10"]["executed"]
    assert jobs["broken"]["status"] == "failed" and "weights server unreachable" in jobs["broken"]["reason"]
    assert len(pd.read_csv(out / "results.csv").query("model == 'mnist_cnn-width10'")) >= 3


def test_a_step_takes_the_cores_that_finished_jobs_left_idle(tmp_path):
    cores = len(os.sched_getaffinity(0))
    for running in (1, 2, 3, 8):
        for i in range(running):
            (tmp_path / "jobs" / f"job{i}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "jobs" / f"job{i}" / STATUS_FILE).write_text("{}")
        assert threads_now(tmp_path, 1) == max(1, cores // running)
        assert threads_now(tmp_path, 4) >= 4   # never below the job's own share
    for status in tmp_path.glob(f"jobs/*/{STATUS_FILE}"):
        status.unlink()
    assert threads_now(tmp_path, 1) == cores


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to share")
def test_a_running_step_takes_the_cores_a_job_finishing_meanwhile_left_idle(tmp_path):
    import torch

    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    for job in ("this", "other"):
        (tmp_path / "jobs" / job).mkdir(parents=True)
        (tmp_path / "jobs" / job / STATUS_FILE).write_text("{}")
    try:
        share_cores(tmp_path, 1)
        assert torch.get_num_threads() == cores // 2
        with host_lock.adjusting(lambda: share_cores(tmp_path, 1)):
            (tmp_path / "jobs" / "other" / STATUS_FILE).unlink()   # the other job ended while this step runs
            deadline = time.monotonic() + 10
            while torch.get_num_threads() < cores and time.monotonic() < deadline:
                host_lock.pause_point()   # what Dataset.batches calls between two batches
                time.sleep(0.01)
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


def test_a_local_ray_instance_refuses_a_driver_without_its_token(tmp_path):
    """Ray's servers listen on every interface: the batch's own instance must demand its token."""
    import ray

    start_ray(None)
    try:
        gcs = ray.get_runtime_context().gcs_address
        connect = f"import ray; ray.init(address={gcs!r}, logging_level='error'); print(ray.cluster_resources()['CPU'])"

        def driver(**env):
            return subprocess.run([sys.executable, "-c", connect], env={**os.environ, **env}, capture_output=True,
                                  text=True, timeout=300)

        without_token = driver(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))
        wrong_token = driver(RAY_AUTH_TOKEN="0" * 32)
        with_token = driver()   # the token ray.init generated, in ~/.ray/auth_token
    finally:
        ray.shutdown()
    assert with_token.returncode == 0 and float(with_token.stdout) > 0, with_token.stderr[-2000:]
    for refused in (without_token, wrong_token):
        assert refused.returncode != 0 and "Failed to connect" in refused.stderr, refused.stdout + refused.stderr


def test_a_batch_refuses_to_start_a_local_ray_instance_without_authentication(tmp_path):
    matrix = _batch_folder(tmp_path, [{"name": "mnist_cnn", "kwargs": {"width": 8}}])
    proc = subprocess.run([sys.executable, "-m", "edgesmith", "batch", str(matrix), "--executor", "ray",
                           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "RAY_AUTH_MODE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("out/jobs/*/manifest.json"))   # no job ran


def test_the_report_loads_in_headless_chromium_with_a_plot_per_device(fleet, tmp_path):
    root, _, out, _, _ = fleet
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "report.html"   # the batch folder and one of its jobs as a plain run folder
    assert edgesmith("report", str(out), str(out / "jobs" / "mnist_cnn-width8__a"), "--out", str(page_file),
                     check=True).returncode == 0
    text = page_file.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)   # self-contained: nothing to fetch
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox"])
        page = chromium.new_page(viewport={"width": 1100, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(page_file.as_uri())
        plots = page.locator("figure.plot svg")
        assert plots.count() == 1 and page.locator("figure.plot").get_attribute("data-target") == "x86-host"
        assert plots.first.bounding_box()["width"] > 300   # drawn, not an empty element
        assert "Pareto front" in page.locator("figure.plot").inner_text()   # the legend, as SVG text
        shipped = page.locator("table").filter(has_text="model (job)")
        assert "onnxruntime/fp32" in shipped.inner_text() and "failed" in shipped.inner_text()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        chromium.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 20_000
    assert (out / "report.html").is_file()   # every batch writes its own


def _interrupt_in_training(matrix: Path, out: Path, cache: Path, job: str, *options: str) -> None:
    """Starts the batch, sends Ctrl-C once `job` is training, and checks that it exits 130 saying what it kept."""
    command = [sys.executable, "-m", "edgesmith", "batch", str(matrix), "--out", str(out), "--cache-dir",
               str(cache), *options]
    # SIGINT as a terminal has it: a test run started in the background (nohup, `&` in a script) inherits it ignored,
    # and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(command, cwd=matrix.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    status = out / "jobs" / job / "status.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (status.exists() and "train" in status.read_text()):
        time.sleep(0.2)
    assert status.exists(), "the first job never reached its train step"
    os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C reaches the whole process group, as in a terminal
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "finished steps are cached" in stderr


def test_ctrl_c_stops_the_batch_and_the_next_run_resumes(tmp_path):
    matrix = _batch_folder(tmp_path, [{"name": "mnist_cnn", "kwargs": {"width": 8}}],
                           set=["stages.0.epochs=30"])
    out, cache = tmp_path / "out", tmp_path / "cache"
    _interrupt_in_training(matrix, out, cache, "mnist_cnn-width8__a", "--max-parallel", "1")
    jobs = _jobs(out)
    assert jobs["mnist_cnn-width8__a"]["status"] == "interrupted"
    assert jobs["mnist_cnn-width8__a"]["failed_step"] == "train (stage 1)"
    assert list(cache.glob("model-*")) and not list(cache.glob("train-*")) and not list(cache.glob(".tmp-*"))
    resumed = edgesmith("batch", str(matrix), "--out", str(out), "--cache-dir", str(cache), "--only", "*__a",
                        "--quiet", "--max-parallel", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    executed = _jobs(out)["mnist_cnn-width8__a"]["executed"]
    assert "model" not in executed and "train" in executed   # the finished step was kept


def _ray_servers() -> set[int]:
    """The pids of Ray's server processes (raylet, GCS) running on this machine."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:   # the process ended meanwhile
            continue
        if b"/raylet/raylet " in command or b"/gcs/gcs_server " in command:
            found.add(int(entry.name))
    return found


def test_a_refused_ray_matrix_stops_the_instance_started_while_it_was_validated(tmp_path):
    """The command starts Ray before it validates the matrix (ray_instance.py): a matrix it then refuses gets its one
    line and exit 2, and leaves no Ray server behind."""
    matrix = _batch_folder(tmp_path, [{"name": "mnist_cnm"}], executor={"kind": "ray"})
    before = _ray_servers()
    proc = edgesmith("batch", str(matrix), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                     cwd=tmp_path)
    assert proc.returncode == 2 and "mnist_cnm" in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _ray_servers() <= before


@pytest.mark.slow
def test_ctrl_c_stops_a_ray_batch_its_local_instance_with_it_and_the_next_run_resumes(tmp_path):
    matrix = _batch_folder(tmp_path, [{"name": "mnist_cnn", "kwargs": {"width": 8}}],
                           set=["stages.0.epochs=30"], executor={"kind": "ray"})
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = _ray_servers()
    _interrupt_in_training(matrix, out, cache, "mnist_cnn-width8__a", "--only", "*__a")
    assert _jobs(out)["mnist_cnn-width8__a"]["status"] == "interrupted"
    assert _ray_servers() <= before   # the local instance the batch started is gone
    assert list(cache.glob("model-*")) and not list(cache.glob("train-*"))
    resumed = edgesmith("batch", str(matrix), "--out", str(out), "--cache-dir", str(cache), "--only", "*__a",
                        "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    executed = _jobs(out)["mnist_cnn-width8__a"]["executed"]
    assert "model" not in executed and "train" in executed

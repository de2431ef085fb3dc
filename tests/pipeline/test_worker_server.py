"""The local pool's worker server: what it preloads starts no thread (forking it is safe), its workers start with the
libraries loaded, one BLAS/OpenMP thread each and libgomp's short spin count, and a user's setting wins. Each case
runs in a fresh process, since a process has one forkserver for its life."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from edgesmith.pipeline.openmp_wait import SPIN_COUNT, USER_CHOICES
from edgesmith.pipeline.worker_server import PRELOAD, THREAD_VARIABLES
from tests.conftest import REPO

PROBE = textwrap.dedent("""
    import json, os, sys
    from concurrent.futures import ProcessPoolExecutor

    def probe():
        loaded = {name: name in sys.modules for name in ("torch", "torch._dynamo", "onnx", "onnxruntime")}
        import threadpoolctl, numpy, torch  # noqa: F401
        pools = sorted({pool["internal_api"]: pool["num_threads"] for pool in threadpoolctl.threadpool_info()}.items())
        return {"loaded": loaded, "pools": pools, "parent": os.getppid(),
                "spin_count": os.environ.get("GOMP_SPINCOUNT")}

    if __name__ == "__main__":
        from edgesmith.pipeline import worker_server
        with ProcessPoolExecutor(1, mp_context=worker_server.start()) as pool:
            result = pool.submit(probe).result()
        print(json.dumps({**result, "driver": os.getpid(), "environment_kept": not any(
            name in os.environ for name in (*worker_server.THREAD_VARIABLES, "GOMP_SPINCOUNT"))}))
""")


def _clean_environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_VARIABLES, *USER_CHOICES)}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _run_probe(tmp_path, **extra: str) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=_clean_environment(**extra))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_what_the_server_preloads_starts_no_thread():
    """Fork copies only the calling thread: a library thread running in the server would be missing, perhaps
    mid-lock, in every worker. ONNX Runtime starts one when imported, so it must not be preloaded."""
    count = "import os; print(len(os.listdir('/proc/self/task')))"
    env = _clean_environment(**{name: "1" for name in THREAD_VARIABLES})
    preloaded = subprocess.run([sys.executable, "-c", f"import {', '.join(PRELOAD)}; {count}"],
                               capture_output=True, text=True, timeout=300, env=env)
    assert preloaded.returncode == 0, preloaded.stderr[-2000:]
    assert int(preloaded.stdout) == 1
    assert "onnxruntime" not in PRELOAD


def test_a_worker_is_forked_with_the_libraries_loaded_and_one_thread_per_pool(tmp_path):
    result = _run_probe(tmp_path)
    assert result["loaded"] == {"torch": True, "torch._dynamo": True, "onnx": True, "onnxruntime": False}
    assert result["parent"] != result["driver"]   # forked by the server, not by the driver
    assert result["pools"] and {threads for _, threads in result["pools"]} == {1}, result["pools"]
    assert result["spin_count"] == SPIN_COUNT     # waiting torch threads sleep soon (openmp_wait.py)
    assert result["environment_kept"]             # the driver's own environment is left as it was


def test_a_wait_policy_the_user_set_is_left_alone(tmp_path):
    result = _run_probe(tmp_path, OMP_WAIT_POLICY="ACTIVE")
    assert result["spin_count"] is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to tell two threads from one")
def test_a_thread_count_the_user_set_wins(tmp_path):
    result = _run_probe(tmp_path, OPENBLAS_NUM_THREADS="2")
    assert dict(result["pools"])["openblas"] == 2, result["pools"]

"""The cache verifies what it reuses, never shares files with run folders, builds each key once across processes,
and turns a full disk into one line."""
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest

from edgesmith.pipeline import host_lock
from edgesmith.pipeline.cache import Store
from edgesmith.pipeline.recipe import load_recipe
from edgesmith.pipeline.run import run
from edgesmith.pipeline.steps import Built, Steps
from edgesmith.targets.bundle_files.edgesmith_runtime import file_sha256
from tests.conftest import FAST, REPO


def _write_and_count(counter: Path, seconds: float):
    def build(folder: Path) -> Built:
        with open(counter, "a") as fh:   # one line per build, from any process
            fh.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        (folder / "io.json").write_text('{"inputs": []}')
        return Built(facts={"pid": os.getpid()})
    return build


def _run_step(cache: str, counter: str, seconds: float, out: str | None = None) -> None:
    Steps(Store(Path(cache)), "test").run("toy", "toy step", {"x": 1}, _write_and_count(Path(counter), seconds),
                                          publish_to=Path(out) if out else None)


def _builds(counter: Path) -> int:
    return len(counter.read_text().split()) if counter.exists() else 0


def test_a_corrupt_or_edited_entry_is_discarded_and_rebuilt(tmp_path, capsys):
    counter = tmp_path / "builds"
    _run_step(str(tmp_path / "cache"), str(counter), 0)
    entry = next((tmp_path / "cache").glob("toy-*"))
    for damage in (lambda p: p.write_text('{"inputs": [1]}'),            # same size would pass a size-only check
                   lambda p: p.write_text('{"inp'),                        # truncated
                   lambda p: (p.parent / "extra.bin").write_bytes(b"x")):  # added
        damage(entry / "io.json")
        _run_step(str(tmp_path / "cache"), str(counter), 0)
        assert (entry / "io.json").read_text() == '{"inputs": []}'
        assert "discarding it and rebuilding" in capsys.readouterr().err
    (entry / "sidecar.json").write_text("{not json")
    _run_step(str(tmp_path / "cache"), str(counter), 0)
    assert "unreadable sidecar" in capsys.readouterr().err
    assert _builds(counter) == 5
    _run_step(str(tmp_path / "cache"), str(counter), 0)
    assert _builds(counter) == 5 and "discarding" not in capsys.readouterr().err   # intact: reused


def test_editing_the_run_folder_never_reaches_the_cache(tmp_path):
    counter = tmp_path / "builds"
    _run_step(str(tmp_path / "cache"), str(counter), 0, str(tmp_path / "run"))
    published = tmp_path / "run" / "io.json"
    published.write_text('{"inputs": ["edited"]}')
    entry = next((tmp_path / "cache").glob("toy-*"))
    assert (entry / "io.json").read_text() == '{"inputs": []}'
    assert os.stat(published).st_ino != os.stat(entry / "io.json").st_ino
    _run_step(str(tmp_path / "cache"), str(counter), 0, str(tmp_path / "run2"))
    assert _builds(counter) == 1 and (tmp_path / "run2" / "io.json").read_text() == '{"inputs": []}'


def test_two_processes_build_one_key_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    counter, cache = tmp_path / "builds", str(tmp_path / "cache")
    workers = [context.Process(target=_run_step, args=(cache, str(counter), 3)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert _builds(counter) == 1


def test_a_builder_killed_mid_step_leaves_no_stale_lock(tmp_path):
    context = multiprocessing.get_context("spawn")
    counter, cache = tmp_path / "builds", str(tmp_path / "cache")
    holder = context.Process(target=_run_step, args=(cache, str(counter), 60))
    holder.start()
    deadline = time.time() + 60
    while _builds(counter) == 0 and time.time() < deadline:   # it holds the lock and is building
        time.sleep(0.1)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    started = time.time()
    _run_step(cache, str(counter), 0)
    assert _builds(counter) == 2 and time.time() - started < 30


def test_a_truncated_onnx_in_the_cache_is_rebuilt_not_republished(tmp_path, cache_dir):
    recipe = load_recipe(None, FAST)
    run(recipe, tmp_path / "a", cache_dir)
    cached_onnx = next(p for p in cache_dir.glob("export-*/model.onnx"))
    cached_onnx.write_bytes(cached_onnx.read_bytes()[:1000])
    second = run(recipe, tmp_path / "b", cache_dir)
    assert "export" in second.executed
    published = tmp_path / "b" / "export" / "model.onnx"
    onnx.checker.check_model(str(published))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["hashes"]["export/model.onnx"] == file_sha256(published)


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root, unshare(1) and the right to mount a small tmpfs")
def test_a_full_disk_is_one_line_and_leaves_the_cache_consistent(tmp_path):
    cache = tmp_path / "small"
    cache.mkdir()
    sets = " ".join(f"--set '{item}'" for item in FAST)
    command = (f"mount -t tmpfs -o size=1200k tmpfs {cache} && {sys.executable} -m edgesmith run {sets} "
               f"--out {tmp_path / 'run'} --cache-dir {cache}; code=$?; "
               f"for entry in {cache}/*-*; do echo ENTRY; {sys.executable} -c 'import sys, pathlib; "
               "from edgesmith.pipeline.cache import _verified; "
               "sys.exit(1 if _verified(pathlib.Path(sys.argv[1]))[1] else 0)' \"$entry\" || echo CORRUPT $entry; "
               f"done; ls -a {cache} | grep -c '^.tmp-' ; exit $code")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and str(cache) in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "ENTRY" in done.stdout, "the disk filled before any step committed: nothing to check"
    assert "CORRUPT" not in done.stdout and done.stdout.split()[-1] == "0"   # no temporary folders left


def test_two_runs_sharing_a_cache_train_once(tmp_path):
    sets = [arg for item in FAST for arg in ("--set", item)]
    runs = [subprocess.Popen([sys.executable, "-m", "edgesmith", "run", *sets, "--out", str(tmp_path / name),
                              "--cache-dir", str(tmp_path / "cache")], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    errors = [proc.communicate(timeout=600)[1] for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], errors
    built = [step["kind"] for name in ("a", "b")
             for step in json.loads((tmp_path / name / "manifest.json").read_text())["steps"] if not step["cached"]]
    assert built.count("train") == 1 and built.count("model") == 1 and built.count("export") == 1, built
    assert any("being built by another run; waiting" in err for err in errors)


def test_a_host_measurement_pauses_other_builds_at_their_next_batch(tmp_path):
    """Parallel jobs sharing a cache: a latency figure is never taken while another build computes on this host."""
    events, locks = [], tmp_path
    started, measuring_done = threading.Event(), threading.Event()

    def training_build():   # a build that passes a pause point between batches, as Dataset.batches does
        with host_lock.computing(locks):
            started.set()
            for batch in range(40):
                host_lock.pause_point()
                events.append(("batch", batch, measuring_done.is_set()))
                time.sleep(0.02)

    def measuring_build():
        with host_lock.computing(locks):
            started.wait(10)
            time.sleep(0.1)
            with host_lock.measuring():
                events.append(("measure start",))
                time.sleep(0.3)   # no batch of the other build may run in here
                events.append(("measure end",))
            measuring_done.set()

    threads = [threading.Thread(target=training_build), threading.Thread(target=measuring_build)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    start, end = events.index(("measure start",)), events.index(("measure end",))
    assert end == start + 1                          # nothing ran inside the timing window
    assert 0 < start < len(events) - 2               # the training build paused mid-way, not after finishing
    assert sum(1 for e in events if e[0] == "batch") == 40


@pytest.mark.parametrize("target", ["x86-host", "raspberry-pi-4"])
def test_a_host_measurement_does_not_wait_for_a_whole_tvm_compile(tmp_path, target):
    """A compile cannot pause mid-pass, but it pauses between TVM's passes and before linking: a parallel job's
    timing goes first instead of idling its core until the whole compile ends."""
    pytest.importorskip("tvm", reason="apache-tvm is a dependency of edgesmith; this environment lacks it")
    if target != "x86-host" and shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc absent: apt-get install gcc-aarch64-linux-gnu")
    from edgesmith.pipeline.bench import compile_for
    from edgesmith.targets import load_profile
    from edgesmith.targets.backends import CompileOptions, get_backend
    from tests.targets.conftest import tiny_cnn

    onnx.save(tiny_cnn(), str(tmp_path / "tiny.onnx"))
    events, compiling = [], threading.Event()

    def compile_build():
        with host_lock.computing(tmp_path):
            compiling.set()
            compile_for(get_backend("tvm"), tmp_path / "tiny.onnx", load_profile(target), tmp_path / "out",
                        CompileOptions())
            events.append("compiled")

    def measuring_build():
        with host_lock.computing(tmp_path):
            compiling.wait(10)
            with host_lock.measuring():
                events.append("measured")

    threads = [threading.Thread(target=compile_build), threading.Thread(target=measuring_build)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert events == ["measured", "compiled"] and (tmp_path / "out" / "model.so").is_file()
